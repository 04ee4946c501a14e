package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var testTD = spiffeid.RequireTrustDomainFromString("cluster.local")

func mustID(t testing.TB, ns, sa string) spiffeid.ID {
	t.Helper()
	id, err := NewID(testTD, ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func mustKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// csrPEM builds a CSR from tmpl signed by key.
func csrPEM(t testing.TB, tmpl *x509.CertificateRequest, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func uris(t testing.TB, ss ...string) []*url.URL {
	t.Helper()
	var out []*url.URL
	for _, s := range ss {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, u)
	}
	return out
}

// selfSigned makes a CA certificate; issuer nil means self-signed.
func caCert(t testing.TB, cn string, key crypto.Signer, issuer *x509.Certificate, issuerKey crypto.Signer, notBefore, notAfter time.Time) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	if issuer == nil {
		issuer, issuerKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, key.Public(), issuerKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func writeFile(t testing.TB, dir, name string, data []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func keyPEM(t testing.TB, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// pluginCA writes an Istio cacerts directory: root -> intermediate (the signing CA).
// It returns the directory, the root and the intermediate.
func pluginCA(t testing.TB) (string, *x509.Certificate, *x509.Certificate) {
	t.Helper()
	now := time.Now()
	rootKey, intKey := mustKey(t), mustKey(t)
	root := caCert(t, "operator root", rootKey, nil, nil, now.Add(-time.Hour), now.Add(365*24*time.Hour))
	inter := caCert(t, "operator intermediate", intKey, root, rootKey, now.Add(-time.Hour), now.Add(30*24*time.Hour))
	dir := t.TempDir()
	writeFile(t, dir, CACertFile, EncodeCertificates(inter))
	writeFile(t, dir, CAKeyFile, keyPEM(t, intKey))
	writeFile(t, dir, CertChainFile, EncodeCertificates(inter, root))
	writeFile(t, dir, RootCertFile, EncodeCertificates(root))
	return dir, root, inter
}
