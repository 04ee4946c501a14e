package agent

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/tunnel"
)

const strictBookinfo = `
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bookinfo}
spec:
  mtls: {mode: STRICT}
`

// zeroTrustL4 is the documentation's zero-trust example with the allows kept to L4
// (principals only), which the agent enforces without a waypoint.
const zeroTrustL4 = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: bookinfo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend-to-reviews, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/frontend"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-reviews-to-ratings, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/reviews"]}}]
`

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

func TestMeshToMeshPreservesSourceIP(t *testing.T) {
	m := newTestMesh(t)
	c := m.dialFrom(t, "frontend", appAddr("reviews"), "node-1", false)
	got, err := ask(c, "whoami")
	if err != nil || got != "reviews sees 10.77.1.10" {
		t.Fatalf("reply %q, %v; want reviews to see frontend's IP", got, err)
	}
	// It went through HBONE with both identities: metrics at both ends say so.
	eventually(t, "metrics", func() bool {
		return testutil.ToFloat64(m.agents["node-2"].metrics.closed.WithLabelValues(
			"destination", "frontend", "bookinfo", "spiffe://cluster.local/ns/bookinfo/sa/frontend", "frontend",
			"reviews", "bookinfo", "spiffe://cluster.local/ns/bookinfo/sa/reviews", "reviews", "mutual_tls", "tcp")) == 1
	})
	if n := testutil.ToFloat64(m.agents["node-1"].metrics.opened.WithLabelValues(
		"source", "frontend", "bookinfo", "spiffe://cluster.local/ns/bookinfo/sa/frontend", "frontend",
		"reviews", "bookinfo", "spiffe://cluster.local/ns/bookinfo/sa/reviews", "reviews", "mutual_tls", "tcp")); n != 1 {
		t.Fatalf("source agent counted %v opened mTLS connections, want 1", n)
	}
}

func TestServiceVIPIsLoadBalancedToAnEndpoint(t *testing.T) {
	m := newTestMesh(t)
	if got, err := m.whoami(t, "frontend", netip.MustParseAddrPort("10.96.0.10:80"), "node-1", false); err != nil || got != "reviews sees 10.77.1.10" {
		t.Fatalf("reply %q, %v", got, err)
	}
}

func TestSameNodeGoesThroughPolicy(t *testing.T) {
	m := newTestMesh(t)
	// reviews -> ratings, both on node-2.
	if got, err := m.whoami(t, "reviews", appAddr("ratings"), "node-2", false); err != nil || got != "ratings sees 10.77.2.10" {
		t.Fatalf("reply %q, %v", got, err)
	}
	m.apply(t, zeroTrustL4)
	// Under zero trust reviews -> ratings is still allowed and ratings -> ratings is
	// not: the same-node path applies the destination's policy.
	if got, err := m.whoami(t, "reviews", appAddr("ratings"), "node-2", false); err != nil || got != "ratings sees 10.77.2.10" {
		t.Fatalf("reviews -> ratings under zero trust: %q, %v", got, err)
	}
	if got, err := m.whoami(t, "ratings", appAddr("ratings"), "node-2", false); !isReset(err) {
		t.Fatalf("ratings -> ratings under zero trust: %q, %v; want a reset", got, err)
	}
}

func TestPassthroughToPodOutsideTheMesh(t *testing.T) {
	m := newTestMesh(t)
	if got, err := m.whoami(t, "frontend", appAddr("sleep"), "node-1", false); err != nil || got != "sleep sees 10.77.1.10" {
		t.Fatalf("reply %q, %v", got, err)
	}
}

func TestPermissiveAcceptsPlaintextAndMTLS(t *testing.T) {
	m := newTestMesh(t)
	if got, err := m.whoami(t, "sleep", appAddr("reviews"), "node-2", true); err != nil || got != "reviews sees 10.77.1.20" {
		t.Fatalf("plaintext from legacy: %q, %v", got, err)
	}
	if got, err := m.whoami(t, "frontend", appAddr("reviews"), "node-1", false); err != nil || got != "reviews sees 10.77.1.10" {
		t.Fatalf("mTLS from frontend: %q, %v", got, err)
	}
}

func TestStrictRefusesPlaintextWithReset(t *testing.T) {
	m := newTestMesh(t)
	m.apply(t, strictBookinfo)
	if got, err := m.whoami(t, "sleep", appAddr("reviews"), "node-2", true); !isReset(err) {
		t.Fatalf("plaintext under STRICT: %q, %v; want a connection reset", got, err)
	}
	if log := m.logs["node-2"].String(); !strings.Contains(log, "connection denied") || !strings.Contains(log, "istio_converted_static_strict") {
		t.Fatalf("no deny log naming the STRICT policy:\n%s", log)
	}
	if got, err := m.whoami(t, "frontend", appAddr("reviews"), "node-1", false); err != nil || got != "reviews sees 10.77.1.10" {
		t.Fatalf("mTLS under STRICT: %q, %v", got, err)
	}
}

func TestAllowByPrincipal(t *testing.T) {
	m := newTestMesh(t)
	m.apply(t, `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-allow-frontend, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/frontend"]}}]
