package interop

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/tunnel"
	"istio.io/istio/pkg/hbone"
)

// payload is how many bytes each direction carries: more than one flow-control window
// of Go's HTTP/2 defaults, so window updates are exercised on both sides.
const payload = 1 << 20

// TestIstioDialerToVeilServer: Istio's HBONE dialer CONNECTs through veil's HBONE server
// to a loopback echo backend. Istio's dialer sends no Forwarded header (nor baggage or
// traceparent), so veil's server must take the source from the TCP peer.
func TestIstioDialerToVeilServer(t *testing.T) {
	m := newMesh(t)
	echoAddr := backend(t, echo)

	type ended struct {
		c   tunnel.Counts
		err error
	}
	reqs := make(chan *tunnel.Request, 1)
	done := make(chan ended, 1)
	srv := &tunnel.Server{
		TLSConfig: identity.ServerConfig(func(net.Addr) (spiffeid.ID, bool) { return reviews, true }, m, m.bundle),
		Handler: tunnel.HandlerFunc(func(ctx context.Context, r *tunnel.Request) (net.Conn, error) {
			reqs <- r
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", r.Destination.String())
			if err != nil {
				return nil, tunnel.Unreachable(err)
			}
			return c, nil
		}),
		Done: func(_ *tunnel.Request, c tunnel.Counts, err error) { done <- ended{c, err} },
		Log:  testLogger(t),
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; !errors.Is(err, tunnel.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})

	d := hbone.NewDialer(hbone.Config{
		ProxyAddress: lis.Addr().String(),
		TLS:          plainTLS(m.certs[frontend], reviews, m.roots),
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", echoAddr.String())
	if err != nil {
		t.Fatalf("Istio's dialer: CONNECT %s through veil's server: %v", echoAddr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))

	if err := exchange(c, payload); err != nil {
		t.Fatal(err)
	}

	r := <-reqs
	if r.Peer != frontend {
		t.Errorf("Request.Peer = %s, want %s", r.Peer, frontend)
	}
	if r.Destination != echoAddr {
		t.Errorf("Request.Destination = %s, want %s", r.Destination, echoAddr)
	}
	if r.Source != r.Remote {
		t.Errorf("Request.Source = %s; with no Forwarded header it must be the TCP peer %s", r.Source, r.Remote)
	}

	// Closing the dialer's connection ends the request body (END_STREAM): the echo
	// backend sees EOF, closes, and the stream ends with every byte counted.
	c.Close()
	select {
	case e := <-done:
		if e.c.AToB != payload || e.c.BToA != payload {
			t.Errorf("stream counted %d bytes to the client and %d to the backend, want %d each", e.c.AToB, e.c.BToA, payload)
		}
		if e.err != nil {
			t.Errorf("stream ended with %v", e.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the stream did not end after Istio's dialer closed its connection")
	}
}

// istioServer runs Istio's HBONE server (hbone.NewServer) behind TLS as Istio's echo
// test application serves it: ALPN h2, here with reviews's certificate and client
// certificates required from the mesh's roots. It returns the address to dial.
func istioServer(t *testing.T, m *mesh) netip.AddrPort {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis := tls.NewListener(raw, &tls.Config{
		Certificates: []tls.Certificate{*m.certs[reviews].TLSCertificate()},
		NextProtos:   []string{"h2"},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    m.roots,
		MinVersion:   tls.VersionTLS12,
	})
	srv := hbone.NewServer()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Istio's server: Serve: %v", err)
		}
	})
	return raw.Addr().(*net.TCPAddr).AddrPort()
}

// veilPool is veil's HBONE client as the agent configures it: the source's certificate,
// and only the destination's identity accepted.
func veilPool(t *testing.T, m *mesh) *tunnel.Pool {
	p := &tunnel.Pool{TLSConfig: func(_ context.Context, k tunnel.Key) (*tls.Config, error) {
		return identity.ClientConfig(m.certs[k.Src], k.Dst, m.bundle), nil
	}}
	t.Cleanup(func() { p.Close() })
	return p
}

var testSrc = netip.MustParseAddrPort("10.1.0.7:40000")

// connect opens a stream through p; it is closed at the latest 10s later, so that a
// stuck read fails the test rather than hang it.
func connect(t *testing.T, p *tunnel.Pool, k tunnel.Key, authority netip.AddrPort) *tunnel.Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := p.Connect(ctx, k, authority, testSrc)
	if err != nil {
		t.Fatalf("veil's Pool: CONNECT %s through Istio's server: %v", authority, err)
	}
	timer := time.AfterFunc(10*time.Second, func() { s.Close() })
	t.Cleanup(func() { timer.Stop(); s.Close() })
	return s
}

