package tunnel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"

	"github.com/veilmesh/veil/identity"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConnectCarriesBytesAndSource(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	s := connect(t, m.pool(t), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app)
	if _, err := s.Write([]byte("hello over hbone")); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "hello over hbone" {
		t.Fatalf("echo = %q, %v", got, err)
	}
	reqs := hb.requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests", len(reqs))
	}
	r := reqs[0]
	if r.Peer != frontend || r.Source != testSrc || r.Destination != app {
		t.Fatalf("server saw peer %v source %v destination %v; want %v %v %v", r.Peer, r.Source, r.Destination, frontend, testSrc, app)
	}
}

// Half-close: the client sends, shuts its write side, and still receives the reply the
// application writes only after it has seen EOF.
func TestHalfClosePropagates(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, func(c *net.TCPConn) {
		n, _ := io.Copy(io.Discard, c) // until the FIN the client's CloseWrite became
		fmt.Fprintf(c, "read %d bytes", n)
	})
	s := connect(t, m.pool(t), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app)
	if _, err := s.Write(bytes.Repeat([]byte("x"), 100000)); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "read 100000 bytes" {
		t.Fatalf("reply = %q, %v", got, err)
	}
}

// hashSink reads until EOF, then writes the hex SHA-256 of what it read.
func hashSink(c *net.TCPConn) {
	h := sha256.New()
	io.Copy(h, c)
	io.WriteString(c, hex.EncodeToString(h.Sum(nil)))
}

func TestLargeTransferArrivesIntact(t *testing.T) {
	const size = 1 << 30
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, hashSink)
	s := connect(t, m.pool(t), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app)

	src := rand.NewChaCha8([32]byte{1, 2, 3})
	h := sha256.New()
	n, err := io.CopyN(io.MultiWriter(s, h), src, size)
	if err != nil || n != size {
		t.Fatalf("sent %d: %v", n, err)
	}
	s.CloseWrite()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if want := hex.EncodeToString(h.Sum(nil)); string(got) != want {
		t.Fatalf("application's checksum %s, sent %s", got, want)
	}
	eventually(t, "byte counts", func() bool {
		hb.mu.Lock()
		defer hb.mu.Unlock()
		return len(hb.done) == 1 && hb.done[0].BToA == size && hb.done[0].AToB == 64
	})
}

func TestServerAnswers(t *testing.T) {
	m := newMesh(t)
	app := upstream(t, echo)
	closed := func() netip.AddrPort {
		l, _ := net.Listen("tcp", "127.0.0.1:0")
		a := l.Addr().(*net.TCPAddr).AddrPort()
		l.Close()
		return a
	}()
	deny := HandlerFunc(func(context.Context, *Request) (net.Conn, error) {
		return nil, Denied(errors.New("policy bookinfo/deny-all"))
	})
	tests := []struct {
		name      string
		handler   Handler
		authority netip.AddrPort
		want      int
	}{
		{"policy denies: 401", deny, app, http.StatusUnauthorized},
		{"destination unreachable: 503", nil, closed, http.StatusServiceUnavailable},
		{"authority is not the dialled address: 400", nil, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), app.Port()), http.StatusBadRequest},
		{"authority with port 0: 400", nil, netip.AddrPortFrom(app.Addr(), 0), http.StatusBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			hb := startServer(t, m.serverConfig(reviews), tc.handler)
			_, err := m.pool(t).Connect(context.Background(), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, tc.authority, testSrc)
			var se *StatusError
			if !errors.As(err, &se) || se.Code != tc.want {
				t.Fatalf("Connect error %v, want status %d", err, tc.want)
			}
		})
	}
}

