package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/veilmesh/veil/api"
	"github.com/veilmesh/veil/controller"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// streamLog is a log sink the tests read while servers write.
type streamLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *streamLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *streamLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *streamLog) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

const streamCluster = `
apiVersion: v1
kind: Namespace
metadata:
  name: bookinfo
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews}}
spec: {nodeName: node-2, serviceAccountName: reviews}
status: {podIP: 10.77.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: bookinfo, labels: {app: frontend}}
spec: {nodeName: node-1, serviceAccountName: frontend}
status: {podIP: 10.77.1.10}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: reviews}
  ports: [{port: 9080}]
`

const streamDenyAll = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: bookinfo}
spec: {}
`

const streamBrokenYAML = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-allow-frontend, namespace: bookinfo
spec: {}
`

var streamTokens = map[string]string{"node-1": "node-1-token-0123456789", "node-2": "node-2-token-0123456789"}

// streamController runs what veil-controller runs: a DirSource on dir (or nothing, when
// dir is empty: the test calls Config.Set), the config stream and the CA on one TLS gRPC
// server.
type streamController struct {
	Config *controller.ConfigServer
	Addr   string
	Log    *streamLog
	stop   func()
}

func startStreamController(t *testing.T, ca *identity.CA, dir, addr string) *streamController {
	t.Helper()
	auth, err := identity.NewNodeTokens(streamTokens)
	if err != nil {
		t.Fatal(err)
	}
	logs := &streamLog{}
	log := logs.logger()
	placement := &controller.LivePlacement{}
	cfg := &controller.ConfigServer{Auth: auth, Log: log}
	if dir != "" {
		cfg.Source = &controller.DirSource{Dir: dir, Log: log}
		cfg.OnConfig = func(c *controller.Config) { placement.Update(ca.TrustDomain(), c.Cluster.Pods) }
	}
	var lis net.Listener
	deadline := time.Now().Add(5 * time.Second)
	for { // a restart reuses the address; the old socket may linger a moment
		lis, err = net.Listen("tcp", addr)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	srv := &controller.CAServer{CA: ca, Auth: auth, Workloads: placement, ServerNames: []string{"veil-controller"},
		Services: []interface{ Register(*grpc.Server) }{cfg}, Log: log}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Serve(ctx, lis); err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	if dir != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := cfg.Run(ctx); err != nil {
				t.Errorf("config Run: %v", err)
			}
		}()
	}
	var once sync.Once
	c := &streamController{Config: cfg, Addr: lis.Addr().String(), Log: logs, stop: func() {
		once.Do(func() { cfg.Close(); cancel(); wg.Wait() })
	}}
	t.Cleanup(c.stop)
	return c
}

// streamAgent is an Agent (not started: the tests look at what it is fed) with a
// ControllerSource running.
type streamAgent struct {
	*Agent
	Source *ControllerSource
	Log    *streamLog
	stop   func()
}

func startStreamAgent(t *testing.T, ca *identity.CA, node, addr, cacheFile string) *streamAgent {
	t.Helper()
	logs := &streamLog{}
	log := logs.logger()
	mgr, err := identity.NewManager(identity.ManagerOptions{Issuer: ca, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mgr.Close() })
	a, err := New(Options{Node: node, Certs: mgr, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	conn, err := identity.DialCA(addr, "veil-controller", ca.Roots(), streamTokens[node])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	src := &ControllerSource{Agent: a, Conn: conn, CacheFile: cacheFile, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond, Log: log}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	var once sync.Once
	sa := &streamAgent{Agent: a, Source: src, Log: logs, stop: func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("ControllerSource.Run: %v", err)
			}
		})
	}}
	t.Cleanup(sa.stop)
	return sa
}

// synced reports whether the agent holds a config from the controller and enforces
// exactly the policies want.
func synced(a *streamAgent, want string) func() bool {
	return func() bool {
		_, v := a.Source.Version()
		return v > 0 && policyKeys(a.Agent) == want
	}
}

