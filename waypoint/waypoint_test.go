package waypoint

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/tunnel"
)

// These tests run the real waypoint (New, Router, Serve) over real HBONE and mTLS on
// loopback addresses that stand for pod IPs: the waypoint pod is 127.0.0.3 (its HBONE
// listener), reviews 127.0.0.2 (real HTTP and TCP servers, not enrolled, so reached
// over plain TCP), and the clients frontend 127.0.0.4 and productpage 127.0.0.5, whose
// addresses only travel as the Forwarded source of their CONNECTs.

var (
	wpIP          = netip.MustParseAddr("127.0.0.3")
	reviewsIP     = netip.MustParseAddr("127.0.0.2")
	frontendIP    = netip.MustParseAddr("127.0.0.4")
	productpageIP = netip.MustParseAddr("127.0.0.5")
	// dbIP is a pod of another namespace, bound to no waypoint.
	dbIP = netip.MustParseAddr("127.0.0.6")
	// reviewsVIP is the Service's ClusterIP: only ever an :authority, never dialled.
	reviewsVIP = netip.MustParseAddr("10.96.0.2")
)

const (
	reviewsHTTPPort = 9080 // Service port "http"
	reviewsTCPPort  = 9000 // Service port "tcp-x"
	rbacDeniedBody  = "RBAC: access denied"
)