// TestMalformedRequests sends requests the pool never would, over a real tunnel
// connection, and expects 400.
func TestMalformedRequests(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	p := m.pool(t)
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	fwd := hpack.HeaderField{Name: "forwarded", Value: FormatForwarded(testSrc)}
	method := hpack.HeaderField{Name: ":method", Value: "CONNECT"}
	auth := hpack.HeaderField{Name: ":authority", Value: app.String()}
	for _, tc := range []struct {
		name   string
		fields []hpack.HeaderField
	}{
		{"GET instead of CONNECT", []hpack.HeaderField{{Name: ":method", Value: "GET"}, auth, {Name: ":path", Value: "/"}, {Name: ":scheme", Value: "https"}, fwd}},
		{"no :method", []hpack.HeaderField{auth, fwd}},
		{"CONNECT with :path", []hpack.HeaderField{method, auth, {Name: ":path", Value: "/"}, fwd}},
		{"extended CONNECT", []hpack.HeaderField{method, auth, {Name: ":protocol", Value: "websocket"}, fwd}},
		{"authority is a name", []hpack.HeaderField{method, {Name: ":authority", Value: "reviews:9080"}, fwd}},
		{"Forwarded without for=", []hpack.HeaderField{method, auth, {Name: "forwarded", Value: `by="1.2.3.4:5"`}}},
		{"Forwarded with a name, not an address", []hpack.HeaderField{method, auth, {Name: "forwarded", Value: `for=frontend`}}},
		{"two Forwarded headers", []hpack.HeaderField{method, auth, fwd, fwd}},
		{"header list too large", []hpack.HeaderField{method, auth, fwd, {Name: "x-big", Value: strings.Repeat("a", maxHeaderList)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := rawConnect(t, p, k, tc.fields); got != http.StatusBadRequest {
				t.Fatalf("status %d, want 400", got)
			}
		})
	}
	if n := len(hb.requests()); n != 0 {
		t.Fatalf("handler saw %d malformed requests", n)
	}
}

// rawConnect sends a CONNECT with exactly fields on a pooled connection and returns the
// status.
func rawConnect(t *testing.T, p *Pool, k Key, fields []hpack.HeaderField) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p.init()
	c, err := p.get(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.openStream(fields)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	err = p.await(ctx, s)
	var se *StatusError
	if err == nil {
		return http.StatusOK
	}
	if !errors.As(err, &se) {
		t.Fatalf("CONNECT: %v", err)
	}
	return se.Code
}

// Istio's Go dialer sends no Forwarded header: the source is then the tunnel's peer.
func TestConnectWithoutForwarded(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	p := m.pool(t)
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	got := rawConnect(t, p, k, []hpack.HeaderField{{Name: ":method", Value: "CONNECT"}, {Name: ":authority", Value: app.String()}})
	if got != http.StatusOK {
		t.Fatalf("status %d, want 200", got)
	}
	r := hb.requests()[0]
	if r.Forwarded || r.Source.Addr() != netip.MustParseAddr("127.0.0.1") || r.Source != r.Remote {
		t.Fatalf("source %v (forwarded %v), want the tunnel peer %v", r.Source, r.Forwarded, r.Remote)
	}
}

// The client sends Forwarded (with ;host= for a Service), baggage and traceparent, as
// ztunnel does; the server reads host, baggage and traceparent for logs only.
func TestClientSendsZtunnelHeaders(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	p := m.pool(t)
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := p.Open(ctx, k, Target{Authority: app, Source: testSrc, Host: "reviews.bookinfo.svc.cluster.local", Baggage: "k8s.namespace.name=bookinfo,service.name=frontend"})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	r := hb.requests()[0]
	if !r.Forwarded || r.Source != testSrc || r.Host != "reviews.bookinfo.svc.cluster.local" ||
		r.Baggage != "k8s.namespace.name=bookinfo,service.name=frontend" || len(r.TraceParent) != 55 {
		t.Fatalf("server saw %+v", r)
	}
}

func TestIdentitiesAreChecked(t *testing.T) {
	m := newMesh(t)
	app := upstream(t, echo)
	t.Run("server presents the wrong identity", func(t *testing.T) {
		hb := startServer(t, m.serverConfig(legacy), nil)
		p := m.pool(t)
		k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
		if _, err := p.Connect(context.Background(), k, app, testSrc); err == nil {
			t.Fatal("client accepted a server with the wrong identity")
		}
		if p.Conns(k) != 0 {
			t.Fatal("a failed connection stayed in the pool")
		}
	})
	t.Run("client presents a certificate of another mesh", func(t *testing.T) {
		other := newMesh(t)
		hb := startServer(t, m.serverConfig(reviews), nil)
		p := &Pool{TLSConfig: func(_ context.Context, k Key) (*tls.Config, error) {
			// The other mesh's frontend certificate, trusting our server's bundle.
			return identity.ClientConfig(other.certs[frontend], reviews, m.bundle), nil
		}}
		defer p.Close()
		if _, err := p.Connect(context.Background(), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app, testSrc); err == nil {
			t.Fatal("server accepted a client certificate from a foreign root")
		}
		if len(hb.requests()) != 0 {
			t.Fatal("the handler saw the foreign client")
		}
	})
}

func TestPoolSharesConnections(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	p := m.pool(t)
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := connect(t, p, k, app)
			fmt.Fprint(s, "ping")
			s.CloseWrite()
			if b, _ := io.ReadAll(s); string(b) != "ping" {
				t.Errorf("echo %q", b)
			}
		}()
	}
	wg.Wait()
	if n := p.Conns(k); n != 1 {
		t.Fatalf("%d connections for 20 concurrent streams of one key, want 1", n)
	}
	other := Key{Src: legacy, Dst: reviews, Addr: hb.addr}
	connect(t, p, other, app)
	if p.Conns(other) != 1 || p.Conns(k) != 1 {
		t.Fatal("a different source identity shares a connection")
	}
}

