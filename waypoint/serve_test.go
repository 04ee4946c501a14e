package waypoint

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/tunnel"
)

// echoBackend copies what it reads back, line by line, upper-cased.
func echoBackend(t testing.TB) netip.AddrPort {
	return rawBackend(t, func(c net.Conn, br *bufio.Reader) {
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			io.WriteString(c, strings.ToUpper(l))
		}
	})
}

// A TCP route is decided once and spliced; a refusal resets the stream.
func TestTCPRoute(t *testing.T) {
	up := echoBackend(t)
	allow := true
	var mu sync.Mutex
	ps := startProxy(t, &Proxy{}, route(ProtocolTCP, func(*http.Request) netip.AddrPort {
		mu.Lock()
		defer mu.Unlock()
		if !allow {
			return netip.AddrPort{}
		}
		return up
	}))
	cl := dialProxy(t, ps)
	cl.send("GET / HTTP/1.1\r\n") // not parsed: TCP is opaque
	if l, err := cl.br.ReadString('\n'); l != "GET / HTTP/1.1\r\n" {
		t.Fatalf("%q %v", l, err)
	}
	mu.Lock()
	allow = false
	mu.Unlock()
	// The refusal resets the connection at once: the reset may even beat the dial's
	// return (ECONNRESET from connect on loopback).
	if c, err := net.Dial("tcp", ps.addr); err == nil {
		c.SetDeadline(time.Now().Add(20 * time.Second))
		denied := &client{t: t, c: c, br: bufio.NewReader(c)}
		if !denied.closed() {
			t.Fatal("a denied TCP stream stayed open")
		}
		c.Close()
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatal(err)
	}
	if ps.decided.Load() != 0 {
		t.Fatal("Decide called for TCP")
	}
}

// ProtocolAuto sniffs: an HTTP/1.1 request line or the HTTP/2 preface is HTTP, anything
// else is TCP with every byte passed on.
func TestAutoSniffsTCP(t *testing.T) {
	up := echoBackend(t)
	ps := startProxy(t, &Proxy{}, route(ProtocolAuto, to(up)))
	for _, first := range []string{"hello\n", "\x16\x03\x01\x00\x05hi\n", "PRIVATE data\n", "GET\n", "GET /x HTTX/1.1\n"} {
		cl := dialProxy(t, ps)
		cl.send(first)
		l, err := cl.br.ReadString('\n')
		if err != nil || l != strings.ToUpper(first) {
			t.Errorf("%q: read %q, %v", first, l, err)
		}
	}
	if ps.decided.Load() != 0 {
		t.Error("Decide called for TCP")
	}
}

// Sniffing decides as soon as the bytes allow, even for a short first write.
func TestLooksLikeHTTP1(t *testing.T) {
	for in, want := range map[string]int{
		"G": 0, "GET": 0, "GET ": 0, "GET /": 0, "GET / ": 0, "GET / HTTP/1.": 0, "GET / HTTP/1.1\r": 0,
		"GET / HTTP/1.1\r\n": 1, "M-SEARCH * HTTP/1.1\r\n": 1,
		"\x16\x03": -1, " GET": -1, "GET  /": -1, "GET / X": -1, "GET / HTTP/2.0\r\n": -1, "GET / HTTP/1.1\n": 0, "GET / HTTP/1.1\nX": -1,
		strings.Repeat("A", 40): -1,
	} {
		if got := looksLikeHTTP1([]byte(in)); got != want {
			t.Errorf("%q: %d, want %d", in, got, want)
		}
	}
}