// wpClients are the client pods: their identity and address.
var wpClients = map[string]struct {
	id spiffeid.ID
	ip netip.Addr
}{
	"frontend":    {spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/frontend"), frontendIP},
	"productpage": {spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/productpage"), productpageIP},
}

// wpEnv is a running waypoint with its cluster and the client side of HBONE.
type wpEnv struct {
	t    *testing.T
	w    *Waypoint
	addr netip.AddrPort // the waypoint's HBONE listener
	pool *tunnel.Pool
	// httpPort and tcpPort are the reviews pod's listening ports.
	httpPort, tcpPort uint16
	srcPort           atomic.Uint32
}

// newWPEnv starts the reviews servers, a CA, the waypoint with popts, fed with the
// bookinfo cluster, serving on 127.0.0.3, and a client pool.
func newWPEnv(t *testing.T, popts policy.Options) *wpEnv {
	t.Helper()
	e := &wpEnv{t: t}
	e.srcPort.Store(40000)
	e.httpPort = reviewsHTTP(t)
	e.tcpPort = reviewsTCP(t)

	log := slog.New(slog.DiscardHandler)
	ca, err := identity.NewSelfSignedCA(identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// The waypoint and the clients each have their own certificate manager (their own
	// keys), sharing the CA.
	wpCerts, err := identity.NewManager(identity.ManagerOptions{Issuer: ca, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wpCerts.Close() })
	clientCerts, err := identity.NewManager(identity.ManagerOptions{Issuer: ca, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { clientCerts.Close() })

	w, err := New(Options{Namespace: "bookinfo", Name: "waypoint", ServiceAccount: "waypoint", PodIP: wpIP,
		TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"), Policy: popts, Certs: wpCerts, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	e.w = w
	if want := "spiffe://cluster.local/ns/bookinfo/sa/waypoint"; w.ID().String() != want {
		t.Fatalf("waypoint ID %s, want %s", w.ID(), want)
	}
	if err := w.Router().Ready(); err == nil {
		t.Fatal("Ready before any config")
	}
	w.Router().Update(e.state())
	if err := w.Router().Ready(); err != nil {
		t.Fatalf("Ready: %v", err)
	}

	lis, err := net.Listen("tcp", netip.AddrPortFrom(wpIP, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	e.addr = netip.MustParseAddrPort(lis.Addr().String())
	served := make(chan error, 1)
	go func() { served <- w.Serve(lis) }()
	t.Cleanup(func() {
		w.Close()
		lis.Close()
		<-served
	})

	e.pool = &tunnel.Pool{
		TLSConfig: func(ctx context.Context, k tunnel.Key) (*tls.Config, error) {
			c, err := clientCerts.Get(ctx, k.Src)
			if err != nil {
				return nil, err
			}
			return identity.ClientConfig(c, k.Dst, clientCerts), nil
		},
		ConnectTimeout:  5 * time.Second,
		ResponseTimeout: 5 * time.Second,
		Log:             log,
	}
	t.Cleanup(func() { e.pool.Close() })
	return e
}

// state is the bookinfo cluster: namespace bookinfo bound to waypoint (waypoint-for
// all), the waypoint pod, reviews with its Service, the two clients, and other/db,
// bound to nothing. Nothing is enrolled.
func (e *wpEnv) state() *cluster.State {
	pod := func(ns, name, sa string, ip netip.Addr, labels map[string]string) *cluster.Pod {
		return &cluster.Pod{Namespace: ns, Name: name, ServiceAccount: sa, Node: "node-1", Labels: labels,
			IPs: []netip.Addr{ip}, Ready: true}
	}
	return &cluster.State{
		Namespaces: map[string]*cluster.Namespace{
			"bookinfo": {Name: "bookinfo", Labels: map[string]string{cluster.UseWaypointLabel: "waypoint"}},
			"other":    {Name: "other", Labels: map[string]string{}},
		},
		Gateways: []*cluster.Gateway{{
			Namespace: "bookinfo", Name: "waypoint", ClassName: cluster.WaypointClass,
			Labels:    map[string]string{cluster.WaypointForLabel: cluster.WaypointForAll},
			Listeners: []cluster.GatewayListener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
			Addresses: []netip.Addr{wpIP},
		}},
		Pods: []*cluster.Pod{
			pod("bookinfo", "waypoint", "waypoint", wpIP, map[string]string{cluster.GatewayNameLabel: "waypoint"}),
			pod("bookinfo", "reviews", "reviews", reviewsIP, map[string]string{"app": "reviews"}),
			pod("bookinfo", "frontend", "frontend", frontendIP, map[string]string{"app": "frontend"}),
			pod("bookinfo", "productpage", "productpage", productpageIP, map[string]string{"app": "productpage"}),
			pod("other", "db", "db", dbIP, map[string]string{"app": "db"}),
		},
		Services: []*cluster.Service{{
			Namespace: "bookinfo", Name: "reviews", ClusterIPs: []netip.Addr{reviewsVIP},
			Selector: map[string]string{"app": "reviews"},
			Ports: []cluster.ServicePort{
				{Name: "http", Protocol: "TCP", Port: reviewsHTTPPort, TargetPort: e.httpPort},
				{Name: "tcp-x", Protocol: "TCP", Port: reviewsTCPPort, TargetPort: e.tcpPort},
			},
		}},
	}
}

// reviewsHTTP is the reviews pod's HTTP server on 127.0.0.2: it answers "reviews
// <method> <request-URI>", with header Saw-Authorization saying whether the request
// carried an Authorization header.
func reviewsHTTP(t *testing.T) uint16 {
	t.Helper()
	lis, err := net.Listen("tcp", netip.AddrPortFrom(reviewsIP, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Saw-Authorization", strconv.FormatBool(r.Header.Get("Authorization") != ""))
		fmt.Fprintf(w, "reviews %s %s", r.Method, r.RequestURI)
	}))
	srv.Listener.Close()
	srv.Listener = lis
	srv.Start()
	t.Cleanup(srv.Close)
	return netip.MustParseAddrPort(lis.Addr().String()).Port()
}

// reviewsTCP is a raw TCP echo server on 127.0.0.2.
func reviewsTCP(t *testing.T) uint16 {
	t.Helper()
	lis, err := net.Listen("tcp", netip.AddrPortFrom(reviewsIP, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	t.Cleanup(func() {
		lis.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				io.Copy(c, c)
				c.Close()
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
			}()
		}
	}()
	return netip.MustParseAddrPort(lis.Addr().String()).Port()
}

// open opens an HBONE stream to the waypoint as peer (its certificate), asking for
// authority with src as the Forwarded source.
func (e *wpEnv) open(peer string, authority netip.AddrPort, src netip.Addr) (*tunnel.Stream, error) {
	e.t.Helper()
	c, ok := wpClients[peer]
	if !ok {
		e.t.Fatalf("no client %q", peer)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	source := netip.AddrPortFrom(src, uint16(e.srcPort.Add(1)))
	return e.pool.Open(ctx, tunnel.Key{Src: c.id, Dst: e.w.ID(), Addr: e.addr}, tunnel.Target{Authority: authority, Source: source})
}

// wpReply is an HTTP response read through the waypoint.
type wpReply struct {
	status int
	header http.Header
	body   string
}

func (r wpReply) String() string { return fmt.Sprintf("%d %q", r.status, r.body) }

// do sends one HTTP/1.1 request from peer (at its own address) to authority through
// the waypoint. extra are header lines ("Name: value").
func (e *wpEnv) do(peer string, authority netip.AddrPort, method, target string, extra ...string) wpReply {
	e.t.Helper()
	st, err := e.open(peer, authority, wpClients[peer].ip)
	if err != nil {
		e.t.Fatalf("%s: CONNECT %s: %v", peer, authority, err)
	}
	defer st.Close()
	// The stream has no deadlines: a stuck exchange is cut by closing it.
	stop := time.AfterFunc(10*time.Second, func() { st.Close() })
	defer stop.Stop()
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: reviews.bookinfo.svc.cluster.local:%d\r\n", method, target, authority.Port())
	for _, h := range extra {
		b.WriteString(h + "\r\n")
	}
	if method == http.MethodPost || method == http.MethodPut {
		b.WriteString("Content-Length: 0\r\n")
	}
	b.WriteString("Connection: close\r\n\r\n")
	if _, err := io.WriteString(st, b.String()); err != nil {
		e.t.Fatalf("%s %s %s: write: %v", peer, method, target, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(st), &http.Request{Method: method})
	if err != nil {
		e.t.Fatalf("%s %s %s: %v", peer, method, target, err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatalf("%s %s %s: body: %v", peer, method, target, err)
	}
	return wpReply{status: resp.StatusCode, header: resp.Header, body: string(body)}
}

// apply parses YAML policies and gives them to the waypoint.
func (e *wpEnv) apply(yaml string) []*policy.Object {
	e.t.Helper()
	m := policy.Parse("test.yaml", []byte(yaml))
	if len(m.Errors) > 0 || len(m.Objects) == 0 {
		e.t.Fatalf("parse: %v (%d objects)", m.Errors, len(m.Objects))
	}
	if err := e.w.Router().ApplyPolicies(m.Objects, nil); err != nil {
		e.t.Fatalf("ApplyPolicies: %v", err)
	}
	return m.Objects
}

// remove deletes objects from the waypoint's policies.
func (e *wpEnv) remove(objs []*policy.Object) {
	e.t.Helper()
	keys := make([]policy.Key, len(objs))
	for i, o := range objs {
		keys[i] = o.Key()
	}
	if err := e.w.Router().ApplyPolicies(nil, keys); err != nil {
		e.t.Fatalf("ApplyPolicies(delete): %v", err)
	}
}

// expect checks one request's status and exact body.
func (e *wpEnv) expect(peer string, authority netip.AddrPort, method, target string, status int, body string, extra ...string) wpReply {
	e.t.Helper()
	r := e.do(peer, authority, method, target, extra...)
	if r.status != status || r.body != body {
		e.t.Errorf("%s %s %s%s: got %s, want %d %q", peer, method, authority, target, r, status, body)
	}
	return r
}

// connectStatus is the HBONE status of a CONNECT: 200, or the StatusError's code.
func connectStatus(t *testing.T, st *tunnel.Stream, err error) int {
	t.Helper()
	if err == nil {
		st.Close()
		return http.StatusOK
	}
	var se *tunnel.StatusError
	if !errors.As(err, &se) {
		t.Fatalf("CONNECT failed without a status: %v", err)
	}
	return se.Code
}

var reviewsSvc = netip.AddrPortFrom(reviewsVIP, reviewsHTTPPort)

// The waypoint is not an open relay: a CONNECT for an address or port not bound to it is
// answered 503 before any byte flows.
func TestWaypointNotOpenRelay(t *testing.T) {
	e := newWPEnv(t, policy.Options{})
	for _, tc := range []struct {
		name      string
		authority netip.AddrPort
		want      int
	}{
		{"bound VIP and port", reviewsSvc, 200},
		{"bound pod", netip.AddrPortFrom(reviewsIP, e.httpPort), 200},
		{"unknown VIP", netip.MustParseAddrPort("10.96.0.99:80"), 503},
		{"bound VIP, port the Service lacks", netip.AddrPortFrom(reviewsVIP, 8080), 503},
		{"bound VIP, target port instead of service port", netip.AddrPortFrom(reviewsVIP, e.httpPort), 503},
		{"pod of an unbound namespace", netip.AddrPortFrom(dbIP, 5432), 503},
		{"the waypoint itself", netip.AddrPortFrom(wpIP, 15008), 503},
		{"loopback", netip.MustParseAddrPort("127.0.0.1:22"), 503},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := e.open("frontend", tc.authority, frontendIP)
			if got := connectStatus(t, st, err); got != tc.want {
				t.Fatalf("CONNECT %s: %d (%v), want %d", tc.authority, got, err, tc.want)
			}
		})
	}
	// The accepted ones really reach reviews.
	e.expect("frontend", reviewsSvc, "GET", "/r", 200, "reviews GET /r")
	e.expect("frontend", netip.AddrPortFrom(reviewsIP, e.httpPort), "GET", "/p", 200, "reviews GET /p")
}

// The Forwarded source must belong to the peer: a client cannot have the waypoint act
// for another pod (confused deputy), nor for an address no pod owns.
func TestWaypointConfusedDeputy(t *testing.T) {
	e := newWPEnv(t, policy.Options{})
	for _, tc := range []struct {
		name string
		peer string
		src  netip.Addr
		want int
	}{
		{"own address", "frontend", frontendIP, 200},
		{"own address, other client", "productpage", productpageIP, 200},
		{"another pod's address", "frontend", productpageIP, 401},
		{"the other way round", "productpage", frontendIP, 401},
		{"the destination's address", "frontend", reviewsIP, 401},
		{"the waypoint's address", "frontend", wpIP, 401},
		{"an address no pod owns", "frontend", netip.MustParseAddr("127.0.0.99"), 401},
		{"unknown address, IPv6", "frontend", netip.MustParseAddr("::1"), 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := e.open(tc.peer, reviewsSvc, tc.src)
			if got := connectStatus(t, st, err); got != tc.want {
				t.Fatalf("%s with source %s: %d (%v), want %d", tc.peer, tc.src, got, err, tc.want)
			}
		})
	}
}

const reviewsAllowFrontendGET = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-frontend-get
  namespace: bookinfo
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/bookinfo/sa/frontend"]
    to:
    - operation:
        methods: ["GET"]
`

// Under veil's placement (the default) the waypoint enforces the policies that select
// the endpoint, with the real client's identity; under Istio's it ignores them.
func TestWaypointPlacement(t *testing.T) {
	t.Run("veil", func(t *testing.T) {
		e := newWPEnv(t, policy.Options{})
		e.apply(reviewsAllowFrontendGET)
		e.expect("frontend", reviewsSvc, "GET", "/reviews/1", 200, "reviews GET /reviews/1")
		r := e.expect("frontend", reviewsSvc, "POST", "/reviews/1", 403, rbacDeniedBody)
		if ct := r.header.Get("Content-Type"); ct != "text/plain" {
			t.Errorf("denial Content-Type %q, want text/plain", ct)
		}
		e.expect("productpage", reviewsSvc, "GET", "/reviews/1", 403, rbacDeniedBody)
		// Workload traffic (to the pod's address) is judged the same way.
		pod := netip.AddrPortFrom(reviewsIP, e.httpPort)
		e.expect("frontend", pod, "GET", "/reviews/2", 200, "reviews GET /reviews/2")
		e.expect("productpage", pod, "GET", "/reviews/2", 403, rbacDeniedBody)
	})
	t.Run("istio", func(t *testing.T) {
		e := newWPEnv(t, policy.Options{Placement: policy.PlacementIstio})
		e.apply(reviewsAllowFrontendGET)
		e.expect("frontend", reviewsSvc, "GET", "/reviews/1", 200, "reviews GET /reviews/1")
		e.expect("frontend", reviewsSvc, "POST", "/reviews/1", 200, "reviews POST /reviews/1")
		e.expect("productpage", reviewsSvc, "GET", "/reviews/1", 200, "reviews GET /reviews/1")
	})
}

const waypointAllowProductpage = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: waypoint-productpage
  namespace: bookinfo
spec:
  targetRefs:
  - kind: Gateway
    group: gateway.networking.k8s.io
    name: waypoint
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/bookinfo/sa/productpage"]
`

const reviewsAllowFrontend = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-frontend
  namespace: bookinfo
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/bookinfo/sa/frontend"]
`

// The waypoint's targetRefs policies and the endpoint's selector policies are two
// decisions that must both allow: their ALLOW rules are never OR'ed into one.
func TestWaypointTwoDecisions(t *testing.T) {
	t.Run("veil", func(t *testing.T) {
		e := newWPEnv(t, policy.Options{})
		e.apply(waypointAllowProductpage + "---" + reviewsAllowFrontend)
		e.expect("frontend", reviewsSvc, "GET", "/", 403, rbacDeniedBody)
		e.expect("productpage", reviewsSvc, "GET", "/", 403, rbacDeniedBody)
	})
	// Istio's placement keeps only the Gateway's: productpage passes, which also shows
	// the targetRefs policy is attached.
	t.Run("istio", func(t *testing.T) {
		e := newWPEnv(t, policy.Options{Placement: policy.PlacementIstio})
		e.apply(waypointAllowProductpage + "---" + reviewsAllowFrontend)
		e.expect("frontend", reviewsSvc, "GET", "/", 403, rbacDeniedBody)
		e.expect("productpage", reviewsSvc, "GET", "/", 200, "reviews GET /")
	})
}

// wpJWTKey signs the test's tokens; its JWKS is inlined in the RequestAuthentications.
type wpJWTKey struct {
	priv *rsa.PrivateKey
	jwks string
}

const wpIssuer = "https://issuer.veil.test"

func newWPJWTKey(t *testing.T) *wpJWTKey {
	t.Helper()
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := jwk.FromRaw(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Set(jwk.KeyIDKey, "k1"); err != nil {
		t.Fatal(err)
	}
	if err := pub.Set(jwk.AlgorithmKey, jwa.RS256); err != nil {
		t.Fatal(err)
	}
	set := jwk.NewSet()
	if err := set.AddKey(pub); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	return &wpJWTKey{priv: priv, jwks: string(b)}
}

// token is a valid RS256 token of the issuer for sub, expiring in an hour.
func (k *wpJWTKey) token(t *testing.T, sub string) string {
	t.Helper()
	now := time.Now()
	payload, err := json.Marshal(map[string]any{"iss": wpIssuer, "sub": sub, "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()})
	if err != nil {
		t.Fatal(err)
	}
	hdr := jws.NewHeaders()
	if err := hdr.Set(jws.KeyIDKey, "k1"); err != nil {
		t.Fatal(err)
	}
	if err := hdr.Set(jws.TypeKey, "JWT"); err != nil {
		t.Fatal(err)
	}
	tok, err := jws.Sign(payload, jws.WithKey(jwa.RS256, k.priv, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		t.Fatal(err)
	}
	return string(tok)
}

// tamper changes one character in the middle of a token's signature.
func tamper(tok string) string {
	i := strings.LastIndexByte(tok, '.') + 20
	c := byte('A')
	if tok[i] == 'A' {
		c = 'B'
	}
	return tok[:i] + string(c) + tok[i+1:]
}

// requestAuthn is a RequestAuthentication of the key's issuer attached by attach (a
// selector or targetRefs block, indented for spec).
func (k *wpJWTKey) requestAuthn(name, attach string) string {
	return fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: %s
  namespace: bookinfo
spec:
%s
  jwtRules:
  - issuer: %q
    jwks: '%s'
`, name, attach, wpIssuer, k.jwks)
}

// requireJWT is a DENY of requests without a verified token, attached by attach.
func requireJWT(name, attach string) string {
	return fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: %s
  namespace: bookinfo
spec:
%s
  action: DENY
  rules:
  - from:
    - source:
        notRequestPrincipals: ["*"]
`, name, attach)
}

const (
	onReviews = `  selector:
    matchLabels:
      app: reviews`
	onWaypoint = `  targetRefs:
  - kind: Gateway
    group: gateway.networking.k8s.io
    name: waypoint`
)

// RequestAuthentication is applied at the waypoint, in Envoy's order before
// AuthorizationPolicy: a bad token is 401 with Envoy's body and WWW-Authenticate, a
// missing one is left to the policies (here a DENY: 403).
func TestWaypointRequestAuthentication(t *testing.T) {
	k := newWPJWTKey(t)
	good := k.token(t, "alice")
	check := func(t *testing.T, e *wpEnv) {
		t.Helper()
		r := e.expect("frontend", reviewsSvc, "GET", "/reviews/1", 200, "reviews GET /reviews/1", "Authorization: Bearer "+good)
		// forwardOriginalToken is false: the verified token is not forwarded.
		if v := r.header.Get("Saw-Authorization"); v != "false" {
			t.Errorf("valid token: the endpoint saw Authorization: %q, want false", v)
		}
		r = e.expect("frontend", reviewsSvc, "GET", "/reviews/1", 401, "Jwt verification fails", "Authorization: Bearer "+tamper(good))
		if h := r.header.Get("WWW-Authenticate"); !strings.HasPrefix(h, "Bearer realm=") {
			t.Errorf("bad token: WWW-Authenticate %q, want Bearer realm=...", h)
		}
		e.expect("frontend", reviewsSvc, "GET", "/reviews/1", 403, rbacDeniedBody)
	}
	t.Run("selector", func(t *testing.T) {
		e := newWPEnv(t, policy.Options{})
		e.apply(k.requestAuthn("jwt", onReviews) + "---" + requireJWT("require-jwt", onReviews))
		check(t, e)
	})
	t.Run("targetRefs", func(t *testing.T) {
		e := newWPEnv(t, policy.Options{})
		e.apply(k.requestAuthn("jwt", onWaypoint) + "---" + requireJWT("require-jwt", onWaypoint))
		check(t, e)
	})
	t.Run("targetRefs under Istio placement", func(t *testing.T) {
		e := newWPEnv(t, policy.Options{Placement: policy.PlacementIstio})
		e.apply(k.requestAuthn("jwt", onWaypoint) + "---" + requireJWT("require-jwt", onWaypoint))
		check(t, e)
	})
	// Each decision uses its own RequestAuthentications: a token verified only by the
	// Gateway's is no principal for the endpoint's policies.
	t.Run("token verified by the other decision only", func(t *testing.T) {
		e := newWPEnv(t, policy.Options{})
		e.apply(k.requestAuthn("jwt", onWaypoint) + "---" + requireJWT("require-jwt", onReviews))
		e.expect("frontend", reviewsSvc, "GET", "/reviews/1", 403, rbacDeniedBody, "Authorization: Bearer "+good)
	})
	// Both decisions authenticate the request as the client sent it: the first one's
	// removal of the token (forwardOriginalToken false) must not hide it from the second.
	t.Run("both decisions", func(t *testing.T) {
		e := newWPEnv(t, policy.Options{})
		e.apply(k.requestAuthn("jwt-waypoint", onWaypoint) + "---" + requireJWT("require-jwt-waypoint", onWaypoint) + "---" +
			k.requestAuthn("jwt-reviews", onReviews) + "---" + requireJWT("require-jwt-reviews", onReviews))
		check(t, e)
	})
}

const reviewsDenyGET = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-deny-get
  namespace: bookinfo
spec:
  selector:
    matchLabels:
      app: reviews
  action: DENY
  rules:
  - to:
    - operation:
        methods: ["GET"]
`

// tcpExchange opens a TCP stream to the reviews Service's tcp-x port and sends a line:
// the line echoed back, or what ended the stream.
func (e *wpEnv) tcpExchange(line string) (string, error) {
	e.t.Helper()
	st, err := e.open("frontend", netip.AddrPortFrom(reviewsVIP, reviewsTCPPort), frontendIP)
	if err != nil {
		e.t.Fatalf("CONNECT tcp-x: %v", err)
	}
	defer st.Close()
	stop := time.AfterFunc(10*time.Second, func() { st.Close() })
	defer stop.Stop()
	if _, err := io.WriteString(st, line); err != nil {
		return "", err
	}
	got := make([]byte, len(line))
	n, err := io.ReadFull(st, got)
	return string(got[:n]), err
}

// A port that carries TCP is judged with Envoy's TCP semantics: a DENY rule whose only
// condition is an HTTP method denies every connection; with no policy the bytes flow.
func TestWaypointTCPSemantics(t *testing.T) {
	e := newWPEnv(t, policy.Options{})
	const line = "hello over tcp\n"
	if got, err := e.tcpExchange(line); err != nil || got != line {
		t.Fatalf("no policy: echoed %q, %v; want %q", got, err, line)
	}
	objs := e.apply(reviewsDenyGET)
	got, err := e.tcpExchange(line)
	if got != "" || err == nil {
		t.Fatalf("DENY methods GET on a TCP port: read %q, %v; want the stream refused without data", got, err)
	}
	t.Logf("refused TCP stream: %v", err)
	var reset *tunnel.StreamResetError
	if !errors.As(err, &reset) && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("refused stream ended with %v, want a reset or a close", err)
	}
	// The same policy at HTTP denies only GETs.
	e.expect("frontend", reviewsSvc, "GET", "/", 403, rbacDeniedBody)
	e.expect("frontend", reviewsSvc, "POST", "/", 200, "reviews POST /")
	e.remove(objs)
	if got, err := e.tcpExchange(line); err != nil || got != line {
		t.Fatalf("policy removed: echoed %q, %v; want %q", got, err, line)
	}
}

const reviewsAllowPaths = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-paths
  namespace: bookinfo
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/bookinfo/sa/frontend"]
    to:
    - operation:
        paths: ["/reviews/*"]
`

// Paths are normalized before policies see them, and forwarded as normalized: dot
// segments cannot smuggle a request past a path rule.
func TestWaypointPathNormalization(t *testing.T) {
	e := newWPEnv(t, policy.Options{})
	e.apply(reviewsAllowPaths)
	e.expect("frontend", reviewsSvc, "GET", "/reviews/../ratings/1", 403, rbacDeniedBody)
	e.expect("frontend", reviewsSvc, "GET", "/reviews/./1", 200, "reviews GET /reviews/1")
	e.expect("frontend", reviewsSvc, "GET", "/reviews/1", 200, "reviews GET /reviews/1")
	e.expect("frontend", reviewsSvc, "GET", "/ratings/1", 403, rbacDeniedBody)
	e.expect("productpage", reviewsSvc, "GET", "/reviews/1", 403, rbacDeniedBody)
}

// A client's copy of a header a RequestAuthentication outputs is removed before
// authorization sees the request: a policy on that header cannot be satisfied by
// sending it (review finding: authorization saw the headers before the JWT filter).
func TestWaypointOutputHeaderNotSpoofable(t *testing.T) {
	e := newWPEnv(t, policy.Options{})
	k := newWPJWTKey(t)
	e.apply(fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: group-header, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  jwtRules:
  - issuer: %q
    jwks: '%s'
    outputClaimToHeaders: [{header: x-jwt-group, claim: group}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admins-only, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - when: [{key: "request.headers[x-jwt-group]", values: [admin]}]
`, wpIssuer, k.jwks))
	e.expect("frontend", reviewsSvc, "GET", "/", 403, rbacDeniedBody, "X-Jwt-Group: admin")
	e.expect("frontend", reviewsSvc, "GET", "/", 403, rbacDeniedBody, "X-Jwt-Group: admin", "Authorization: Bearer "+k.token(t, "alice"))
}

// CUSTOM policies deny (veil calls no external authorizer) wherever they attach: by
// targetRefs to the Service being served, and on TCP ports (review findings).
func TestWaypointCustomDenies(t *testing.T) {
	const custom = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: CUSTOM
  provider: {name: my-ext-authz}
  rules: [{}]
`
	for _, popts := range []policy.Options{{}, {Placement: policy.PlacementIstio}} {
		e := newWPEnv(t, popts)
		e.apply(custom)
		e.expect("frontend", reviewsSvc, "GET", "/", 403, rbacDeniedBody)
		if got, err := e.tcpExchange("hello\n"); err == nil {
			t.Errorf("placement %q: CUSTOM on a TCP port: echoed %q; want the stream refused", popts.Placement, got)
		}
	}
}
