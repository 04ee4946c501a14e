package identity

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrInvalidCSR is wrapped by every refusal of a CSR for what it contains (as opposed
// to who asked for it). The gRPC service maps it to InvalidArgument.
var ErrInvalidCSR = errors.New("invalid CSR")

// maxCSRSize bounds what the CA parses; a P-384 or RSA-4096 CSR is well under 4 KiB.
const maxCSRSize = 16 << 10

// minRSABits and maxRSABits bound RSA keys: below 2048 is weak; above 8192 only costs the
// CA time to verify.
const (
	minRSABits = 2048
	maxRSABits = 8192
)

func invalidCSR(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidCSR, fmt.Sprintf(format, args...))
}

// ParseCSR decodes a PEM certificate request (one CERTIFICATE REQUEST block and
// nothing else), checks its signature and the signing rules, and returns the request
// and the SPIFFE ID it asks for. The rules: exactly one URI SAN, a workload SPIFFE ID in
// trust domain td; no DNS, IP or email SANs; an ECDSA P-256/P-384 or RSA >= 2048 key.
func ParseCSR(csrPEM []byte, td spiffeid.TrustDomain) (*x509.CertificateRequest, spiffeid.ID, error) {
	if len(csrPEM) > maxCSRSize {
		return nil, spiffeid.ID{}, invalidCSR("%d bytes, larger than %d", len(csrPEM), maxCSRSize)
	}
	block, rest := pem.Decode(csrPEM)
	if block == nil {
		return nil, spiffeid.ID{}, invalidCSR("not PEM")
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, spiffeid.ID{}, invalidCSR("PEM block %q, want CERTIFICATE REQUEST", block.Type)
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, spiffeid.ID{}, invalidCSR("data after the CERTIFICATE REQUEST block")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, spiffeid.ID{}, invalidCSR("%v", err)
	}
	id, err := CheckCSR(csr, td)
	return csr, id, err
}

// CheckCSR applies the signing rules of ParseCSR to a parsed request.
func CheckCSR(csr *x509.CertificateRequest, td spiffeid.TrustDomain) (spiffeid.ID, error) {
	if err := csr.CheckSignature(); err != nil {
		return spiffeid.ID{}, invalidCSR("signature does not verify: %v", err)
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return spiffeid.ID{}, invalidCSR("ECDSA curve %s not accepted, want P-256 or P-384", k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if n := k.N.BitLen(); n < minRSABits || n > maxRSABits {
			return spiffeid.ID{}, invalidCSR("RSA key of %d bits not accepted, want %d to %d", n, minRSABits, maxRSABits)
		}
	default:
		return spiffeid.ID{}, invalidCSR("key type %T not accepted, want ECDSA P-256/P-384 or RSA >= %d", csr.PublicKey, minRSABits)
	}
	switch {
	case len(csr.DNSNames) > 0:
		return spiffeid.ID{}, invalidCSR("DNS SANs %q not allowed", csr.DNSNames)
	case len(csr.IPAddresses) > 0:
		return spiffeid.ID{}, invalidCSR("IP SANs %v not allowed", csr.IPAddresses)
	case len(csr.EmailAddresses) > 0:
		return spiffeid.ID{}, invalidCSR("email SANs %q not allowed", csr.EmailAddresses)
	case len(csr.URIs) != 1:
		return spiffeid.ID{}, invalidCSR("%d URI SANs, want exactly one SPIFFE ID", len(csr.URIs))
	}
	id, err := spiffeid.FromURI(csr.URIs[0])
	if err != nil {
		return spiffeid.ID{}, invalidCSR("URI SAN %q: %v", csr.URIs[0], err)
	}
	if !id.MemberOf(td) {
		return spiffeid.ID{}, invalidCSR("URI SAN %q is not in trust domain %q", id, td)
	}
	if _, _, err := Parts(id); err != nil {
		return spiffeid.ID{}, invalidCSR("URI SAN: %v", err)
	}
	return id, nil
}

// Issued is a signed leaf with the chain that links it to the trust bundle.
type Issued struct {
	ID spiffeid.ID
	// Chain is the leaf followed by the intermediates up to, not including, a root.
	Chain []*x509.Certificate
	// Roots is the CA's trust bundle (several roots during a rotation).
	Roots []*x509.Certificate
}

// Leaf is the issued certificate.
func (i *Issued) Leaf() *x509.Certificate { return i.Chain[0] }

// Sign checks a PEM CSR against the signing rules and issues a leaf for its SPIFFE ID.
// ttl is the requested lifetime: zero means the maximum; longer than the maximum is
// clamped to it, and no leaf outlives the signing certificate. The leaf is not a CA, has
// serverAuth and clientAuth, and is backdated by Backdate for clock skew.
func (ca *CA) Sign(csrPEM []byte, ttl time.Duration) (*Issued, error) {
	csr, id, err := ParseCSR(csrPEM, ca.opts.TrustDomain)
	if err != nil {
		return nil, err
	}
	return ca.sign(csr, id, ttl)
}

func (ca *CA) sign(csr *x509.CertificateRequest, id spiffeid.ID, ttl time.Duration) (*Issued, error) {
	if ttl < 0 {
		return nil, invalidCSR("negative lifetime %v", ttl)
	}
	if ttl == 0 || ttl > ca.opts.MaxTTL {
		ttl = ca.opts.MaxTTL
	}
	now := ca.opts.Clock.Now()
	notAfter := now.Add(ttl)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	if !now.Before(notAfter) {
		return nil, fmt.Errorf("identity: signing certificate expired at %v", ca.cert.NotAfter)
	}
	usage := x509.KeyUsageDigitalSignature
	if _, isRSA := csr.PublicKey.(*rsa.PublicKey); isRSA {
		usage |= x509.KeyUsageKeyEncipherment
	}
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		// An empty subject, as SPIFFE X.509-SVIDs and Istio leaves have; crypto/x509
		// then marks the SAN extension critical (RFC 5280 §4.2.1.6).
		NotBefore:             now.Add(-Backdate),
		NotAfter:              notAfter,
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  csr.URIs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, csr.PublicKey, ca.signer)
	if err != nil {
		return nil, fmt.Errorf("identity: sign %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("identity: sign %s: %w", id, err)
	}
	chain := make([]*x509.Certificate, 0, 2+len(ca.chain))
	chain = append(chain, leaf)
	if !containsCert(ca.roots, ca.cert) {
		chain = append(chain, ca.cert)
	}
	chain = append(chain, ca.chain...)
	return &Issued{ID: id, Chain: chain, Roots: ca.roots}, nil
}
