package interop

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/veilmesh/veil/identity"
)

// The workloads of the tests: frontend calls reviews.
var (
	frontend = spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/frontend")
	reviews  = spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/reviews")
)

// mesh is a veil CA and certificates it issued for frontend and reviews.
type mesh struct {
	ca     *identity.CA
	bundle *x509bundle.Set
	roots  *x509.CertPool
	certs  map[spiffeid.ID]*identity.Certificate
}

func newMesh(t testing.TB) *mesh {
	t.Helper()
	ca, err := identity.NewSelfSignedCA(identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	mgr, err := identity.NewManager(identity.ManagerOptions{Issuer: ca, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mgr.Close() })
	m := &mesh{
		ca:     ca,
		bundle: x509bundle.NewSet(x509bundle.FromX509Authorities(ca.TrustDomain(), ca.Roots())),
		roots:  x509.NewCertPool(),
		certs:  map[spiffeid.ID]*identity.Certificate{},
	}
	for _, r := range ca.Roots() {
		m.roots.AddCert(r)
	}
	for _, id := range []spiffeid.ID{frontend, reviews} {
		c, err := mgr.Get(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		m.certs[id] = c
	}
	return m
}

// Get implements identity.CertSource.
func (m *mesh) Get(_ context.Context, id spiffeid.ID) (*identity.Certificate, error) {
	c, ok := m.certs[id]
	if !ok {
		return nil, fmt.Errorf("no certificate for %s", id)
	}
	return c, nil
}

// plainTLS is a crypto/tls configuration built without veil's helpers, as an Istio Go
// client would hold one: it presents cert and accepts a server whose chain verifies to
// roots and whose URI SAN is want (SPIFFE certificates carry no DNS name to check).
func plainTLS(cert *identity.Certificate, want spiffeid.ID, roots *x509.CertPool) *tls.Config {
	return &tls.Config{
		Certificates:       []tls.Certificate{*cert.TLSCertificate()},
		InsecureSkipVerify: true, // replaced by VerifyConnection: no hostname to verify
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("server presented no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			if _, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter}); err != nil {
				return err
			}
			got, err := x509svid.IDFromCert(cs.PeerCertificates[0])
			if err != nil {
				return err
			}
			if got != want {
				return fmt.Errorf("server is %s, want %s", got, want)
			}
			return nil
		},
	}
}

// backend is an application on loopback; each connection is handed to serve, and
// closed when serve returns.
func backend(t testing.TB, serve func(c *net.TCPConn)) netip.AddrPort {
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
				c.SetDeadline(time.Now().Add(30 * time.Second))
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

// exchange writes n random bytes to c while reading them back, and checks they come
// back unchanged: bytes flow both ways through whatever lies between.
func exchange(c io.ReadWriter, n int) error {
	want := make([]byte, n)
	rand.Read(want)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(want)
		werr <- err
	}()
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("reading the echo: %w", err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("the echo of %d bytes differs from what was sent", n)
	}
	return nil
}

// testLogger logs to t; give it only to components that stop before the test ends.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}
