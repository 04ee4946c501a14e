package waypoint

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// rawBackend is an endpoint on loopback that hands each connection to serve: for
// misbehaving endpoints net/http will not play.
func rawBackend(t testing.TB, serve func(c net.Conn, br *bufio.Reader)) netip.AddrPort {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { lis.Close(); wg.Wait() })
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
				defer c.Close()
				c.SetDeadline(time.Now().Add(20 * time.Second))
				serve(c, bufio.NewReader(c))
			}()
		}
	}()
	return netip.MustParseAddrPort(lis.Addr().String())
}

// readHead reads a request's header from br.
func readHead(br *bufio.Reader) (string, error) {
	var b strings.Builder
	for {
		l, err := br.ReadString('\n')
		b.WriteString(l)
		if err != nil {
			return b.String(), err
		}
		if l == "\r\n" {
			return b.String(), nil
		}
	}
}

var fixedNow = time.Date(2026, 8, 1, 12, 0, 0, 0, time.UTC)

// A Decide reply is written byte for byte as Envoy's local reply, and the connection
// takes the next request.
func TestHTTP1LocalReplyBytes(t *testing.T) {
	up := backend(t, whoami("app"))
	ps := startProxy(t, &Proxy{now: func() time.Time { return fixedNow }}, func(*proxyServer) *Route {
		return &Route{Protocol: ProtocolHTTP1, Decide: func(r *http.Request) (Upstream, *Response) {
			switch r.URL.Path {
			case "/rbac":
				return Upstream{}, &Response{Status: 403, Body: "RBAC: access denied"}
			case "/jwt":
				return Upstream{}, &Response{Status: 401, Body: "Jwt verification fails", Header: http.Header{
					"Www-Authenticate": {`Bearer realm="http://svc.test/jwt", error="invalid_token"`}}}
			case "/none":
				return Upstream{}, &Response{Status: 503, Body: "no healthy upstream", Flags: "UH"}
			}
			return Upstream{Addr: up}, nil
		}}
	})
	cl := dialProxy(t, ps)
	for _, tc := range []struct{ req, want string }{
		{"GET /rbac HTTP/1.1\r\nHost: svc.test\r\n\r\n",
			"HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\ncontent-type: text/plain\r\ndate: Sat, 01 Aug 2026 12:00:00 GMT\r\n\r\nRBAC: access denied"},
		{"GET /jwt HTTP/1.1\r\nHost: svc.test\r\nAuthorization: Bearer x.y.z\r\n\r\n",
			"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"http://svc.test/jwt\", error=\"invalid_token\"\r\ncontent-length: 22\r\ncontent-type: text/plain\r\ndate: Sat, 01 Aug 2026 12:00:00 GMT\r\n\r\nJwt verification fails"},
		{"GET /none HTTP/1.1\r\nHost: svc.test\r\n\r\n",
			"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 19\r\ncontent-type: text/plain\r\ndate: Sat, 01 Aug 2026 12:00:00 GMT\r\n\r\nno healthy upstream"},
		{"HEAD /rbac HTTP/1.1\r\nHost: svc.test\r\n\r\n",
			"HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\ncontent-type: text/plain\r\ndate: Sat, 01 Aug 2026 12:00:00 GMT\r\n\r\n"},
		// A denied request's small body is read past: the connection goes on.
		{"POST /rbac HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 5\r\n\r\nhello",
			"HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\ncontent-type: text/plain\r\ndate: Sat, 01 Aug 2026 12:00:00 GMT\r\n\r\nRBAC: access denied"},
	} {
		cl.send(tc.req)
		got := make([]byte, len(tc.want))
		if _, err := io.ReadFull(cl.br, got); err != nil {
			t.Fatalf("%q: read %q: %v", tc.req, got, err)
		}
		if string(got) != tc.want {
			t.Fatalf("%q:\ngot  %q\nwant %q", tc.req, got, tc.want)
		}
	}
	if resp, body := cl.get("/ok"); resp.StatusCode != 200 || body != "app HTTP/1.1 /ok svc.test" {
		t.Fatalf("after the local replies: %d %q", resp.StatusCode, body)
	}
}

// Decide and the endpoint see the normalized path; the query is forwarded as sent.
func TestHTTP1PathNormalized(t *testing.T) {
	up := backend(t, whoami("app"))
	ps := startProxy(t, &Proxy{}, route(ProtocolHTTP1, to(up)))
	cl := dialProxy(t, ps)
	for _, tc := range []struct{ target, seen, uri string }{
		{"/a/../admin", "/admin", "/admin"},
		{"/public/..%2fadmin", "/public/..%2fadmin", "/public/..%2fadmin"},
		{"/public/%2e%2E/admin?x=../y", "/admin", "/admin?x=../y"},
		{"/a\\..\\admin", "/admin", "/admin"},
		{"/%61dmin/%7Euser", "/admin/~user", "/admin/~user"},
		{"/x/./y/", "/x/y/", "/x/y/"},
		{"/caf\xc3\xa9", "/caf%C3%A9", "/caf%C3%A9"},
		{"http://other.test/abs/../path?q", "/path", "/path?q"},
	} {
		resp, body := cl.get(tc.target)
		host := "svc.test"
		if strings.HasPrefix(tc.target, "http://") {
			host = "other.test"
		}
		if want := "app HTTP/1.1 " + tc.uri + " " + host; resp.StatusCode != 200 || body != want {
			t.Errorf("%s: %d %q, want %q", tc.target, resp.StatusCode, body, want)
		}
		if seen := ps.seen(); seen[len(seen)-1] != tc.seen {
			t.Errorf("%s: Decide saw %q, want %q", tc.target, seen[len(seen)-1], tc.seen)
		}
	}
}

// Hop-by-hop headers stop at the proxy both ways; the proxy adds Envoy's
// x-forwarded-proto and x-request-id and drops a client's x-forwarded-client-cert.
// Headers Decide writes are forwarded.
func TestHTTP1Headers(t *testing.T) {
	up := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var names []string
		for k, v := range r.Header {
			names = append(names, k+"="+strings.Join(v, ","))
		}
		w.Header().Set("Connection", "X-Secret")
		w.Header().Set("X-Secret", "1")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("X-Kept", "1")
		fmt.Fprint(w, strings.Join(names, "\n"))
	}))
	ps := startProxy(t, &Proxy{}, func(ps *proxyServer) *Route {
		return &Route{Protocol: ProtocolHTTP1, Decide: func(r *http.Request) (Upstream, *Response) {
			r.Header.Del("Authorization")
			r.Header.Set("X-Jwt-Sub", "alice")
			return Upstream{Addr: up}, nil
		}}
	})
	cl := dialProxy(t, ps)
	cl.send("GET / HTTP/1.1\r\nHost: svc.test\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 300\r\n" +
		"Proxy-Connection: keep-alive\r\nTE: trailers, deflate\r\nX-Forwarded-Client-Cert: By=spoofed\r\n" +
		"Authorization: Bearer t\r\nX-Forwarded-For: 10.0.0.9\r\nX-End: 1\r\n\r\n")
	resp, body := cl.response("GET")
	got := map[string]string{}
	for _, l := range strings.Split(body, "\n") {
		k, v, _ := strings.Cut(l, "=")
		got[k] = v
	}
	for _, k := range []string{"X-Hop", "Keep-Alive", "Proxy-Connection", "X-Forwarded-Client-Cert", "Authorization", "Connection"} {
		if _, ok := got[k]; ok {
			t.Errorf("the endpoint got %s", k)
		}
	}
	for k, v := range map[string]string{"Te": "trailers", "X-Forwarded-For": "10.0.0.9", "X-Forwarded-Proto": "http", "X-Jwt-Sub": "alice", "X-End": "1"} {
		if got[k] != v {
			t.Errorf("the endpoint got %s=%q, want %q", k, got[k], v)
		}
	}
	if len(got["X-Request-Id"]) != 36 {
		t.Errorf("x-request-id %q", got["X-Request-Id"])
	}
	if resp.Header.Get("X-Secret") != "" || resp.Header.Get("Keep-Alive") != "" || resp.Header.Get("X-Kept") != "1" {
		t.Errorf("response headers %v", resp.Header)
	}
}

