package identity

import (
	"crypto/x509"
	"errors"
	"testing"
)

// FuzzParseCSR feeds arbitrary bytes to the CA's CSR handling: it never panics, refuses
// with ErrInvalidCSR, and whatever it accepts obeys the signing rules.
func FuzzParseCSR(f *testing.F) {
	f.Add(csrPEM(f, &x509.CertificateRequest{URIs: uris(f, "spiffe://cluster.local/ns/a/sa/b")}, mustKey(f)))
	f.Add(csrPEM(f, &x509.CertificateRequest{URIs: uris(f, "spiffe://cluster.local/ns/a/sa/b"), DNSNames: []string{"x"}}, mustKey(f)))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nMAA=\n-----END CERTIFICATE REQUEST-----\n"))
	f.Add([]byte(""))
	ca, err := NewSelfSignedCA(CAOptions{})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		csr, id, err := ParseCSR(data, testTD)
		if err != nil {
			if !errors.Is(err, ErrInvalidCSR) {
				t.Fatalf("refusal %v does not wrap ErrInvalidCSR", err)
			}
			return
		}
		if len(csr.URIs) != 1 || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) != 0 || !id.MemberOf(testTD) {
			t.Fatalf("accepted a CSR that breaks the rules: %+v", csr)
		}
		iss, err := ca.Sign(data, 0)
		if err != nil {
			t.Fatalf("ParseCSR accepted but Sign refused: %v", err)
		}
		if iss.Leaf().IsCA || iss.ID != id {
			t.Fatalf("issued %v (CA %v) for %v", iss.ID, iss.Leaf().IsCA, id)
		}
	})
}
