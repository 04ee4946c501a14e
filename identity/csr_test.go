package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

func TestSignRefusesCSR(t *testing.T) {
	ca, err := NewSelfSignedCA(CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	good := "spiffe://cluster.local/ns/bookinfo/sa/reviews"
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)

	tampered := func() []byte {
		b, _ := pem.Decode(csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good)}, mustKey(t)))
		b.Bytes[len(b.Bytes)-3] ^= 0xff // inside the signature
		return pem.EncodeToMemory(b)
	}

	tests := []struct {
		name string
		csr  []byte
	}{
		{"DNS SAN", csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good), DNSNames: []string{"reviews.bookinfo.svc"}}, mustKey(t))},
		{"IP SAN", csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good), IPAddresses: []net.IP{net.ParseIP("10.0.0.1")}}, mustKey(t))},
		{"email SAN", csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good), EmailAddresses: []string{"a@b.c"}}, mustKey(t))},
		{"two URI SANs", csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good, "spiffe://cluster.local/ns/bookinfo/sa/ratings")}, mustKey(t))},
		{"no URI SAN", csrPEM(t, &x509.CertificateRequest{}, mustKey(t))},
		{"foreign trust domain", csrPEM(t, &x509.CertificateRequest{URIs: uris(t, "spiffe://evil.example/ns/bookinfo/sa/reviews")}, mustKey(t))},
		{"URI SAN not spiffe", csrPEM(t, &x509.CertificateRequest{URIs: uris(t, "https://cluster.local/ns/a/sa/b")}, mustKey(t))},
		{"SPIFFE ID not a workload identity", csrPEM(t, &x509.CertificateRequest{URIs: uris(t, "spiffe://cluster.local/admin")}, mustKey(t))},
		{"bad signature", tampered()},
		{"ECDSA P-224 key", csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good)}, p224)},
		{"Ed25519 key", csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good)}, edKey)},
		{"RSA 1024 key", csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good)}, rsa1024)},
		{"not PEM", []byte("hello")},
		{"PEM of another type", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2, 3}})},
		{"data after the CSR", append(csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good)}, mustKey(t)), []byte("junk")...)},
		{"two CSRs", append(csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good)}, mustKey(t)), csrPEM(t, &x509.CertificateRequest{URIs: uris(t, good)}, mustKey(t))...)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			iss, err := ca.Sign(tc.csr, 0)
			if err == nil {
				t.Fatalf("signed %v, want a refusal", iss.ID)
			}
			if !errors.Is(err, ErrInvalidCSR) {
				t.Fatalf("error %v does not wrap ErrInvalidCSR", err)
			}
		})
	}
}

func TestSignAcceptsKeyTypes(t *testing.T) {
	ca, err := NewSelfSignedCA(CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rsa2048, _ := rsa.GenerateKey(rand.Reader, 2048)
	for name, key := range map[string]crypto.Signer{"ECDSA P-256": mustKey(t), "ECDSA P-384": p384, "RSA 2048": rsa2048} {
		t.Run(name, func(t *testing.T) {
			iss, err := ca.Sign(csrPEM(t, &x509.CertificateRequest{URIs: uris(t, "spiffe://cluster.local/ns/a/sa/b")}, key), 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := iss.check(key, time.Now()); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestSignedLeaf(t *testing.T) {
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	clk := clocktesting.NewFakeClock(now)
	ca, err := NewSelfSignedCA(CAOptions{Clock: clk, MaxTTL: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	csr := csrPEM(t, &x509.CertificateRequest{URIs: uris(t, "spiffe://cluster.local/ns/bookinfo/sa/reviews")}, mustKey(t))

	t.Run("properties", func(t *testing.T) {
		iss, err := ca.Sign(csr, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		leaf := iss.Leaf()
		if leaf.IsCA || !leaf.BasicConstraintsValid {
			t.Error("leaf is a CA or lacks basic constraints")
		}
		if leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
			t.Error("leaf may sign certificates")
		}
		eku := map[x509.ExtKeyUsage]bool{}
		for _, u := range leaf.ExtKeyUsage {
			eku[u] = true
		}
		if !eku[x509.ExtKeyUsageServerAuth] || !eku[x509.ExtKeyUsageClientAuth] || len(eku) != 2 {
			t.Errorf("ext key usage %v, want serverAuth and clientAuth", leaf.ExtKeyUsage)
		}
		if want := now.Add(-Backdate); !leaf.NotBefore.Equal(want) {
			t.Errorf("NotBefore %v, want backdated to %v", leaf.NotBefore, want)
		}
		if want := now.Add(time.Hour); !leaf.NotAfter.Equal(want) {
			t.Errorf("NotAfter %v, want %v", leaf.NotAfter, want)
		}
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://cluster.local/ns/bookinfo/sa/reviews" || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
			t.Errorf("SANs: URIs %v DNS %v IP %v email %v", leaf.URIs, leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
		}
	})
	for _, tc := range []struct {
		name      string
		ask, want time.Duration
	}{
		{"zero lifetime means the maximum", 0, 24 * time.Hour},
		{"longer than the maximum is clamped", 30 * 24 * time.Hour, 24 * time.Hour},
		{"shorter is honoured", 10 * time.Minute, 10 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			iss, err := ca.Sign(csr, tc.ask)
			if err != nil {
				t.Fatal(err)
			}
			if got := iss.Leaf().NotAfter.Sub(now); got != tc.want {
				t.Fatalf("lifetime %v, want %v", got, tc.want)
			}
		})
	}
	t.Run("negative lifetime is refused", func(t *testing.T) {
		if _, err := ca.Sign(csr, -time.Second); !errors.Is(err, ErrInvalidCSR) {
			t.Fatalf("error %v, want ErrInvalidCSR", err)
		}
	})
}

func TestLeafNeverOutlivesSigningCertificate(t *testing.T) {
	dir, _, inter := pluginCA(t)
	ca, err := LoadCA(dir, CAOptions{MaxTTL: 365 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	iss, err := ca.Sign(csrPEM(t, &x509.CertificateRequest{URIs: uris(t, "spiffe://cluster.local/ns/a/sa/b")}, mustKey(t)), 0)
	if err != nil {
		t.Fatal(err)
	}
	if !iss.Leaf().NotAfter.Equal(inter.NotAfter) {
		t.Fatalf("leaf NotAfter %v, want the intermediate's %v", iss.Leaf().NotAfter, inter.NotAfter)
	}
}
