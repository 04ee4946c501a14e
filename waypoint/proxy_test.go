package waypoint

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if os.Getenv(benchHelperEnv) != "" {
		os.Exit(benchHelper())
	}
	goleak.VerifyTestMain(m)
}

// dialer is a Dialer over loopback TCP that counts its dials per address.
type dialer struct {
	mu    sync.Mutex
	dials map[netip.AddrPort]int
	fail  bool
}

func (d *dialer) dial(ctx context.Context, up Upstream) (net.Conn, error) {
	d.mu.Lock()
	if d.dials == nil {
		d.dials = map[netip.AddrPort]int{}
	}
	d.dials[up.Addr]++
	fail := d.fail
	d.mu.Unlock()
	if fail {
		return nil, errors.New("connection refused (test)")
	}
	var nd net.Dialer
	return nd.DialContext(ctx, "tcp", up.Addr.String())
}

func (d *dialer) count(a netip.AddrPort) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.dials[a]
}

// proxyServer is a Proxy serving every TCP connection accepted on loopback, as the
// waypoint serves each accepted HBONE stream.
type proxyServer struct {
	addr string
	p    *Proxy
	d    *dialer
	// decided counts Decide calls; paths records what Decide saw.
	decided atomic.Int64
	mu      sync.Mutex
	paths   []string
}

func (ps *proxyServer) seen() []string {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return append([]string(nil), ps.paths...)
}

// startProxy serves p with routes from rt on a loopback listener until the test ends.
func startProxy(t testing.TB, p *Proxy, rt func(ps *proxyServer) *Route) *proxyServer {
	t.Helper()
	if p.Dial == nil {
		d := &dialer{}
		p.Dial = d.dial
	}
	ps := &proxyServer{p: p}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ps.addr = lis.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.Serve(ctx, c, rt(ps))
			}()
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		cancel()
		wg.Wait()
	})
	return ps
}

// route sends every request to the upstream that up names for its path.
func route(proto Protocol, up func(r *http.Request) netip.AddrPort) func(ps *proxyServer) *Route {
	return func(ps *proxyServer) *Route {
		return &Route{
			Protocol: proto,
			Decide: func(r *http.Request) (Upstream, *Response) {
				ps.decided.Add(1)
				ps.mu.Lock()
				ps.paths = append(ps.paths, r.URL.EscapedPath())
				ps.mu.Unlock()
				a := up(r)
				if !a.IsValid() {
					return Upstream{}, &Response{Status: http.StatusForbidden, Body: "RBAC: access denied"}
				}
				return Upstream{Addr: a}, nil
			},
			DecideTCP: func() (Upstream, error) {
				a := up(nil)
				if !a.IsValid() {
					return Upstream{}, errors.New("denied")
				}
				return Upstream{Addr: a}, nil
			},
			Labels: MetricLabels{SourceWorkload: "client", SourceNamespace: "test"},
		}
	}
}

func to(a netip.AddrPort) func(*http.Request) netip.AddrPort {
	return func(*http.Request) netip.AddrPort { return a }
}

// backend is a real HTTP server on loopback (HTTP/1.1 and HTTP/2 with prior knowledge).
func backend(t testing.TB, h http.Handler) netip.AddrPort {
	t.Helper()
	srv := httptest.NewUnstartedServer(h)
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	srv.Config.Protocols = &protos
	srv.Start()
	t.Cleanup(srv.Close)
	return netip.MustParseAddrPort(srv.Listener.Addr().String())
}

// whoami answers with its name, the request's protocol, request-URI and Host.
func whoami(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s %s %s", name, r.Proto, r.RequestURI, r.Host)
	})
}

// client is a raw HTTP/1.1 connection to the proxy.
type client struct {
	t  testing.TB
	c  net.Conn
	br *bufio.Reader
}