`)
	if got, err := m.whoami(t, "frontend", appAddr("reviews"), "node-1", false); err != nil || got != "reviews sees 10.77.1.10" {
		t.Fatalf("frontend: %q, %v", got, err)
	}
	for _, tc := range []struct {
		pod, via  string
		plaintext bool
	}{{"productpage", "node-1", false}, {"sleep", "node-2", true}} {
		if got, err := m.whoami(t, tc.pod, appAddr("reviews"), tc.via, tc.plaintext); !isReset(err) {
			t.Fatalf("%s: %q, %v; want a reset", tc.pod, got, err)
		}
	}
	if n := testutil.ToFloat64(m.agents["node-2"].metrics.denied.WithLabelValues("destination", "bookinfo", "")); n != 2 {
		t.Fatalf("veil_policy_denied_total = %v for 'no ALLOW matched', want 2", n)
	}
}

func TestZeroTrust(t *testing.T) {
	m := newTestMesh(t)
	m.apply(t, zeroTrustL4)
	if got, err := m.whoami(t, "frontend", appAddr("reviews"), "node-1", false); err != nil || got != "reviews sees 10.77.1.10" {
		t.Fatalf("frontend -> reviews: %q, %v", got, err)
	}
	if got, err := m.whoami(t, "frontend", appAddr("ratings"), "node-1", false); !isReset(err) {
		t.Fatalf("frontend -> ratings: %q, %v; want a reset", got, err)
	}
}

// The documentation's own zero-trust file allows only GET: at L4 those rules are
// dropped, so everything to reviews is denied (fail closed, as ztunnel).
func TestZeroTrustExampleWithHTTPRulesFailsClosedAtL4(t *testing.T) {
	m := newTestMesh(t)
	data, err := os.ReadFile("../../shared/examples/zero-trust.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m.apply(t, string(data))
	if got, err := m.whoami(t, "frontend", appAddr("reviews"), "node-1", false); !isReset(err) {
		t.Fatalf("frontend -> reviews: %q, %v; want a reset", got, err)
	}
}

func TestHalfClose(t *testing.T) {
	m := newTestMesh(t)
	c := m.dialFrom(t, "frontend", appAddr("reviews"), "node-1", false)
	payload := strings.Repeat("veil", 50000)
	got, err := ask(c, "echo\n"+payload)
	if err != nil || got != payload+"\n" { // ask ends what it sends with a newline
		t.Fatalf("echo after half-close: %d bytes, %v; want %d", len(got), err, len(payload))
	}
}

func TestLargeTransferThroughTheMesh(t *testing.T) {
	const size = 1 << 30
	m := newTestMesh(t)
	c := m.dialFrom(t, "frontend", appAddr("reviews"), "node-1", false)
	c.SetDeadline(time.Now().Add(5 * time.Minute))
	io.WriteString(c, "hash\n")
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(c, h), rand.NewChaCha8([32]byte{9}), size); err != nil {
		t.Fatal(err)
	}
	got, err := ask(c, "")
	// ask wrote one more "\n": hash it too.
	h.Write([]byte("\n"))
	if err != nil || got != hex.EncodeToString(h.Sum(nil)) {
		t.Fatalf("checksum at reviews %q, %v; want %x", got, err, h.Sum(nil))
	}
}

func TestPolicyChangeClosesConnectionsNowDenied(t *testing.T) {
	m := newTestMesh(t)
	held := m.dialFrom(t, "frontend", appAddr("reviews"), "node-1", false)
	io.WriteString(held, "hold\n")
	plain := m.dialFrom(t, "sleep", appAddr("reviews"), "node-2", true)
	io.WriteString(plain, "hold\n")
	eventually(t, "both connections to be open", func() bool { return m.agents["node-2"].tracker.len() == 2 })
	m.apply(t, strictBookinfo)
	// The plaintext connection is closed; the mTLS one is still allowed.
	plain.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := plain.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("plaintext connection after STRICT: %v, want it closed", err)
	}
	eventually(t, "only the mTLS connection to stay open", func() bool { return m.agents["node-2"].tracker.len() == 1 })
	m.apply(t, `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-frontend, namespace: bookinfo}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/frontend"]}}]}]