// policyKeys lists the policies in force.
func policyKeys(a *Agent) string {
	var out []string
	for _, o := range a.Policies().Objects() {
		out = append(out, o.Key().String())
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}

// allowed asks the agent's policy whether frontend may reach reviews:9080.
func allowed(a *Agent) bool {
	c := policy.Conn{Peer: policy.ParsePeer("spiffe://cluster.local/ns/bookinfo/sa/frontend"),
		SrcIP: netip.MustParseAddr("10.77.1.10"), DstIP: netip.MustParseAddr("10.77.2.10"), DstPort: 9080}
	return a.Policies().EvaluateL4(&c).Allowed()
}

func writeConfig(t *testing.T, dir, name, data string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func streamWait(t *testing.T, what string, cond func() bool, logs ...*streamLog) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > 10*time.Second {
			for _, l := range logs {
				t.Logf("log:\n%s", l)
			}
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
	return time.Since(start)
}

func newStreamCA(t *testing.T) *identity.CA {
	t.Helper()
	ca, err := identity.NewSelfSignedCA(identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// TestStreamPolicyChangeReachesAgent runs the controller on a directory and an agent
// against it: the agent gets the snapshot, then every change to a file, fast; a broken
// file changes nothing the agent enforces.
func TestStreamPolicyChangeReachesAgent(t *testing.T) {
	ca, dir := newStreamCA(t), t.TempDir()
	writeConfig(t, dir, "cluster.yaml", streamCluster)
	writeConfig(t, dir, "strict.yaml", strictBookinfo)
	c := startStreamController(t, ca, dir, "127.0.0.1:0")
	a := startStreamAgent(t, ca, "node-2", c.Addr, "")

	streamWait(t, "the snapshot", synced(a, "PeerAuthentication bookinfo/default"))
	if a.Policies().Workload("bookinfo", "reviews-v1") == nil || a.Policies().Workload("bookinfo", "frontend") == nil {
		t.Fatal("the agent's policy store does not know the workloads: Update was not called")
	}
	if dump := a.configDump(); len(dump.Workloads) != 2 || !dump.Workloads[1].Local || !dump.Workloads[1].Enrolled {
		t.Fatalf("agent view: %+v", dump.Workloads)
	}
	if !allowed(a.Agent) {
		t.Fatal("frontend -> reviews denied before any AuthorizationPolicy")
	}

	// Policy changes, end to end: file written -> poll -> push -> Ack, measured.
	var took []time.Duration
	for i := 0; i < 6; i++ {
		if i%2 == 0 {
			writeConfig(t, dir, "deny-all.yaml", streamDenyAll)
			took = append(took, streamWait(t, "deny-all in force", func() bool { return !allowed(a.Agent) }))
		} else {
			os.Remove(filepath.Join(dir, "deny-all.yaml"))
			took = append(took, streamWait(t, "deny-all removed", func() bool { return allowed(a.Agent) }))
		}
	}
	slices.Sort(took)
	t.Logf("policy change, file written -> agent enforcing it (poll interval 200ms), %d changes: min %v, median %v, max %v",
		len(took), took[0].Round(time.Millisecond), took[len(took)/2].Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond))
	if took[len(took)-1] > time.Second {
		t.Errorf("a policy change took %v to reach the agent; want under 1s", took[len(took)-1])
	}

	// A broken file: the controller reports it and keeps serving the last good version;
	// the agent's config does not move.
	writeConfig(t, dir, "deny-all.yaml", streamDenyAll)
	streamWait(t, "deny-all in force", func() bool { return !allowed(a.Agent) })
	_, before := a.Source.Version()
	writeConfig(t, dir, "deny-all.yaml", streamBrokenYAML)
	streamWait(t, "the controller to report the broken file", func() bool {
		l := c.Log.String()
		return strings.Contains(l, "deny-all.yaml") && strings.Contains(l, "AUTHORIZATION_POLICY bookinfo/deny-all: keeping its last good version")
	}, c.Log)
	time.Sleep(300 * time.Millisecond)
	if _, v := a.Source.Version(); v != before || allowed(a.Agent) {
		t.Fatalf("after a broken file: version %d -> %d, allowed %v; want no change and still denied", before, v, allowed(a.Agent))
	}
}

// TestStreamControllerKilled stops the controller under a running agent: the agent keeps
// enforcing, retries, and takes the new controller's config when it is back.
func TestStreamControllerKilled(t *testing.T) {
	ca, dir := newStreamCA(t), t.TempDir()
	writeConfig(t, dir, "cluster.yaml", streamCluster)
	writeConfig(t, dir, "strict.yaml", strictBookinfo+"---\n"+zeroTrustL4)
	c := startStreamController(t, ca, dir, "127.0.0.1:0")
	a := startStreamAgent(t, ca, "node-2", c.Addr, "")
	const all = "AuthorizationPolicy bookinfo/allow-frontend-to-reviews, AuthorizationPolicy bookinfo/allow-reviews-to-ratings, AuthorizationPolicy bookinfo/deny-all, PeerAuthentication bookinfo/default"
	streamWait(t, "the snapshot", synced(a, all))
	epoch1, _ := a.Source.Version()

	c.stop()
	streamWait(t, "the agent to notice", func() bool { return strings.Contains(a.Log.String(), "disconnected; enforcing the last good config") })
	time.Sleep(300 * time.Millisecond) // several failed reconnections
	if policyKeys(a.Agent) != all || !allowed(a.Agent) {
		t.Fatalf("without the controller the agent enforces %q (frontend->reviews allowed: %v)", policyKeys(a.Agent), allowed(a.Agent))
	}
	// The directory changes while the controller is down; the new controller serves it.
	writeConfig(t, dir, "strict.yaml", strictBookinfo+"---\n"+streamDenyAll)
	c2 := startStreamController(t, ca, dir, c.Addr)
	took := streamWait(t, "the new controller's config", func() bool {
		return policyKeys(a.Agent) == "AuthorizationPolicy bookinfo/deny-all, PeerAuthentication bookinfo/default"
	})
	t.Logf("controller back -> agent on its config: %v", took.Round(time.Millisecond))
	if epoch2, _ := a.Source.Version(); epoch2 == epoch1 || epoch2 != c2.Config.Epoch() {
		t.Fatalf("epoch %q after restart; want the new controller's %q", epoch2, c2.Config.Epoch())
	}
	if allowed(a.Agent) {
		t.Fatal("frontend -> reviews allowed under deny-all")
	}
}

// cutter is a TCP proxy whose connections the test can cut, to lose the stream without
// restarting the controller.
type cutter struct {
	lis   net.Listener
	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

func startCutter(t *testing.T, target string) *cutter {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{lis: lis}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			down, err := lis.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				down.Close()
				continue
			}
			c.mu.Lock()
			c.conns = append(c.conns, down, up)
			c.mu.Unlock()
			c.wg.Add(2)
			go func() { defer c.wg.Done(); io.Copy(up, down); up.Close() }()
			go func() { defer c.wg.Done(); io.Copy(down, up); down.Close() }()
		}
	}()
	t.Cleanup(func() { lis.Close(); c.cut(); c.wg.Wait() })
	return c
}

func (c *cutter) cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, conn := range c.conns {
		conn.Close()
	}
	c.conns = nil
}