// A header Decide writes that cannot be sent is a 500, not a split request.
func TestHTTP1DecideBadHeader(t *testing.T) {
	var hits atomic.Int64
	up := backend(t, http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
	ps := startProxy(t, &Proxy{}, func(ps *proxyServer) *Route {
		return &Route{Protocol: ProtocolHTTP1, Decide: func(r *http.Request) (Upstream, *Response) {
			r.Header.Set("X-Claim", "a\r\nX-Injected: 1")
			return Upstream{Addr: up}, nil
		}}
	})
	if resp, _ := dialProxy(t, ps).get("/"); resp.StatusCode != 500 || hits.Load() != 0 {
		t.Fatalf("status %d, endpoint hits %d", resp.StatusCode, hits.Load())
	}
}

// Upstream failures are Envoy's 503s; the client's connection goes on.
func TestHTTP1UpstreamFailures(t *testing.T) {
	good := backend(t, whoami("good"))
	reset := rawBackend(t, func(c net.Conn, br *bufio.Reader) { readHead(br) })
	d := &dialer{}
	refused := netip.MustParseAddrPort("127.0.0.1:1")
	ps := startProxy(t, &Proxy{Dial: func(ctx context.Context, up Upstream) (net.Conn, error) {
		if up.Addr == refused {
			return nil, errors.New("connection refused (test)")
		}
		return d.dial(ctx, up)
	}}, route(ProtocolHTTP1, func(r *http.Request) netip.AddrPort {
		switch r.URL.Path {
		case "/refused":
			return refused
		case "/reset":
			return reset
		}
		return good
	}))
	cl := dialProxy(t, ps)
	for _, tc := range []struct{ path, body string }{
		{"/refused", "no healthy upstream"},
		{"/reset", "upstream connect error or disconnect/reset before headers. reset reason: connection termination"},
		{"/ok", "good HTTP/1.1 /ok svc.test"},
	} {
		resp, body := cl.get(tc.path)
		want := 503
		if tc.path == "/ok" {
			want = 200
		}
		if resp.StatusCode != want || body != tc.body || resp.Header.Get("Content-Type") != "text/plain" && want == 503 {
			t.Errorf("%s: %d %q %v, want %d %q", tc.path, resp.StatusCode, body, resp.Header, want, tc.body)
		}
	}
}

// An endpoint that fails after its header: the client's response is cut short and its
// connection closed, never completed with wrong bytes.
func TestHTTP1UpstreamResetMidResponse(t *testing.T) {
	for _, tc := range []struct{ name, resp string }{
		{"content-length", "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"},
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := rawBackend(t, func(c net.Conn, br *bufio.Reader) {
				readHead(br)
				io.WriteString(c, tc.resp)
			})
			ps := startProxy(t, &Proxy{}, route(ProtocolHTTP1, to(up)))
			cl := dialProxy(t, ps)
			cl.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			resp, err := http.ReadResponse(cl.br, nil)
			if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(resp.Body)
			if err == nil || string(b) != "0123456789" {
				t.Fatalf("body %q, %v; want the 10 bytes, then an error", b, err)
			}
			if !cl.closed() {
				t.Fatal("connection open after a cut response")
			}
		})
	}
}