`)
	held.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := held.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("mTLS connection after DENY: %v, want it closed", err)
	}
}

func TestHBONEClientWithWrongIdentityIsRefused(t *testing.T) {
	m := newTestMesh(t)
	// A client whose certificate comes from another CA, claiming frontend.
	other, err := identity.NewSelfSignedCA(identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	frontend := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/frontend")
	reviews := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/reviews")
	mgr, _ := identity.NewManager(identity.ManagerOptions{Issuer: other})
	defer mgr.Close()
	cert, err := mgr.Get(context.Background(), frontend)
	if err != nil {
		t.Fatal(err)
	}
	bundle := x509bundle.FromX509Authorities(m.ca.TrustDomain(), m.ca.Roots())
	pool := &tunnel.Pool{
		TLSConfig: func(context.Context, tunnel.Key) (*tls.Config, error) {
			return identity.ClientConfig(cert, reviews, bundle), nil
		},
		Dial: nsSockets{ns: m.net.nodes["node-1"], host: HostSockets{}}.dialString,
	}
	defer pool.Close()
	_, err = pool.Connect(context.Background(), tunnel.Key{Src: frontend, Dst: reviews, Addr: netip.AddrPortFrom(podIP("reviews"), 15008)}, appAddr("reviews"), netip.MustParseAddrPort("10.77.1.10:1234"))
	if err == nil {
		t.Fatal("node-2 accepted a client certificate from a foreign CA")
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The Forwarded source decides ipBlocks and what the application sees: a peer may only
// name an address of a workload with its own identity.
func TestHBONEForwardedSourceMustBelongToThePeer(t *testing.T) {
	m := newTestMesh(t)
	frontend := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/frontend")
	reviews := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/reviews")
	mgr, _ := identity.NewManager(identity.ManagerOptions{Issuer: m.ca})
	defer mgr.Close()
	cert, err := mgr.Get(context.Background(), frontend)
	if err != nil {
		t.Fatal(err)
	}
	bundle := x509bundle.FromX509Authorities(m.ca.TrustDomain(), m.ca.Roots())
	pool := &tunnel.Pool{
		TLSConfig: func(context.Context, tunnel.Key) (*tls.Config, error) {
			return identity.ClientConfig(cert, reviews, bundle), nil
		},
		Dial: nsSockets{ns: m.net.nodes["node-1"], host: HostSockets{}}.dialString,
	}
	defer pool.Close()
	key := tunnel.Key{Src: frontend, Dst: reviews, Addr: netip.AddrPortFrom(podIP("reviews"), 15008)}
	for _, tc := range []struct {
		name string
		src  string
		want int
	}{
		{"its own pod's address", "10.77.1.10:1234", 0},
		{"another workload's address", "10.77.1.11:1234", 401},
		{"an address of no workload", "192.0.2.7:1234", 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := pool.Connect(context.Background(), key, appAddr("reviews"), netip.MustParseAddrPort(tc.src))
			if tc.want == 0 {
				if err != nil {
					t.Fatal(err)
				}
				s.Close()
				return
			}
			if code := tunnel.StatusCode(err); code != tc.want {
				t.Fatalf("Connect with Forwarded %s: %v, want %d", tc.src, err, tc.want)
			}
		})
	}

	// A pod of the peer's identity that node-1 has just started, enrolled by its CNI and
	// not yet given an address by the controller: an address of no workload is its.
	st, errs := cluster.Parse("cluster.yaml", []byte(clusterYAML+`---