// TestStreamResumesWithDeltaAfterConnectionLoss loses the stream, not the controller: the
// agent resubscribes with the version it holds and gets a delta.
func TestStreamResumesWithDeltaAfterConnectionLoss(t *testing.T) {
	ca, dir := newStreamCA(t), t.TempDir()
	writeConfig(t, dir, "cluster.yaml", streamCluster)
	writeConfig(t, dir, "strict.yaml", strictBookinfo)
	c := startStreamController(t, ca, dir, "127.0.0.1:0")
	proxy := startCutter(t, c.Addr)
	a := startStreamAgent(t, ca, "node-2", proxy.lis.Addr().String(), "")
	streamWait(t, "the snapshot", synced(a, "PeerAuthentication bookinfo/default"))
	epoch, version := a.Source.Version()
	streamWait(t, "the controller to get the Ack", func() bool { return strings.Contains(c.Log.String(), "version=1 full=true") })

	proxy.cut()
	writeConfig(t, dir, "deny-all.yaml", streamDenyAll)
	streamWait(t, "the change after reconnecting", func() bool { return !allowed(a.Agent) })
	if e, v := a.Source.Version(); e != epoch || v != version+1 {
		t.Fatalf("after resuming: epoch %q version %d; want %q %d", e, v, epoch, version+1)
	}
	logs := c.Log.String()
	if !strings.Contains(logs, "epoch="+epoch+" version=1 resumed=true") {
		t.Fatalf("the controller did not resume the agent's version:\n%s", logs)
	}
	if strings.Count(logs, "full=true") != 1 {
		t.Fatalf("want exactly one full snapshot (the first), got:\n%s", logs)
	}
}