func dialProxy(t testing.TB, ps *proxyServer) *client {
	t.Helper()
	c, err := net.Dial("tcp", ps.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return &client{t: t, c: c, br: bufio.NewReader(c)}
}

func (cl *client) send(raw string) {
	cl.t.Helper()
	if _, err := io.WriteString(cl.c, raw); err != nil {
		cl.t.Fatal(err)
	}
}

// response reads one response and its body.
func (cl *client) response(method string) (*http.Response, string) {
	cl.t.Helper()
	resp, err := http.ReadResponse(cl.br, &http.Request{Method: method})
	if err != nil {
		cl.t.Fatalf("reading a response: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		cl.t.Fatalf("reading a body: %v", err)
	}
	return resp, string(b)
}

func (cl *client) get(path string) (*http.Response, string) {
	cl.t.Helper()
	cl.send("GET " + path + " HTTP/1.1\r\nHost: svc.test\r\n\r\n")
	return cl.response("GET")
}

// closed reports whether the proxy closed the connection (EOF or reset).
func (cl *client) closed() bool {
	cl.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := cl.br.ReadByte()
	return err != nil && !errors.Is(err, os.ErrDeadlineExceeded)
}

// Requests of one keep-alive connection go where Decide says, each to its own endpoint,
// and each endpoint's connection is reused.
func TestHTTP1KeepAliveAcrossUpstreams(t *testing.T) {
	a := backend(t, whoami("a"))
	b := backend(t, whoami("b"))
	d := &dialer{}
	ps := startProxy(t, &Proxy{Dial: d.dial}, route(ProtocolHTTP1, func(r *http.Request) netip.AddrPort {
		if strings.HasPrefix(r.URL.Path, "/b") {
			return b
		}
		return a
	}))
	cl := dialProxy(t, ps)
	for i, path := range []string{"/a/1", "/b/2", "/a/3", "/b/4", "/a/5"} {
		resp, body := cl.get(path)
		want := fmt.Sprintf("%c HTTP/1.1 %s svc.test", path[1], path)
		if resp.StatusCode != 200 || body != want {
			t.Fatalf("request %d %s: %d %q, want 200 %q", i, path, resp.StatusCode, body, want)
		}
	}
	if d.count(a) != 1 || d.count(b) != 1 {
		t.Errorf("dials: a %d, b %d; want one each (keep-alive upstream)", d.count(a), d.count(b))
	}
}

// The proxy refuses what two HTTP/1.1 parsers could read two ways, answering 400 (or
// Envoy's status) and closing: neither Decide nor an endpoint sees the request.
func TestHTTP1RefusesAmbiguousRequests(t *testing.T) {
	var hits atomic.Int64
	up := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits.Add(1) }))
	ps := startProxy(t, &Proxy{}, route(ProtocolHTTP1, to(up)))
	for _, tc := range []struct {
		name, req string
		status    int
	}{
		{"content-length and transfer-encoding", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
		{"transfer-encoding then content-length", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400},
		{"gzip, chunked", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400},
		{"chunked, gzip", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400},
		{"chunked twice", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
		{"identity", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n", 400},
		{"chunked with a space before the colon", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400},
		{"differing content-lengths", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400},
		{"differing content-length list", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!", 400},
		{"signed content-length", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", 400},
		{"upgrade h2c", "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", 400},
		{"h2c without connection", "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n", 400},
		{"http2-settings alone", "GET / HTTP/1.1\r\nHost: x\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", 400},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n 2\r\n\r\n", 400},
		{"bare LF", "GET / HTTP/1.1\nHost: x\n\n", 400},
		{"CR in a value", "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r2\r\n\r\n", 400},
		{"NUL in a value", "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\x002\r\n\r\n", 400},
		{"no host", "GET / HTTP/1.1\r\n\r\n", 400},
		{"two hosts", "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400},
		{"HTTP/1.0", "GET / HTTP/1.0\r\nHost: x\r\n\r\n", 426},
		{"HTTP/2.0 request line", "GET / HTTP/2.0\r\nHost: x\r\n\r\n", 400},
		{"two spaces", "GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400},
		{"asterisk", "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400},
		{"relative path", "GET a/b HTTP/1.1\r\nHost: x\r\n\r\n", 400},
		{"invalid escape", "GET /a%zz HTTP/1.1\r\nHost: x\r\n\r\n", 400},
		{"escaped NUL", "GET /a%00 HTTP/1.1\r\nHost: x\r\n\r\n", 400},
		{"fragment", "GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n", 400},
		{"CONNECT", "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 403},
		{"upgrade other than websocket", "GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo/1\r\n\r\n", 403},
		{"expect other than 100-continue", "GET / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", 417},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := ps.decided.Load()
			cl := dialProxy(t, ps)
			cl.send(tc.req)
			resp, _ := cl.response("GET")
			if resp.StatusCode != tc.status || !resp.Close {
				t.Errorf("status %d close %v, want %d and close", resp.StatusCode, resp.Close, tc.status)
			}
			if !cl.closed() {
				t.Error("connection still open after the refusal")
			}
			if ps.decided.Load() != before {
				t.Error("Decide saw a refused request")
			}
		})
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the endpoint saw %d refused requests", n)
	}
}

// Duplicate identical Content-Lengths are one length (RFC 9110 8.6).
func TestHTTP1IdenticalContentLengths(t *testing.T) {
	up := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%d %s", r.ContentLength, b)
	}))
	ps := startProxy(t, &Proxy{}, route(ProtocolHTTP1, to(up)))
	cl := dialProxy(t, ps)
	cl.send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello")
	if resp, body := cl.response("POST"); resp.StatusCode != 200 || body != "5 hello" {
		t.Fatalf("%d %q", resp.StatusCode, body)
	}
}