func TestPoolCapsStreamsPerConnection(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	p := m.pool(t)
	p.MaxStreams = 2
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	s1, s2 := connect(t, p, k, app), connect(t, p, k, app)
	if n := p.Conns(k); n != 1 {
		t.Fatalf("%d connections for 2 streams, want 1", n)
	}
	connect(t, p, k, app)
	if n := p.Conns(k); n != 2 {
		t.Fatalf("%d connections for 3 streams with a cap of 2, want 2", n)
	}
	s1.Close()
	s2.Close()
	connect(t, p, k, app) // fits in the first connection again
	if n := p.Conns(k); n != 2 {
		t.Fatalf("%d connections after streams were freed, want 2", n)
	}
}

func TestPoolClosesIdleConnections(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	p := m.pool(t)
	p.IdleTimeout = 100 * time.Millisecond
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	s := connect(t, p, k, app)
	s.CloseWrite()
	io.ReadAll(s)
	s.Close()
	eventually(t, "the idle connection to close", func() bool { return p.Conns(k) == 0 })
	// A new key sweeps the dead one out of the pool's map.
	connect(t, p, Key{Src: legacy, Dst: reviews, Addr: hb.addr}, app)
	p.mu.Lock()
	_, stale := p.entries[k]
	p.mu.Unlock()
	if stale {
		t.Fatal("the idle key is still in the pool's map")
	}
}

func TestPoolEvictsFailedConnection(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	p := m.pool(t)
	var dials atomic.Int32
	var last atomic.Pointer[net.Conn]
	p.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err == nil {
			last.Store(&c)
		}
		return c, err
	}
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	s := connect(t, p, k, app)
	s.Close()
	(*last.Load()).Close() // the connection breaks under the pool
	eventually(t, "the pool to notice", func() bool { return p.Conns(k) == 0 })
	s = connect(t, p, k, app)
	fmt.Fprint(s, "again")
	s.CloseWrite()
	if b, _ := io.ReadAll(s); string(b) != "again" {
		t.Fatalf("after eviction: %q", b)
	}
	if n := dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2", n)
	}
}

func TestConcurrentFirstConnectsDialOnce(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	p := m.pool(t)
	var dials atomic.Int32
	p.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() { defer wg.Done(); connect(t, p, k, app) }()
	}
	wg.Wait()
	if n := dials.Load(); n != 1 {
		t.Fatalf("%d dials for 10 concurrent first streams, want 1", n)
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
