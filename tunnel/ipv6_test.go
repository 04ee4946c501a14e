package tunnel

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

func TestFormatAuthorityAndForwarded(t *testing.T) {
	for _, tc := range []struct {
		name, in, authority, forwarded string
	}{
		{"ipv4", "10.1.0.7:40000", "10.1.0.7:40000", `for="10.1.0.7:40000"`},
		{"ipv6 in brackets", "[fd00:100:1::11]:15008", "[fd00:100:1::11]:15008", `for="[fd00:100:1::11]:15008"`},
		{"ipv4-mapped written as ipv4", "[::ffff:10.1.0.7]:5", "10.1.0.7:5", `for="10.1.0.7:5"`},
		{"zone dropped", "[fe80::1%eth0]:7", "[fe80::1]:7", `for="[fe80::1]:7"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ap := netip.MustParseAddrPort(tc.in)
			if got := FormatAuthority(ap); got != tc.authority {
				t.Errorf("FormatAuthority(%s) = %q, want %q", tc.in, got, tc.authority)
			}
			if got := FormatForwarded(ap); got != tc.forwarded {
				t.Errorf("FormatForwarded(%s) = %q, want %q", tc.in, got, tc.forwarded)
			}
			// What the client writes, the server reads back as the same address.
			if got, err := ParseForwarded(FormatForwarded(ap)); err != nil || got != netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port()) {
				t.Errorf("ParseForwarded(FormatForwarded(%s)) = %v, %v", tc.in, got, err)
			}
		})
	}
}

// listen6 listens on the IPv6 loopback, failing (not skipping) where it has none: every
// Linux CI machine has ::1 unless booted with ipv6.disable=1.
func listen6(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Fatalf("listen on [::1]: %v (a kernel without IPv6?)", err)
	}
	return l
}

// HBONE over IPv6 end to end: the tunnel is dialled to [::1], the authority is the
// application's IPv6 address, and the Forwarded source an IPv6 pod address, which the
// server hands to its handler unchanged, with the destination, so that the handler can
// dial the application from it.
func TestHBONEOverIPv6(t *testing.T) {
	m := newMesh(t)
	lis := listen6(t)
	hb := &hbone{addr: lis.Addr().(*net.TCPAddr).AddrPort()}
	app6 := listen6(t)
	app := app6.Addr().(*net.TCPAddr).AddrPort()
	var wg sync.WaitGroup
	t.Cleanup(func() { app6.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := app6.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); defer c.Close(); echo(c.(*net.TCPConn)) }()
		}
	}()
	hb.srv = &Server{TLSConfig: m.serverConfig(reviews), Handler: HandlerFunc(func(ctx context.Context, r *Request) (net.Conn, error) {
		hb.mu.Lock()
		hb.reqs = append(hb.reqs, r)
		hb.mu.Unlock()
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", r.Destination.String())
		if err != nil {
			return nil, Unreachable(err)
		}
		return c, nil
	})}
	go hb.srv.Serve(lis)
	t.Cleanup(func() { hb.srv.Close() })

	src := netip.MustParseAddrPort("[fd00:100:1::11]:40000")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p := m.pool(t)
	s, err := p.Connect(ctx, Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app, src)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Write([]byte("hello over hbone on ipv6")); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	if got, err := io.ReadAll(s); err != nil || string(got) != "hello over hbone on ipv6" {
		t.Fatalf("echo = %q, %v", got, err)
	}
	reqs := hb.requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests", len(reqs))
	}
	r := reqs[0]
	if !r.Forwarded || r.Source != src || r.Destination != app || r.Remote.Addr() != netip.IPv6Loopback() || r.Peer != frontend {
		t.Fatalf("server saw peer %v source %v (forwarded %v) destination %v remote %v; want %v %v %v from ::1",
			r.Peer, r.Source, r.Forwarded, r.Destination, r.Remote, frontend, src, app)
	}

	// Without Forwarded (Istio's Go dialer), the source is the tunnel's own IPv6 peer.
	if got := rawConnect(t, p, Key{Src: frontend, Dst: reviews, Addr: hb.addr},
		[]hpack.HeaderField{{Name: ":method", Value: "CONNECT"}, {Name: ":authority", Value: "[" + app.Addr().String() + "]:" + itoa(app.Port())}}); got != http.StatusOK {
		t.Fatalf("CONNECT without Forwarded: status %d, want 200", got)
	}
	if r := hb.requests()[1]; r.Forwarded || r.Source != r.Remote || !r.Source.Addr().Is6() {
		t.Fatalf("without Forwarded: source %v (forwarded %v), want the IPv6 tunnel peer %v", r.Source, r.Forwarded, r.Remote)
	}

	// An IPv6 authority must be in brackets, and must be the address the tunnel was
	// dialled on: another family's address is not.
	for _, authority := range []string{"::1:" + itoa(app.Port()), "127.0.0.1:" + itoa(app.Port()), "[::2]:" + itoa(app.Port())} {
		if got := rawConnect(t, p, Key{Src: frontend, Dst: reviews, Addr: hb.addr},
			[]hpack.HeaderField{{Name: ":method", Value: "CONNECT"}, {Name: ":authority", Value: authority}, {Name: "forwarded", Value: FormatForwarded(src)}}); got != http.StatusBadRequest {
			t.Errorf("authority %q on a tunnel to [::1]: status %d, want 400", authority, got)
		}
	}
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }

// The client's CONNECT as another HTTP/2 server (Go's own) reads it: the IPv6
// :authority in brackets, Forwarded for="[addr]:port" quoted, IPv4-mapped addresses
// written as IPv4.
func TestClientWritesIPv6AuthorityAndForwarded(t *testing.T) {
	m := newMesh(t)
	lis := listen6(t)
	type seen struct{ host, forwarded string }
	got := make(chan seen, 4)
	var wg sync.WaitGroup
	t.Cleanup(func() { lis.Close(); wg.Wait() })
	cfg := m.serverConfig(reviews)
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
				tc := tls.Server(c, cfg)
				defer tc.Close()
				if tc.HandshakeContext(context.Background()) != nil {
					return
				}
				(&http2.Server{}).ServeConn(tc, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					got <- seen{r.Host, r.Header.Get("Forwarded")}
					if r.Method != http.MethodConnect {
						w.WriteHeader(http.StatusMethodNotAllowed)
						return
					}
					w.WriteHeader(http.StatusOK)
				})})
			}()
		}
	}()
	p := m.pool(t)
	k := Key{Src: frontend, Dst: reviews, Addr: lis.Addr().(*net.TCPAddr).AddrPort()}
	for _, tc := range []struct {
		authority, source, host, forwarded string
	}{
		{"[fd00:100:2::10]:9080", "[fd00:100:1::11]:40000", "[fd00:100:2::10]:9080", `for="[fd00:100:1::11]:40000"`},
		{"[::ffff:10.100.2.10]:9080", "[::ffff:10.100.1.11]:40000", "10.100.2.10:9080", `for="10.100.1.11:40000"`},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		s, err := p.Connect(ctx, k, netip.MustParseAddrPort(tc.authority), netip.MustParseAddrPort(tc.source))
		cancel()
		if err != nil {
			t.Fatalf("CONNECT %s: %v", tc.authority, err)
		}
		s.Close()
		if g := <-got; g.host != tc.host || g.forwarded != tc.forwarded {
			t.Errorf("CONNECT %s from %s: the server read :authority %q, Forwarded %q; want %q, %q", tc.authority, tc.source, g.host, g.forwarded, tc.host, tc.forwarded)
		}
	}
}
