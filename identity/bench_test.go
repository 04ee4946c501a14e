package identity

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// BenchmarkCreateCertificateGRPC measures issuance end to end: a fresh key and CSR,
// CreateCertificate over gRPC+TLS on loopback with node authorization, and the client's
// check of the returned chain. Reports issuances/s.
func BenchmarkCreateCertificateGRPC(b *testing.B) {
	srv := startCA(b, nil)
	client := srv.client(b, testTokens["node-1"])
	id := mustID(b, "bookinfo", "reviews")
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			key, csr, err := NewCSR(id)
			if err != nil {
				b.Error(err)
				return
			}
			if _, err := client.Issue(ctx, id, csr, key, time.Hour); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "issuances/s")
}

// BenchmarkSign is the CA's share of an issuance, in process: CSR checks and signing.
func BenchmarkSign(b *testing.B) {
	ca, err := NewSelfSignedCA(CAOptions{})
	if err != nil {
		b.Fatal(err)
	}
	_, csr, err := NewCSR(mustID(b, "bookinfo", "reviews"))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ca.Sign(csr, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMTLSHandshake measures a full TLS 1.3 mutual handshake between two issued
// identities with the tunnel's configurations, over loopback TCP. Reports handshakes/s.
func BenchmarkMTLSHandshake(b *testing.B) {
	ca, err := NewSelfSignedCA(CAOptions{})
	if err != nil {
		b.Fatal(err)
	}
	reviews, ratings := mustID(b, "bookinfo", "reviews"), mustID(b, "bookinfo", "ratings")
	bundle := bundleOf(ca)
	serverCfg := ServerConfig(func(net.Addr) (spiffeid.ID, bool) { return reviews, true }, staticCerts{reviews: issueCert(b, ca, reviews, time.Hour)}, bundle)
	clientCfg := ClientConfig(issueCert(b, ca, ratings, time.Hour), reviews, bundle)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := tls.Server(c, serverCfg)
				if tc.Handshake() == nil {
					_, _ = tc.Write([]byte{1})
				}
			}()
		}
	}()
	b.ReportAllocs()
	start := time.Now()
	buf := make([]byte, 1)
	for b.Loop() {
		c, err := tls.Dial("tcp", lis.Addr().String(), clientCfg)
		if err != nil {
			b.Fatal(err)
		}
		// Read the server's byte so the server side of the handshake is counted too.
		if _, err := c.Read(buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "handshakes/s")
}