// TestCacheAgentRestartsWithControllerDown: an agent that starts while the controller is
// unreachable enforces the config its previous run cached.
func TestCacheAgentRestartsWithControllerDown(t *testing.T) {
	ca, dir := newStreamCA(t), t.TempDir()
	cache := filepath.Join(t.TempDir(), "config.cache")
	writeConfig(t, dir, "cluster.yaml", streamCluster)
	writeConfig(t, dir, "policies.yaml", strictBookinfo+"---\n"+streamDenyAll)
	c := startStreamController(t, ca, dir, "127.0.0.1:0")
	a := startStreamAgent(t, ca, "node-2", c.Addr, cache)
	const want = "AuthorizationPolicy bookinfo/deny-all, PeerAuthentication bookinfo/default"
	streamWait(t, "the snapshot", synced(a, want))
	epoch, version := a.Source.Version()
	a.stop()
	c.stop()
	if st, err := os.Stat(cache); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("cache: %v, mode %v; want mode 0600", err, st.Mode().Perm())
	}

	b := startStreamAgent(t, ca, "node-2", c.Addr, cache)
	// The policies are applied, then the version recorded: wait for both.
	streamWait(t, "the cached config", func() bool {
		e, _ := b.Source.Version()
		return policyKeys(b.Agent) == want && e != ""
	})
	if e, v := b.Source.Version(); e != epoch || v != version {
		t.Fatalf("cached version %q %d, want %q %d", e, v, epoch, version)
	}
	if allowed(b.Agent) || b.Policies().Workload("bookinfo", "reviews-v1") == nil {
		t.Fatal("the cached config is not enforced")
	}
	if !strings.Contains(b.Log.String(), "config cache: loaded") {
		t.Fatalf("cache load not logged:\n%s", b.Log.String())
	}

	// A cache that is not one is reported and ignored; the agent starts empty.
	if err := os.WriteFile(cache, []byte("not a cache"), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startStreamAgent(t, ca, "node-2", c.Addr, cache)
	streamWait(t, "the bad cache reported", func() bool { return strings.Contains(d.Log.String(), "config cache: ignored") })
	if policyKeys(d.Agent) != "" {
		t.Fatalf("policies from a bad cache: %s", policyKeys(d.Agent))
	}
}

// TestStreamNackKeepsLastGoodConfig feeds the controller config an agent must refuse (as
// a source that does not validate could): the agent NACKs with the reason, applies none
// of the push, and the controller logs it.
func TestStreamNackKeepsLastGoodConfig(t *testing.T) {
	ca := newStreamCA(t)
	c := startStreamController(t, ca, "", "127.0.0.1:0")
	st, errs := cluster.Parse("cluster.yaml", []byte(streamCluster))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	good := policy.Parse("strict.yaml", []byte(strictBookinfo)).Objects
	if _, err := c.Config.Set(&controller.Config{Cluster: st, Policies: good}); err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(t.TempDir(), "config.cache")
	a := startStreamAgent(t, ca, "node-2", c.Addr, cache)
	streamWait(t, "the snapshot", synced(a, "PeerAuthentication bookinfo/default"))
	_, goodVersion := a.Source.Version()
	streamWait(t, "the cache written", func() bool { _, err := os.Stat(cache); return err == nil })
	cached, _ := os.ReadFile(cache)

	for _, tc := range []struct {
		name       string
		cfg        func() *controller.Config
		wantReason string
	}{
		{
			name: "invalid policy",
			cfg: func() *controller.Config {
				bad := policy.Parse("bad.yaml", []byte(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-port, namespace: bookinfo}
spec:
  rules: [{to: [{operation: {ports: ["http"]}}]}]
`)).Objects
				// deny-all comes in the same push: it must not be applied either.
				deny := policy.Parse("deny.yaml", []byte(streamDenyAll)).Objects
				return &controller.Config{Cluster: st, Policies: append(append(slices.Clone(good), deny...), bad...)}
			},
			wantReason: `AuthorizationPolicy bookinfo/bad-port: spec.rules[0].to[0].operation.ports[0]: "http" is not a port`,
		},
		{
			name: "workload without an address",
			cfg: func() *controller.Config {
				st2 := &cluster.State{Namespaces: st.Namespaces, Services: st.Services,
					Pods: append(slices.Clone(st.Pods), &cluster.Pod{Namespace: "bookinfo", Name: "broken", ServiceAccount: "x", IPs: []netip.Addr{{}}})}
				return &controller.Config{Cluster: st2, Policies: good}
			},
			wantReason: "workload bookinfo/broken: ips[0]: 0 bytes is not an IPv4 or IPv6 address",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, err := c.Config.Set(tc.cfg())
			if err != nil {
				t.Fatal(err)
			}
			streamWait(t, "the NACK logged by the controller", func() bool {
				l := c.Log.String()
				return strings.Contains(l, "agent rejected config") && strings.Contains(l, "node=node-2") && strings.Contains(l, strings.ReplaceAll(tc.wantReason, `"`, `\"`))
			}, c.Log, a.Log)
			if _, hv := a.Source.Version(); hv != goodVersion {
				t.Fatalf("agent holds version %d after NACKing %d; want %d", hv, v, goodVersion)
			}
			if policyKeys(a.Agent) != "PeerAuthentication bookinfo/default" || !allowed(a.Agent) || a.Policies().Workload("bookinfo", "broken") != nil {
				t.Fatalf("part of a NACKed push applied: %s", policyKeys(a.Agent))
			}
			if now, _ := os.ReadFile(cache); !bytes.Equal(now, cached) {
				t.Fatal("the cache changed after a NACK")
			}
		})
	}
	// Fixed: the next push is a delta from the last good version and applies.
	deny := policy.Parse("deny.yaml", []byte(streamDenyAll)).Objects
	c.Config.Set(&controller.Config{Cluster: st, Policies: append(slices.Clone(good), deny...)})
	streamWait(t, "the fixed config", func() bool { return !allowed(a.Agent) })
}