// An endpoint that closes an idle keep-alive connection: the next request on it is sent
// again on a new connection, not answered 503.
func TestHTTP1StaleUpstreamRetried(t *testing.T) {
	var conns atomic.Int64
	up := rawBackend(t, func(c net.Conn, br *bufio.Reader) {
		conns.Add(1)
		readHead(br)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		// then close, with no Connection: close
	})
	ps := startProxy(t, &Proxy{}, route(ProtocolHTTP1, to(up)))
	cl := dialProxy(t, ps)
	for i := range 3 {
		if resp, body := cl.get("/"); resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, body)
		}
		time.Sleep(20 * time.Millisecond) // the endpoint's close arrives
	}
	if n := conns.Load(); n != 3 {
		t.Errorf("%d upstream connections, want 3", n)
	}
}

// Bodies cross both ways: Content-Length and chunked requests (with a trailer), large
// ones, and responses of unknown length re-chunked.
func TestHTTP1Bodies(t *testing.T) {
	up := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		w.Header().Set("Trailer", "X-Sum")
		fmt.Fprintf(w, "%d %x %s %v", n, h.Sum(nil)[:4], r.Trailer.Get("X-Check"), r.TransferEncoding)
		w.(http.Flusher).Flush() // no Content-Length: the response is chunked
		w.Header().Set("X-Sum", "done")
	}))
	ps := startProxy(t, &Proxy{}, route(ProtocolHTTP1, to(up)))
	cl := dialProxy(t, ps)
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	sum := sha256.Sum256(big)

	cl.send(fmt.Sprintf("POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", len(big)))
	go cl.c.Write(big)
	resp, body := cl.response("POST")
	if want := fmt.Sprintf("%d %x  []", len(big), sum[:4]); body != want || resp.Trailer.Get("X-Sum") != "done" {
		t.Fatalf("content-length: %q trailer %v, want %q", body, resp.Trailer, want)
	}

	var chunked bytes.Buffer
	chunked.WriteString("POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: X-Check\r\n\r\n")
	for p := big; len(p) > 0; p = p[min(len(p), 100000):] {
		n := min(len(p), 100000)
		fmt.Fprintf(&chunked, "%x\r\n%s\r\n", n, p[:n])
	}
	chunked.WriteString("0\r\nX-Check: yes\r\n\r\n")
	go cl.c.Write(chunked.Bytes())
	resp, body = cl.response("POST")
	if want := fmt.Sprintf("%d %x yes [chunked]", len(big), sum[:4]); body != want {
		t.Fatalf("chunked: %q, want %q", body, want)
	}
	if resp, body := cl.get("/after"); resp.StatusCode != 200 || !strings.HasPrefix(body, "0 ") {
		t.Fatalf("after the bodies: %d %q", resp.StatusCode, body)
	}
}

