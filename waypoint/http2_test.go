package waypoint

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// h2Client speaks HTTP/2 with prior knowledge to the proxy.
func h2Client(t testing.TB) *http.Client {
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &protos}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 20 * time.Second}
}

// gRPC through the proxy: a unary call, a gRPC error carried in the trailers, and a
// server stream.
func TestHTTP2GRPC(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("reviews", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	up := netip.MustParseAddrPort(lis.Addr().String())

	ps := startProxy(t, &Proxy{}, route(ProtocolHTTP2, to(up)))
	cc, err := grpc.NewClient(ps.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	hc := healthpb.NewHealthClient(cc)

	resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "reviews"})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Check: %v %v", resp, err)
	}
	_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "nope"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("Check of an unknown service: %v, want NotFound", err)
	}
	w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: "reviews"})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := w.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Watch: %v %v", m, err)
	}
	hs.SetServingStatus("reviews", healthpb.HealthCheckResponse_NOT_SERVING)
	if m, err := w.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("Watch, second message: %v %v", m, err)
	}
	if got := ps.seen(); got[0] != "/grpc.health.v1.Health/Check" {
		t.Errorf("Decide saw %v", got)
	}
}

// HTTP/2 with trailers and a streamed body, end to end; a denied request gets the
// local reply; the client may speak HTTP/2 to an HTTP/1.1 endpoint and HTTP/1.1 to an
// HTTP/2 one.
func TestHTTP2Proxying(t *testing.T) {
	up := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Trailer", "X-Result")
		fmt.Fprintf(w, "%s %s %s %s", r.Proto, r.RequestURI, r.Host, b)
		w.(http.Flusher).Flush()
		w.Header().Set("X-Result", "ok")
	}))
	for _, tc := range []struct {
		name      string
		route     Protocol
		clientH2  bool
		wantProto string
	}{
		{"h2 to h2", ProtocolHTTP2, true, "HTTP/2.0"},
		{"h2 to h1", ProtocolHTTP1, true, "HTTP/1.1"},
		{"h1 to h2", ProtocolHTTP2, false, "HTTP/2.0"},
		{"auto h2", ProtocolAuto, true, "HTTP/2.0"},
		{"auto h1", ProtocolAuto, false, "HTTP/1.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ps := startProxy(t, &Proxy{}, route(tc.route, func(r *http.Request) netip.AddrPort {
				if r != nil && r.URL.Path == "/denied" {
					return netip.AddrPort{}
				}
				return up
			}))
			c := &http.Client{Timeout: 20 * time.Second}
			if tc.clientH2 {
				c = h2Client(t)
			} else {
				tr := &http.Transport{}
				t.Cleanup(tr.CloseIdleConnections)
				c.Transport = tr
			}
			resp, err := c.Post("http://"+ps.addr+"/x/../echo?q=1", "text/plain", strings.NewReader("body"))
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			want := fmt.Sprintf("%s /echo?q=1 %s body", tc.wantProto, ps.addr)
			if resp.StatusCode != 200 || string(b) != want || resp.Trailer.Get("X-Result") != "ok" {
				t.Fatalf("%d %q trailer %v, want %q and X-Result", resp.StatusCode, b, resp.Trailer, want)
			}
			resp, err = c.Get("http://" + ps.addr + "/denied")
			if err != nil {
				t.Fatal(err)
			}
			b, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 403 || string(b) != "RBAC: access denied" || resp.Header.Get("Content-Type") != "text/plain" {
				t.Fatalf("denied: %d %q %v", resp.StatusCode, b, resp.Header)
			}
		})
	}
}

// An HTTP/2 client's requests run concurrently, but the upstream connections they use
// stay within MaxUpstreamConns.
func TestHTTP2BoundedUpstreamConns(t *testing.T) {
	var mu sync.Mutex
	open, peak := 0, 0
	release := make(chan struct{})
	srvUp := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		io.WriteString(w, "ok")
	}))
	// Count the endpoint's connections at the proxy's dialer.
	var d dialer
	dial := func(ctx context.Context, up Upstream) (net.Conn, error) {
		c, err := d.dial(ctx, up)
		if err != nil {
			return nil, err
		}
		mu.Lock()
		open++
		peak = max(peak, open)
		mu.Unlock()
		return &closeHook{Conn: c, f: func() { mu.Lock(); open--; mu.Unlock() }}, nil
	}
	ps := startProxy(t, &Proxy{Dial: dial, MaxUpstreamConns: 3}, route(ProtocolHTTP1, to(srvUp)))
	c := h2Client(t)
	const n = 20
	var wg sync.WaitGroup
	var ok atomic.Int64
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := c.Get("http://" + ps.addr + "/")
			if err != nil {
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(b) == "ok" {
				ok.Add(1)
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	close(release)
	wg.Wait()
	if ok.Load() != n {
		t.Errorf("%d of %d requests succeeded", ok.Load(), n)
	}
	mu.Lock()
	defer mu.Unlock()
	if peak > 3 || peak == 0 {
		t.Errorf("peak upstream connections %d, want 1..3", peak)
	}
}

type closeHook struct {
	net.Conn
	once sync.Once
	f    func()
}

func (c *closeHook) Close() error {
	c.once.Do(c.f)
	return c.Conn.Close()
}

// An HTTP/2 client gets Envoy's 503s too, and a reset stream when the endpoint fails
// midway.
func TestHTTP2UpstreamFailures(t *testing.T) {
	cut := rawBackendH1Cut(t)
	for _, tc := range []struct {
		name  string
		route Protocol
	}{{"h1 endpoint", ProtocolHTTP1}, {"h2 endpoint", ProtocolHTTP2}} {
		t.Run(tc.name, func(t *testing.T) {
			refused := netip.MustParseAddrPort("127.0.0.1:1")
			ps := startProxy(t, &Proxy{}, route(tc.route, func(r *http.Request) netip.AddrPort {
				if r.URL.Path == "/cut" {
					return cut
				}
				return refused
			}))
			c := h2Client(t)
			resp, err := c.Get("http://" + ps.addr + "/refused")
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 503 || string(b) != "no healthy upstream" {
				t.Fatalf("%d %q", resp.StatusCode, b)
			}
			if tc.route == ProtocolHTTP1 {
				resp, err := c.Get("http://" + ps.addr + "/cut")
				if err != nil {
					t.Fatal(err)
				}
				_, err = io.ReadAll(resp.Body)
				resp.Body.Close()
				if err == nil {
					t.Fatal("a cut response read whole")
				}
			}
		})
	}
}

func rawBackendH1Cut(t *testing.T) netip.AddrPort {
	return rawBackend(t, func(c net.Conn, br *bufio.Reader) {
		readHead(br)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
	})
}
