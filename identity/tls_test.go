package identity

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	clocktesting "k8s.io/utils/clock/testing"
)

type staticCerts map[spiffeid.ID]*Certificate

func (s staticCerts) Get(_ context.Context, id spiffeid.ID) (*Certificate, error) {
	if c := s[id]; c != nil {
		return c, nil
	}
	return nil, errors.New("no certificate")
}

func issueCert(t testing.TB, ca *CA, id spiffeid.ID, ttl time.Duration) *Certificate {
	t.Helper()
	key, csr, err := NewCSR(id)
	if err != nil {
		t.Fatal(err)
	}
	iss, err := ca.Sign(csr, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return newCertificate(iss, key)
}

func bundleOf(cas ...*CA) *x509bundle.Set {
	s := x509bundle.NewSet()
	for _, ca := range cas {
		s.Add(x509bundle.FromX509Authorities(ca.TrustDomain(), ca.Roots()))
	}
	return s
}

// handshake runs a server with serverCfg on loopback and a client with clientCfg, and
// returns each side's handshake error and the server's view of the peer.
func handshake(t *testing.T, serverCfg, clientCfg *tls.Config) (serverErr, clientErr error, peer spiffeid.ID, cs tls.ConnectionState) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	type result struct {
		err  error
		peer spiffeid.ID
	}
	done := make(chan result, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		tc := tls.Server(c, serverCfg)
		if err := tc.Handshake(); err != nil {
			done <- result{err: err}
			return
		}
		id, err := PeerID(tc.ConnectionState())
		// Prove the channel carries data both ways.
		_, _ = tc.Write([]byte("ok"))
		done <- result{err: err, peer: id}
	}()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", lis.Addr().String(), clientCfg)
	if err == nil {
		cs = conn.ConnectionState()
		buf := make([]byte, 2)
		if _, err = io.ReadFull(conn, buf); err == nil && string(buf) != "ok" {
			err = errors.New("wrong bytes")
		}
		conn.Close()
		clientErr = err
	} else {
		clientErr = err
	}
	r := <-done
	return r.err, clientErr, r.peer, cs
}

func TestMTLSHandshakeBetweenIssuedIdentities(t *testing.T) {
	srv := startCA(t, nil)
	reviews, ratings := mustID(t, "bookinfo", "reviews"), mustID(t, "bookinfo", "ratings")
	// Each node's manager fetches over gRPC with its own credential.
	m1, err := NewManager(ManagerOptions{Issuer: srv.client(t, testTokens["node-1"])})
	if err != nil {
		t.Fatal(err)
	}
	defer m1.Close()
	m2, err := NewManager(ManagerOptions{Issuer: srv.client(t, testTokens["node-2"])})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()

	ctx := context.Background()
	src, err := m2.Get(ctx, ratings)
	if err != nil {
		t.Fatal(err)
	}
	serverCfg := ServerConfig(func(net.Addr) (spiffeid.ID, bool) { return reviews, true }, m1, m1)
	serverErr, clientErr, peer, cs := handshake(t, serverCfg, ClientConfig(src, reviews, m2))
	if serverErr != nil || clientErr != nil {
		t.Fatalf("handshake: server %v, client %v", serverErr, clientErr)
	}
	if peer != ratings {
		t.Errorf("server sees peer %v, want %v", peer, ratings)
	}
	if cs.Version != tls.VersionTLS13 || cs.NegotiatedProtocol != "h2" {
		t.Errorf("version %x ALPN %q, want TLS 1.3 and h2", cs.Version, cs.NegotiatedProtocol)
	}
	if got, _ := PeerID(cs); got != reviews {
		t.Errorf("client sees server %v, want %v", got, reviews)
	}
}