// Requests are counted with Istio's names and labels, the endpoint's workload when
// Decide names it, and the response code.
func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewMetrics(reg); err == nil {
		t.Fatal("registering twice succeeded")
	}
	up := backend(t, whoami("app"))
	ps := startProxy(t, &Proxy{Metrics: m}, func(*proxyServer) *Route {
		return &Route{Protocol: ProtocolHTTP1,
			Decide: func(r *http.Request) (Upstream, *Response) {
				if r.URL.Path == "/denied" {
					return Upstream{}, &Response{Status: 403, Body: "RBAC: access denied"}
				}
				return Upstream{Addr: up, Workload: &Workload{Name: "reviews-v1-abc", Namespace: "bookinfo", Principal: "spiffe://cluster.local/ns/bookinfo/sa/reviews"}}, nil
			},
			Labels: MetricLabels{SourceWorkload: "productpage-v1-xyz", SourceNamespace: "bookinfo", SourcePrincipal: "spiffe://cluster.local/ns/bookinfo/sa/productpage",
				DestinationService: "reviews.bookinfo.svc.cluster.local", DestinationServiceName: "reviews", DestinationServiceNS: "bookinfo", ConnectionSecurityLabel: "mutual_tls"},
		}
	})
	cl := dialProxy(t, ps)
	cl.get("/ok")
	cl.get("/ok")
	cl.get("/denied")
	cl.send("GET / HTTP/1.0\r\n\r\n")
	cl.response("GET")
	labels := func(code, dw, flags string) prometheus.Labels {
		l := prometheus.Labels{"reporter": "waypoint", "source_workload": "productpage-v1-xyz", "source_workload_namespace": "bookinfo",
			"source_principal": "spiffe://cluster.local/ns/bookinfo/sa/productpage", "source_canonical_service": "unknown",
			"destination_workload": "unknown", "destination_workload_namespace": "unknown", "destination_principal": "unknown", "destination_canonical_service": "unknown",
			"destination_service": "reviews.bookinfo.svc.cluster.local", "destination_service_name": "reviews", "destination_service_namespace": "bookinfo",
			"connection_security_policy": "mutual_tls", "request_protocol": "http", "response_code": code, "grpc_response_status": "-", "response_flags": flags}
		if dw != "" {
			l["destination_workload"], l["destination_workload_namespace"], l["destination_principal"] = dw, "bookinfo", "spiffe://cluster.local/ns/bookinfo/sa/reviews"
		}
		return l
	}
	for _, tc := range []struct {
		l    prometheus.Labels
		want float64
	}{
		{labels("200", "reviews-v1-abc", "-"), 2},
		{labels("403", "", "-"), 1},
		{labels("426", "", "-"), 1},
	} {
		if got := testutil.ToFloat64(m.requests.With(tc.l)); got != tc.want {
			t.Errorf("istio_requests_total%v = %v, want %v", tc.l, got, tc.want)
		}
	}
	if n := testutil.CollectAndCount(m.duration, "istio_request_duration_milliseconds"); n != 3 {
		t.Errorf("%d duration series, want 3", n)
	}
	m.Forget("bookinfo", "reviews-v1-abc")
	if n := testutil.CollectAndCount(m.requests, "istio_requests_total"); n != 2 {
		t.Errorf("%d series after Forget, want 2", n)
	}
}

// The proxy serves an HBONE stream taken with tunnel.Take: the client's CONNECT carries
// HTTP/1.1 to the waypoint, which forwards it.
func TestServeOverHBONE(t *testing.T) {
	ca, err := identity.NewSelfSignedCA(identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	mgr, err := identity.NewManager(identity.ManagerOptions{Issuer: ca, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	defer mgr.Close()
	client := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/productpage")
	waypoint := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/waypoint")
	bundle := x509bundle.NewSet(x509bundle.FromX509Authorities(ca.TrustDomain(), ca.Roots()))
	up := backend(t, whoami("reviews"))
	p := &Proxy{}
	var serving sync.WaitGroup
	srv := &tunnel.Server{
		TLSConfig: identity.ServerConfig(func(net.Addr) (spiffeid.ID, bool) { return waypoint, true }, mgr, bundle),
		Handler: tunnel.HandlerFunc(func(ctx context.Context, req *tunnel.Request) (net.Conn, error) {
			if req.Peer != client {
				return nil, tunnel.Denied(nil)
			}
			rt := &Route{Protocol: ProtocolHTTP1, Decide: func(r *http.Request) (Upstream, *Response) {
				if r.RemoteAddr != req.Source.String() {
					return Upstream{}, &Response{Status: 403, Body: "wrong source " + r.RemoteAddr}
				}
				return Upstream{Addr: up}, nil
			}}
			serving.Add(1)
			return tunnel.Take(func(c net.Conn) {
				defer serving.Done()
				p.Serve(context.Background(), c, rt)
			}), nil
		}),
		Log: log,
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Close()
	p.Dial = (&dialer{}).dial
	pool := &tunnel.Pool{TLSConfig: func(ctx context.Context, k tunnel.Key) (*tls.Config, error) {
		c, err := mgr.Get(ctx, k.Src)
		if err != nil {
			return nil, err
		}
		return identity.ClientConfig(c, k.Dst, bundle), nil
	}}
	defer pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	wpAddr := netip.MustParseAddrPort(lis.Addr().String())
	vip := netip.AddrPortFrom(wpAddr.Addr(), 9080)
	src := netip.MustParseAddrPort("10.1.0.7:40000")
	st, err := pool.Connect(ctx, tunnel.Key{Src: client, Dst: waypoint, Addr: wpAddr}, vip, src)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(st)
	for i := range 2 {
		io.WriteString(st, "GET /reviews/../reviews/1 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || string(b) != "reviews HTTP/1.1 /reviews/1 reviews:9080" {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, b)
		}
	}
	st.CloseWrite()
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Fatalf("after the client's end: %q %v, want a clean end", rest, err)
	}
	st.Close()

	// The proxy ends a stream itself (a refusal, Connection: close) while the client
	// still sends: the client reads the whole answer and a clean end, not a reset that
	// would drop what it had not read yet.
	for i := range 20 {
		st, err := pool.Connect(ctx, tunnel.Key{Src: client, Dst: waypoint, Addr: wpAddr}, vip, src)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(st, "GET / HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
		b, err := io.ReadAll(st)
		if err != nil || !strings.HasPrefix(string(b), "HTTP/1.1 426 Upgrade Required\r\n") || !strings.HasSuffix(string(b), "\r\n\r\nUpgrade Required") {
			t.Fatalf("stream %d: %q %v", i, b, err)
		}
		st.CloseWrite()
		st.Close()
	}
	serving.Wait()
}