// Expect: 100-continue is answered by the proxy once Decide allows, as Envoy does.
func TestHTTP1ExpectContinue(t *testing.T) {
	up := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s expect=%q", b, r.Header.Get("Expect"))
	}))
	ps := startProxy(t, &Proxy{}, route(ProtocolHTTP1, func(r *http.Request) netip.AddrPort {
		if r.URL.Path == "/denied" {
			return netip.AddrPort{}
		}
		return up
	}))
	cl := dialProxy(t, ps)
	cl.send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
	if l, err := cl.br.ReadString('\n'); err != nil || l != "HTTP/1.1 100 Continue\r\n" {
		t.Fatalf("%q, %v", l, err)
	}
	cl.br.ReadString('\n')
	cl.send("hello")
	if resp, body := cl.response("POST"); resp.StatusCode != 200 || body != `hello expect=""` {
		t.Fatalf("%d %q", resp.StatusCode, body)
	}
	// Denied: no 100, the body never sent, so the connection cannot go on.
	cl.send("POST /denied HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
	if resp, _ := cl.response("POST"); resp.StatusCode != 403 || !resp.Close {
		t.Fatalf("denied: %d close %v", resp.StatusCode, resp.Close)
	}
}

// A websocket upgrade is forwarded; after the 101 the bytes flow both ways raw.
func TestHTTP1WebsocketUpgrade(t *testing.T) {
	up := rawBackend(t, func(c net.Conn, br *bufio.Reader) {
		head, err := readHead(br)
		if err != nil || !strings.Contains(head, "Upgrade: websocket\r\n") || !strings.Contains(head, "Connection: Upgrade\r\n") || !strings.Contains(head, "Sec-Websocket-Key: k\r\n") {
			io.WriteString(c, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
			return
		}
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: a\r\n\r\n")
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			io.WriteString(c, strings.ToUpper(l))
		}
	})
	ps := startProxy(t, &Proxy{}, route(ProtocolHTTP1, to(up)))
	cl := dialProxy(t, ps)
	cl.send("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\nearly\n")
	resp, err := http.ReadResponse(cl.br, nil)
	if err != nil || resp.StatusCode != 101 || resp.Header.Get("Upgrade") != "websocket" {
		t.Fatalf("%v %v", resp, err)
	}
	cl.send("frame\n")
	for _, want := range []string{"EARLY\n", "FRAME\n"} {
		if l, err := cl.br.ReadString('\n'); l != want {
			t.Fatalf("read %q, %v; want %q", l, err, want)
		}
	}
}