apiVersion: v1
kind: Pod
metadata: {name: frontend-new, namespace: bookinfo}
spec: {serviceAccountName: frontend, nodeName: node-1}
`))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	m.agents["node-2"].Update(st)
	s, err := pool.Connect(context.Background(), key, appAddr("reviews"), netip.MustParseAddrPort("10.77.1.99:1234"))
	if err != nil {
		t.Fatalf("an address of no workload while a pod of the peer starts on its node: %v, want it accepted", err)
	}
	s.Close()
	if _, err := pool.Connect(context.Background(), key, appAddr("reviews"), netip.MustParseAddrPort("10.77.1.11:1234")); tunnel.StatusCode(err) != 401 {
		t.Fatalf("another workload's address while a pod of the peer starts: %v, want 401", err)
	}
}

// Without Forwarded (Istio's Go dialer sends none) the source is the tunnel's peer
// address: a pod with the peer's identity, or a node that runs one.
func TestHBONEWithoutForwarded(t *testing.T) {
	m := newTestMesh(t)
	a := m.agents["node-2"]
	frontend := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/frontend")
	for _, tc := range []struct {
		name      string
		src       string
		forwarded bool
		want      int
	}{
		{"from the peer's own pod", "10.77.1.10:40000", false, 200},
		{"from a node that runs a pod of the peer", "10.77.0.1:40000", false, 200},
		{"from a node that runs no pod of the peer", "10.77.0.2:40000", false, 401},
		{"a node address named in Forwarded", "10.77.0.1:40000", true, 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := netip.MustParseAddrPort(tc.src)
			r := &tunnel.Request{Peer: frontend, Source: src, Forwarded: tc.forwarded, Destination: appAddr("reviews"),
				Local: netip.AddrPortFrom(podIP("reviews"), 15008), Remote: src}
			up, err := a.connectInbound(context.Background(), r)
			if code := tunnel.StatusCode(err); code != tc.want {
				t.Fatalf("connectInbound: %v (status %d), want %d", err, code, tc.want)
			}
			if up != nil {
				got, err := ask(up, "whoami")
				a.inboundDone(r, tunnel.Counts{}, nil)
				if want := "reviews sees " + src.Addr().String(); err != nil || got != want {
					t.Fatalf("application: %q, %v; want %q", got, err, want)
				}
			}
		})
	}
}

// Series name pods (source_workload is the pod's name): a pod that is gone takes its
// series with it, so pod churn does not grow them without end.
func TestMetricSeriesOfDeletedPodsAreDropped(t *testing.T) {
	m := newTestMesh(t)
	if got, err := m.whoami(t, "frontend", appAddr("reviews"), "node-1", false); err != nil || got != "reviews sees 10.77.1.10" {
		t.Fatalf("frontend -> reviews: %q, %v", got, err)
	}
	a := m.agents["node-2"]
	series := func() int {
		mfs, err := a.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, mf := range mfs {
			for _, s := range mf.GetMetric() {
				for _, l := range s.GetLabel() {
					if strings.HasSuffix(l.GetName(), "_workload") && l.GetValue() == "frontend" {
						n++
					}
				}
			}
		}
		return n
	}
	if series() == 0 {
		t.Fatal("no series name frontend")
	}
	without := strings.Replace(clusterYAML, `metadata: {name: frontend, namespace: bookinfo, labels: {app: frontend}}