// streamSnapshot is a full push of n workloads on two nodes, with services and policies.
func streamSnapshot(tb testing.TB, n int) *api.Push {
	tb.Helper()
	st := &cluster.State{Namespaces: map[string]*cluster.Namespace{
		"bookinfo": {Name: "bookinfo", Labels: map[string]string{cluster.DataplaneModeLabel: cluster.DataplaneAmbient}},
	}}
	for i := 0; i < n; i++ {
		st.Pods = append(st.Pods, &cluster.Pod{
			Namespace: "bookinfo", Name: "pod-" + itoa(i), ServiceAccount: "sa-" + itoa(i%50),
			Node: []string{"node-1", "node-2"}[i%2], Labels: map[string]string{"app": "app-" + itoa(i%50), "version": "v1"},
			IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})}, Ready: true,
			NamedPorts: map[string]uint16{"http": 9080},
		})
	}
	for i := 0; i < 50; i++ {
		st.Services = append(st.Services, &cluster.Service{Namespace: "bookinfo", Name: "svc-" + itoa(i),
			ClusterIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 96, 0, byte(i)})}, Selector: map[string]string{"app": "app-" + itoa(i)},
			Ports: []cluster.ServicePort{{Protocol: "TCP", Port: 9080, TargetName: "http"}}})
	}
	objs := policy.Parse("p.yaml", []byte(strictBookinfo+"---\n"+zeroTrustL4)).Objects
	var cs controller.ConfigServer
	if _, err := cs.Set(&controller.Config{Cluster: st, Policies: objs}); err != nil {
		tb.Fatal(err)
	}
	// The stream's first push is what a raw subscriber gets; build it the same way.
	p := &api.Push{Epoch: cs.Epoch(), Version: cs.Version(), Full: true}
	for _, ns := range st.Namespaces {
		p.Resources = append(p.Resources, api.NamespaceResource(ns))
	}
	for _, pod := range st.Pods {
		p.Resources = append(p.Resources, api.WorkloadResource(st, pod))
	}
	for _, svc := range st.Services {
		p.Resources = append(p.Resources, api.ServiceResource(svc))
	}
	for _, o := range objs {
		r, err := api.PolicyResource(o)
		if err != nil {
			tb.Fatal(err)
		}
		p.Resources = append(p.Resources, r)
	}
	return p
}

func itoa(i int) string { return strconv.Itoa(i) }