// Past MaxHeaderBytes or MaxHeaderCount the answer is 431.
func TestHTTP1HeaderLimits(t *testing.T) {
	up := backend(t, whoami("app"))
	ps := startProxy(t, &Proxy{}, route(ProtocolHTTP1, to(up)))
	big := "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", DefaultMaxHeaderBytes) + "\r\n\r\n"
	many := "GET / HTTP/1.1\r\nHost: x\r\n" + strings.Repeat("X-A: 1\r\n", DefaultMaxHeaderCount) + "\r\n"
	longLine := "GET /" + strings.Repeat("a", DefaultMaxHeaderBytes) + " HTTP/1.1\r\nHost: x\r\n\r\n"
	for name, req := range map[string]string{"big": big, "many": many, "long request line": longLine} {
		cl := dialProxy(t, ps)
		go cl.send(req)
		if resp, _ := cl.response("GET"); resp.StatusCode != 431 {
			t.Errorf("%s: %d, want 431", name, resp.StatusCode)
		}
	}
	// Just under the limits is fine.
	ok := "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", DefaultMaxHeaderBytes-60) + "\r\n\r\n"
	cl := dialProxy(t, ps)
	cl.send(ok)
	if resp, _ := cl.response("GET"); resp.StatusCode != 200 {
		t.Errorf("under the limit: %d", resp.StatusCode)
	}
}

// A client that sends its header too slowly, or nothing for too long, is closed; while
// it waits it costs one goroutine.
func TestHTTP1Timeouts(t *testing.T) {
	up := backend(t, whoami("app"))
	p := &Proxy{ReadHeaderTimeout: 200 * time.Millisecond, IdleTimeout: 400 * time.Millisecond}
	ps := startProxy(t, p, route(ProtocolHTTP1, to(up)))
	before := runtime.NumGoroutine()
	const slow = 50
	var cls []*client
	for range slow {
		cl := dialProxy(t, ps)
		cl.send("GET / HTTP/1.1\r\nHost: x\r\n") // never finished
		cls = append(cls, cl)
	}
	idle := dialProxy(t, ps)
	if resp, _ := idle.get("/"); resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
	time.Sleep(50 * time.Millisecond)
	if n := runtime.NumGoroutine() - before; n > slow+10 {
		t.Errorf("%d goroutines for %d slow clients", n, slow)
	}
	start := time.Now()
	for _, cl := range cls {
		if !cl.closed() {
			t.Fatal("a slow header was not cut off")
		}
	}
	if !idle.closed() {
		t.Fatal("an idle connection was not closed")
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("closing took %v", el)
	}
}

// Bodyless responses (HEAD, 204, 304) leave the endpoint's connection reusable.
func TestHTTP1BodylessResponsesReuse(t *testing.T) {
	up := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/204":
			w.WriteHeader(204)
		case "/304":
			w.WriteHeader(304)
		default:
			io.WriteString(w, "0123456789")
		}
	}))
	d := &dialer{}
	ps := startProxy(t, &Proxy{Dial: d.dial}, route(ProtocolHTTP1, to(up)))
	cl := dialProxy(t, ps)
	cl.send("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, body := cl.response("HEAD"); resp.StatusCode != 200 || resp.ContentLength != 10 || body != "" {
		t.Fatalf("HEAD: %d %d %q", resp.StatusCode, resp.ContentLength, body)
	}
	for _, tc := range []struct {
		path string
		want int
	}{{"/204", 204}, {"/304", 304}, {"/", 200}} {
		if resp, _ := cl.get(tc.path); resp.StatusCode != tc.want {
			t.Fatalf("%s: %s", tc.path, resp.Status)
		}
	}
	if n := d.count(up); n != 1 {
		t.Errorf("%d upstream connections, want 1", n)
	}
}
