package tunnel

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
)

// mesh is a CA and the certificates of a few identities, issued for real.
type mesh struct {
	ca     *identity.CA
	bundle *x509bundle.Set
	certs  map[spiffeid.ID]*identity.Certificate
}

var (
	frontend = spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/frontend")
	reviews  = spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/reviews")
	legacy   = spiffeid.RequireFromString("spiffe://cluster.local/ns/legacy/sa/sleep")
)

func newMesh(t testing.TB) *mesh {
	t.Helper()
	ca, err := identity.NewSelfSignedCA(identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m := &mesh{ca: ca, bundle: x509bundle.NewSet(x509bundle.FromX509Authorities(ca.TrustDomain(), ca.Roots())), certs: map[spiffeid.ID]*identity.Certificate{}}
	mgr, err := identity.NewManager(identity.ManagerOptions{Issuer: ca})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mgr.Close() })
	for _, id := range []spiffeid.ID{frontend, reviews, legacy} {
		c, err := mgr.Get(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		m.certs[id] = c
	}
	return m
}

func (m *mesh) Get(_ context.Context, id spiffeid.ID) (*identity.Certificate, error) {
	return m.certs[id], nil
}

// serverConfig presents id's certificate whatever the dialled address.
func (m *mesh) serverConfig(id spiffeid.ID) *tls.Config {
	return identity.ServerConfig(func(net.Addr) (spiffeid.ID, bool) { return id, true }, m, m.bundle)
}

// pool returns a client pool whose connections present k.Src and expect k.Dst.
func (m *mesh) pool(t testing.TB) *Pool {
	p := &Pool{TLSConfig: func(_ context.Context, k Key) (*tls.Config, error) {
		return identity.ClientConfig(m.certs[k.Src], k.Dst, m.bundle), nil
	}}
	t.Cleanup(func() { p.Close() })
	return p
}

// hbone is a running Server on loopback that dials the request's destination.
type hbone struct {
	srv  *Server
	addr netip.AddrPort

	mu   sync.Mutex
	reqs []*Request
	done []Counts
}

func startServer(t testing.TB, cfg *tls.Config, h Handler) *hbone {
	t.Helper()
	return startServerWith(t, cfg, h, nil)
}

// startServerWith is startServer with opt applied to the Server before it serves.
func startServerWith(t testing.TB, cfg *tls.Config, h Handler, opt func(*Server)) *hbone {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hb := &hbone{addr: lis.Addr().(*net.TCPAddr).AddrPort()}
	if h == nil {
		h = HandlerFunc(func(ctx context.Context, r *Request) (net.Conn, error) {
			hb.mu.Lock()
			hb.reqs = append(hb.reqs, r)
			hb.mu.Unlock()
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", r.Destination.String())
			if err != nil {
				return nil, Unreachable(err)
			}
			return c, nil
		})
	}
	hb.srv = &Server{TLSConfig: cfg, Handler: h, Done: func(_ *Request, c Counts, _ error) {
		hb.mu.Lock()
		hb.done = append(hb.done, c)
		hb.mu.Unlock()
	}}
	if opt != nil {
		opt(hb.srv)
	}
	go hb.srv.Serve(lis)
	t.Cleanup(func() { hb.srv.Close() })
	return hb
}

func (hb *hbone) requests() []*Request {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	return append([]*Request(nil), hb.reqs...)
}

// upstream is an application on loopback: each connection is handed to serve.
func upstream(t testing.TB, serve func(c *net.TCPConn)) netip.AddrPort {
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
				serve(c.(*net.TCPConn))
			}()
		}
	}()
	return lis.Addr().(*net.TCPAddr).AddrPort()
}

// echo copies what it reads back until EOF, then half-closes.
func echo(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
}

var testSrc = netip.MustParseAddrPort("10.1.0.7:40000")

func connect(t testing.TB, p *Pool, k Key, authority netip.AddrPort) *Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := p.Connect(ctx, k, authority, testSrc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}