func BenchmarkStreamSnapshot10k(b *testing.B) {
	p := streamSnapshot(b, 10000)
	data, err := proto.Marshal(p)
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("full snapshot of 10k workloads: %d resources, %d bytes", len(p.Resources), len(data))
	b.Run("encode", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			proto.Marshal(p)
		}
	})
	b.Run("decode+convert", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var q api.Push
			if err := proto.Unmarshal(data, &q); err != nil {
				b.Fatal(err)
			}
			if _, _, err := nextConfig(&heldConfig{entries: map[api.Key]heldEntry{}}, &q, policy.Options{}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("apply-to-agent", func(b *testing.B) {
		ca, err := identity.NewSelfSignedCA(identity.CAOptions{})
		if err != nil {
			b.Fatal(err)
		}
		mgr, err := identity.NewManager(identity.ManagerOptions{Issuer: ca, Log: slog.New(slog.DiscardHandler)})
		if err != nil {
			b.Fatal(err)
		}
		defer mgr.Close()
		a, err := New(Options{Node: "node-3", Certs: mgr, Log: slog.New(slog.DiscardHandler)})
		if err != nil {
			b.Fatal(err)
		}
		defer a.Close()
		s := &ControllerSource{Agent: a}
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			q := proto.Clone(p).(*api.Push)
			q.Version = uint64(i + 1)
			if err := s.apply(q, false); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestStreamPushLatency measures the stream alone: from ConfigServer.Set to the agent
// enforcing the change (push, convert, validate, apply, Ack), without the directory poll.
func TestStreamPushLatency(t *testing.T) {
	ca := newStreamCA(t)
	c := startStreamController(t, ca, "", "127.0.0.1:0")
	st, _ := cluster.Parse("cluster.yaml", []byte(streamCluster))
	strict := policy.Parse("strict.yaml", []byte(strictBookinfo)).Objects
	deny := policy.Parse("deny.yaml", []byte(streamDenyAll)).Objects
	c.Config.Set(&controller.Config{Cluster: st, Policies: strict})
	a := startStreamAgent(t, ca, "node-2", c.Addr, filepath.Join(t.TempDir(), "cache"))
	streamWait(t, "the snapshot", synced(a, "PeerAuthentication bookinfo/default"))
	var took []time.Duration
	for i := 0; i < 40; i++ {
		start := time.Now()
		if i%2 == 0 {
			c.Config.Set(&controller.Config{Cluster: st, Policies: append(slices.Clone(strict), deny...)})
			streamWait(t, "deny-all", func() bool { return !allowed(a.Agent) })
		} else {
			c.Config.Set(&controller.Config{Cluster: st, Policies: strict})
			streamWait(t, "allow", func() bool { return allowed(a.Agent) })
		}
		took = append(took, time.Since(start))
	}
	slices.Sort(took)
	t.Logf("ConfigServer.Set -> agent enforcing, %d changes (with disk cache): min %v, median %v, p95 %v, max %v", len(took),
		took[0].Round(10*time.Microsecond), took[len(took)/2].Round(10*time.Microsecond), took[len(took)*95/100].Round(10*time.Microsecond), took[len(took)-1].Round(10*time.Microsecond))
	if took[len(took)/2] > 100*time.Millisecond {
		t.Errorf("median %v; want well under 100ms", took[len(took)/2])
	}
}

// FuzzStreamPush feeds arbitrary pushes to the agent's conversion: it never panics, and
// what it accepts survives the cache round trip.
func FuzzStreamPush(f *testing.F) {
	seed, err := proto.Marshal(streamSnapshot(f, 3))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	delta, _ := proto.Marshal(&api.Push{Epoch: "e", Version: 2, BaseVersion: 1, Removed: []*api.ResourceKey{{Kind: api.Kind_KIND_WORKLOAD, Namespace: "bookinfo", Name: "pod-1"}}})
	f.Add(delta)
	f.Fuzz(func(t *testing.T, data []byte) {
		var p api.Push
		if err := proto.Unmarshal(data, &p); err != nil {
			return
		}
		empty := &heldConfig{epoch: "e", version: 1, entries: map[api.Key]heldEntry{}}
		next, _, err := nextConfig(empty, &p, policy.Options{})
		if err != nil {
			if next != nil {
				t.Fatal("a config returned with an error")
			}
			return
		}
		next.state()
		snap := next.snapshot()
		again, _, err := nextConfig(empty, snap, policy.Options{})
		if err != nil {
			t.Fatalf("the cached form of an accepted push is refused: %v", err)
		}
		if len(again.entries) != len(next.entries) {
			t.Fatalf("cache round trip: %d entries, want %d", len(again.entries), len(next.entries))
		}
	})
}

// A push from a controller replica that lags (a lower generation than the config held)
// is refused: reconnecting to it never rolls a change back. Unordered pushes (generation
// 0, a config directory) and newer ones apply.
func TestStreamRefusesAnOlderGeneration(t *testing.T) {
	cur := &heldConfig{epoch: "a", version: 3, generation: 100, entries: map[api.Key]heldEntry{}}
	for _, tc := range []struct {
		gen  uint64
		ok   bool
		want uint64
	}{{90, false, 0}, {0, true, 100}, {100, true, 100}, {120, true, 120}} {
		next, _, err := nextConfig(cur, &api.Push{Epoch: "b", Version: 1, Full: true, Generation: tc.gen}, policy.Options{})
		if tc.ok != (err == nil) || !tc.ok && !errors.Is(err, errOlder) {
			t.Fatalf("generation %d on top of 100: %v", tc.gen, err)
		}
		if tc.ok && next.generation != tc.want {
			t.Fatalf("generation %d: holds %d, want %d", tc.gen, next.generation, tc.want)
		}
	}
}

// streamWaypoint is a Gateway API waypoint; %d is its listener port.
const streamWaypoint = `
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: %d, protocol: HBONE}]
status:
  addresses: [{type: IPAddress, value: 10.96.0.20}, {type: Hostname, value: waypoint.bookinfo.svc.cluster.local}]
`

// agentGateways returns the Gateways of the cluster state the agent was last updated with.
func agentGateways(a *Agent) []*cluster.Gateway {
	a.updateMu.Lock()
	defer a.updateMu.Unlock()
	if a.lastState == nil {
		return nil
	}
	return a.lastState.Gateways
}

// TestStreamGatewayReachesAgent: a Gateway (a waypoint) goes from the controller's source
// to the agent's cluster state, changes, keeps its last good version while it is bad,
// and goes when it is deleted.
func TestStreamGatewayReachesAgent(t *testing.T) {
	ca, dir := newStreamCA(t), t.TempDir()
	writeConfig(t, dir, "cluster.yaml", streamCluster)
	writeConfig(t, dir, "waypoint.yaml", fmt.Sprintf(streamWaypoint, 15008))
	c := startStreamController(t, ca, dir, "127.0.0.1:0")
	a := startStreamAgent(t, ca, "node-2", c.Addr, "")

	hasPort := func(port uint16) func() bool {
		return func() bool {
			gws := agentGateways(a.Agent)
			return len(gws) == 1 && len(gws[0].Listeners) == 1 && gws[0].Listeners[0].Port == port
		}
	}
	streamWait(t, "the waypoint", hasPort(15008), c.Log, a.Log)
	want := &cluster.Gateway{Namespace: "bookinfo", Name: "waypoint", ClassName: cluster.WaypointClass,
		Listeners: []cluster.GatewayListener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
		Addresses: []netip.Addr{netip.MustParseAddr("10.96.0.20")}, Hostnames: []string{"waypoint.bookinfo.svc.cluster.local"},
		Source: filepath.Join(dir, "waypoint.yaml") + "#1"}
	if got := a.Source.current().state().Gateways; len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("agent decoded %+v, want %+v", got, want)
	}

	writeConfig(t, dir, "waypoint.yaml", fmt.Sprintf(streamWaypoint, 15009))
	streamWait(t, "the new listener port", hasPort(15009), c.Log, a.Log)

	// Bad: the controller keeps serving the last good version.
	_, before := a.Source.Version()
	writeConfig(t, dir, "waypoint.yaml", fmt.Sprintf(streamWaypoint, 70000))
	streamWait(t, "the controller to report the bad Gateway", func() bool {
		l := c.Log.String()
		return strings.Contains(l, "gateway bookinfo/waypoint: spec.listeners[0].port: 70000 is not a port") &&
			strings.Contains(l, "GATEWAY bookinfo/waypoint: keeping its last good version")
	}, c.Log)
	time.Sleep(300 * time.Millisecond)
	if _, v := a.Source.Version(); v != before || !hasPort(15009)() {
		t.Fatalf("after a bad Gateway: version %d -> %d, gateways %+v; want no change", before, v, agentGateways(a.Agent))
	}

	os.Remove(filepath.Join(dir, "waypoint.yaml"))
	streamWait(t, "the waypoint deleted", func() bool { _, v := a.Source.Version(); return v > before && len(agentGateways(a.Agent)) == 0 }, c.Log, a.Log)
}