// TestVeilPoolToIstioServer: veil's HBONE client CONNECTs through Istio's HBONE server.
func TestVeilPoolToIstioServer(t *testing.T) {
	m := newMesh(t)
	key := tunnel.Key{Src: frontend, Dst: reviews, Addr: istioServer(t, m)}

	t.Run("bytes both ways", func(t *testing.T) {
		p := veilPool(t, m)
		s := connect(t, p, key, backend(t, echo))
		if err := exchange(s, payload); err != nil {
			t.Fatal(err)
		}
		if err := s.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if b, err := io.ReadAll(s); err != nil || len(b) != 0 {
			t.Fatalf("after the echo and a half-close: read %d more bytes, err %v; want EOF", len(b), err)
		}
	})

	// Client first: veil's CloseWrite reaches the backend as a FIN while the stream still
	// carries the answer back, then the backend's close ends the stream. (The other order,
	// backend first, Istio's Go server cannot do: net/http ends a response only when the
	// handler returns, which it does once the request body has ended.)
	t.Run("client half-close", func(t *testing.T) {
		p := veilPool(t, m)
		counter := backend(t, func(c *net.TCPConn) {
			n, err := io.Copy(io.Discard, c)
			if err != nil {
				fmt.Fprintf(c, "read error after %d bytes: %v", n, err)
				return
			}
			fmt.Fprintf(c, "got %d bytes", n)
		})
		s := connect(t, p, key, counter)
		werr := make(chan error, 1)
		go func() {
			_, err := s.Write(make([]byte, payload))
			if err == nil {
				err = s.CloseWrite()
			}
			werr <- err
		}()
		got, err := io.ReadAll(s)
		if err != nil {
			t.Fatalf("reading the answer: %v", err)
		}
		if err := <-werr; err != nil {
			t.Fatalf("writing: %v", err)
		}
		if want := "got " + strconv.Itoa(payload) + " bytes"; string(got) != want {
			t.Fatalf("backend answered %q, want %q", got, want)
		}
	})

	t.Run("streams share a connection", func(t *testing.T) {
		p := veilPool(t, m)
		echoAddr := backend(t, echo)
		const n = 8
		var wg sync.WaitGroup
		for range n {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				s, err := p.Connect(ctx, key, echoAddr, testSrc)
				if err != nil {
					t.Error(err)
					return
				}
				defer s.Close()
				timer := time.AfterFunc(10*time.Second, func() { s.Close() })
				defer timer.Stop()
				if err := exchange(s, 64<<10); err != nil {
					t.Error(err)
					return
				}
				s.CloseWrite()
				io.Copy(io.Discard, s)
			})
		}
		wg.Wait()
		if got := p.Conns(key); got != 1 {
			t.Errorf("%d streams used %d connections, want 1", n, got)
		}
	})

	// Istio's server sends its 200 before dialling, so an unreachable destination shows
	// as a stream that ends at once rather than as a 503. Either way veil's client must
	// not hang.
	t.Run("unreachable destination", func(t *testing.T) {
		p := veilPool(t, m)
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		closed := l.Addr().(*net.TCPAddr).AddrPort()
		l.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := p.Connect(ctx, key, closed, testSrc)
		if err != nil {
			if code := tunnel.StatusCode(err); code != http.StatusServiceUnavailable {
				t.Fatalf("Connect to a closed port: %v (status %d), want 503 or a stream that ends", err, code)
			}
			return
		}
		defer s.Close()
		readDone := make(chan error, 1)
		go func() {
			_, err := io.ReadAll(s)
			readDone <- err
		}()
		select {
		case err := <-readDone:
			t.Logf("Istio's server answered 200 for a closed port; the stream then ended (read error: %v)", err)
		case <-time.After(5 * time.Second):
			t.Fatal("the stream to a closed port did not end")
		}
	})
}