func TestMTLSRefuses(t *testing.T) {
	now := time.Now()
	ca, err := NewSelfSignedCA(CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	foreignRoot, err := NewSelfSignedCA(CAOptions{}) // same trust domain, another root
	if err != nil {
		t.Fatal(err)
	}
	foreignTD, err := NewSelfSignedCA(CAOptions{TrustDomain: spiffeid.RequireTrustDomainFromString("other.example")})
	if err != nil {
		t.Fatal(err)
	}
	past := clocktesting.NewFakeClock(now.Add(-48 * time.Hour))
	expiredCA, err := NewSelfSignedCA(CAOptions{Clock: past})
	if err != nil {
		t.Fatal(err)
	}

	reviews, ratings, legacy := mustID(t, "bookinfo", "reviews"), mustID(t, "bookinfo", "ratings"), mustID(t, "legacy", "sleep")
	serverCert := issueCert(t, ca, reviews, time.Hour)
	local := func(net.Addr) (spiffeid.ID, bool) { return reviews, true }
	bundle := bundleOf(ca, foreignTD)
	serverCfg := ServerConfig(local, staticCerts{reviews: serverCert}, bundle)
	otherTDID, _ := NewID(foreignTD.TrustDomain(), "bookinfo", "ratings")

	tests := []struct {
		name      string
		server    *tls.Config
		client    *tls.Config
		refusedBy string // "server" or "client"
		reason    string // in the refusing side's error
	}{
		{
			name:      "server presents the wrong identity",
			server:    ServerConfig(local, staticCerts{reviews: issueCert(t, ca, legacy, time.Hour)}, bundle),
			client:    ClientConfig(issueCert(t, ca, ratings, time.Hour), reviews, bundle),
			refusedBy: "client",
			reason:    "unexpected ID",
		},
		{
			name:      "client expects another identity than the server has",
			server:    serverCfg,
			client:    ClientConfig(issueCert(t, ca, ratings, time.Hour), legacy, bundle),
			refusedBy: "client",
			reason:    "unexpected ID",
		},
		{
			name:      "client certificate from a foreign root",
			server:    serverCfg,
			client:    ClientConfig(issueCert(t, foreignRoot, ratings, time.Hour), reviews, bundle),
			refusedBy: "server",
			reason:    "unknown authority",
		},
		{
			name:      "client certificate expired",
			server:    ServerConfig(local, staticCerts{reviews: serverCert}, bundleOf(expiredCA)),
			client:    ClientConfig(issueCert(t, expiredCA, ratings, time.Hour), reviews, bundle),
			refusedBy: "server",
			reason:    "expired",
		},
		{
			name:      "client in another trust domain, even one in the bundle",
			server:    serverCfg,
			client:    ClientConfig(issueCert(t, foreignTD, otherTDID, time.Hour), reviews, bundle),
			refusedBy: "server",
			reason:    "unexpected trust domain",
		},
		{
			name:   "client offers only TLS 1.2",
			server: serverCfg,
			client: func() *tls.Config {
				c := ClientConfig(issueCert(t, ca, ratings, time.Hour), reviews, bundle)
				c.MinVersion, c.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
				return c
			}(),
			refusedBy: "server",
			reason:    "unsupported versions",
		},
		{
			name:      "no local workload at the dialled address",
			server:    ServerConfig(func(net.Addr) (spiffeid.ID, bool) { return spiffeid.ID{}, false }, staticCerts{}, bundle),
			client:    ClientConfig(issueCert(t, ca, ratings, time.Hour), reviews, bundle),
			refusedBy: "server",
			reason:    "no local workload",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			serverErr, clientErr, _, _ := handshake(t, tc.server, tc.client)
			t.Logf("server: %v; client: %v", serverErr, clientErr)
			if serverErr == nil && clientErr == nil {
				t.Fatal("handshake succeeded")
			}
			switch tc.refusedBy {
			case "server":
				if serverErr == nil || !strings.Contains(serverErr.Error(), tc.reason) {
					t.Fatalf("server error %v, want one about %q", serverErr, tc.reason)
				}
			case "client":
				// The client aborts the handshake: the server sees an alert or EOF, and the
				// client's error is the verification failure.
				if clientErr == nil || !strings.Contains(clientErr.Error(), tc.reason) {
					t.Fatalf("client error %v, want one about %q", clientErr, tc.reason)
				}
			}
		})
	}
}