spec: {serviceAccountName: frontend, nodeName: node-1}
status: {podIP: 10.77.1.10, hostIP: 10.77.0.1}`, `metadata: {name: frontend2, namespace: bookinfo, labels: {app: frontend}}
spec: {serviceAccountName: frontend, nodeName: node-1}
status: {podIP: 10.77.1.12, hostIP: 10.77.0.1}`, 1)
	st, errs := cluster.Parse("churn.yaml", []byte(without))
	if len(errs) > 0 || without == clusterYAML {
		t.Fatalf("cluster without frontend: %v", errs)
	}
	// The request's connections are counted when they close: wait for that, or a close
	// recorded after the pod is forgotten would bring its series back.
	closed := func() bool {
		mfs, err := a.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != "istio_tcp_connections_closed_total" {
				continue
			}
			for _, s := range mf.GetMetric() {
				for _, l := range s.GetLabel() {
					if l.GetName() == "source_workload" && l.GetValue() == "frontend" {
						return true
					}
				}
			}
		}
		return false
	}
	deadline := time.Now().Add(10 * time.Second)
	for !closed() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	a.Update(st)
	if n := series(); n != 0 {
		t.Fatalf("%d series still name the deleted pod frontend", n)
	}
}

// A pod may hold at most MaxConnectionsPerSource proxied connections: past it, new ones
// are reset, and a freed slot is usable again.
func TestConnectionLimitPerSource(t *testing.T) {
	m := newTestMesh(t, true)
	a := m.agents["node-1"]
	a.limit.mu.Lock()
	a.limit.perSource = 3
	a.limit.mu.Unlock()
	var held []net.Conn
	for i := 0; i < 3; i++ {
		c, err := m.plainDial(t, "frontend", appAddr("reviews"))
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "hold\n")
		held = append(held, c)
	}
	eventually(t, "three connections held", func() bool {
		a.limit.mu.Lock()
		defer a.limit.mu.Unlock()
		return a.limit.total == 3
	})
	if got, err := m.plainWhoami(t, "frontend", appAddr("reviews")); !isReset(err) {
		t.Fatalf("a fourth connection: %q, %v; want a reset", got, err)
	}
	held[0].Close()
	eventually(t, "a slot to free", func() bool {
		a.limit.mu.Lock()
		defer a.limit.mu.Unlock()
		return a.limit.total == 2
	})
	if got, err := m.plainWhoami(t, "frontend", appAddr("reviews")); err != nil || got != "reviews sees 10.77.1.10" {
		t.Fatalf("after a slot freed: %q, %v", got, err)
	}
}

// Deny log lines are rate limited; the ones dropped are counted on the next line.
func TestDenyLogIsRateLimited(t *testing.T) {
	var r rateLimit
	now := time.Now()
	n := 0
	for i := 0; i < 1000; i++ {
		if ok, _ := r.allow(now); ok {
			n++
		}
	}
	if n != denyLogBurst {
		t.Fatalf("%d lines out of a burst of 1000, want %d", n, denyLogBurst)
	}
	ok, dropped := r.allow(now.Add(time.Second))
	if !ok || dropped != 1000-denyLogBurst {
		t.Fatalf("a second later: %v, %d dropped reported; want %d", ok, dropped, 1000-denyLogBurst)
	}
}

// An enrolled pod always speaks HBONE to enrolled destinations: plaintext from its address
// is a bypass or a spoofed source, refused even under PERMISSIVE.
func TestPlaintextFromAnEnrolledPodIsRefused(t *testing.T) {
	m := newTestMesh(t)
	if got, err := m.whoami(t, "sleep", appAddr("reviews"), "node-2", true); err != nil || got != "reviews sees 10.77.1.20" {
		t.Fatalf("legacy sleep -> reviews in plaintext under PERMISSIVE: %q, %v", got, err)
	}
	if got, err := m.whoami(t, "frontend", appAddr("reviews"), "node-2", true); !isReset(err) {
		t.Fatalf("plaintext from enrolled frontend: %q, %v; want a reset", got, err)
	}
	if log := m.logs["node-2"].String(); !strings.Contains(log, "plaintext from an enrolled pod") {
		t.Fatal("the refusal was not logged")
	}
}

// A Service without a selector (default/kubernetes, endpoints managed by hand) takes its
// endpoints from EndpointSlices: an endpoint outside the mesh is dialled directly, one in
// the mesh over HBONE; with no ready endpoint the Service is refused.
func TestServiceWithoutSelectorUsesEndpointSlices(t *testing.T) {
	m := newTestMesh(t)
	st, errs := cluster.Parse("slices.yaml", []byte(clusterYAML+`
---
apiVersion: v1
kind: Service
metadata: {name: legacy-api, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 9080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: legacy-api-1, namespace: bookinfo, labels: {kubernetes.io/service-name: legacy-api}}
addressType: IPv4
endpoints: [{addresses: [10.77.1.20]}]
ports: [{name: http, port: 9080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-by-hand, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.21
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-by-hand-1, namespace: bookinfo, labels: {kubernetes.io/service-name: reviews-by-hand}}
addressType: IPv4
endpoints: [{addresses: [10.77.2.10]}, {addresses: [10.77.2.11], conditions: {ready: false}}]
ports: [{name: http, port: 9080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: nothing-ready, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.22
  ports: [{name: http, port: 80}]
`))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	for _, a := range m.agents {
		a.Update(st)
	}
	for _, tc := range []struct {
		name, vip, want string
	}{
		{"endpoint outside the mesh: direct", "10.96.0.20:80", "sleep sees 10.77.1.10"},
		{"endpoint in the mesh: HBONE", "10.96.0.21:80", "reviews sees 10.77.1.10"},
		{"the same again (the unready endpoint is skipped)", "10.96.0.21:80", "reviews sees 10.77.1.10"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, err := m.whoami(t, "frontend", netip.MustParseAddrPort(tc.vip), "node-1", false); err != nil || got != tc.want {
				t.Fatalf("frontend -> %s: %q, %v; want %q", tc.vip, got, err, tc.want)
			}
		})
	}
	if got, err := m.whoami(t, "frontend", netip.MustParseAddrPort("10.96.0.22:80"), "node-1", false); !isReset(err) {
		t.Fatalf("a Service with no ready endpoint: %q, %v; want a reset", got, err)
	}
	mtls := testutil.ToFloat64(m.agents["node-2"].metrics.opened.WithLabelValues(
		"destination", "frontend", "bookinfo", "spiffe://cluster.local/ns/bookinfo/sa/frontend", "frontend",
		"reviews", "bookinfo", "spiffe://cluster.local/ns/bookinfo/sa/reviews", "reviews", "mutual_tls", "tcp"))
	if mtls != 2 {
		t.Fatalf("node-2 saw %v mTLS connections from frontend, want 2", mtls)
	}
}
