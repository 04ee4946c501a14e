package identity

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"
)

// The files of a CA directory, in the layout of Istio's `cacerts` secret.
const (
	CACertFile    = "ca-cert.pem"    // the signing certificate (root or intermediate)
	CAKeyFile     = "ca-key.pem"     // its private key, mode 0600
	CertChainFile = "cert-chain.pem" // the signing certificate's chain up to the root
	RootCertFile  = "root-cert.pem"  // the trust bundle: one or more roots
)

const (
	// DefaultMaxTTL is the longest leaf lifetime the CA issues unless configured.
	DefaultMaxTTL = 24 * time.Hour
	// Backdate is how far before "now" a leaf becomes valid, for clock skew between nodes.
	Backdate = 5 * time.Minute
	// rootValidity is the lifetime of a root the CA generates itself.
	rootValidity = 10 * 365 * 24 * time.Hour
)

// CAOptions configure a CA. The zero value of every field means its default.
type CAOptions struct {
	// TrustDomain the CA signs for. Default cluster.local.
	TrustDomain spiffeid.TrustDomain
	// MaxTTL clamps the lifetime of issued leaves. Default DefaultMaxTTL.
	MaxTTL time.Duration
	// Clock, for tests. Default the real clock.
	Clock clock.PassiveClock
}

func (o CAOptions) withDefaults() CAOptions {
	if o.TrustDomain.IsZero() {
		o.TrustDomain = spiffeid.RequireTrustDomainFromString(DefaultTrustDomain)
	}
	if o.MaxTTL <= 0 {
		o.MaxTTL = DefaultMaxTTL
	}
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
	return o
}

// CA signs workload certificates. It is immutable after construction and safe for
// concurrent use: a rotation replaces the CA (see CASource), never changes one.
type CA struct {
	opts   CAOptions
	signer crypto.Signer
	cert   *x509.Certificate   // signs leaves
	chain  []*x509.Certificate // certificates between cert and a root, cert excluded, roots excluded
	roots  []*x509.Certificate // the trust bundle
	// rootsPEM is root-cert.pem as read or written, returned to clients as the bundle.
	rootsPEM []byte
	// signingRoot is the root of roots that cert chains to.
	signingRoot *x509.Certificate
}

// LoadOrCreateCA loads the CA from dir (Istio `cacerts` layout). If dir holds none of
// the CA files, it generates an ECDSA P-256 root, writes it there (the key with mode
// 0600) and uses it, so a restart keeps the same root. A directory holding only some of
// the files, a key that does not match the certificate, or a chain that does not verify
// to a root in root-cert.pem is an error; nothing is overwritten.
func LoadOrCreateCA(dir string, opts CAOptions) (*CA, error) {
	present := 0
	for _, f := range []string{CACertFile, CAKeyFile, CertChainFile, RootCertFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			present++
		} else if !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("identity: ca dir %s: %w", dir, err)
		}
	}
	if present > 0 {
		return LoadCA(dir, opts)
	}
	ca, err := NewSelfSignedCA(opts)
	if err != nil {
		return nil, err
	}
	if err := ca.write(dir); err != nil {
		return nil, err
	}
	return ca, nil
}

// NewSelfSignedCA generates a CA with a fresh ECDSA P-256 root held only in memory.
func NewSelfSignedCA(opts CAOptions) (*CA, error) {
	opts = opts.withDefaults()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("identity: generate root key: %w", err)
	}
	now := opts.Clock.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{Organization: []string{opts.TrustDomain.String()}, CommonName: "veil root CA"},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              now.Add(rootValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{opts.TrustDomain.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("identity: create root certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{
		opts:        opts,
		signer:      key,
		cert:        cert,
		roots:       []*x509.Certificate{cert},
		rootsPEM:    encodeCerts(cert),
		signingRoot: cert,
	}, nil
}

// LoadCA loads an operator-supplied CA from dir: ca-cert.pem, ca-key.pem, root-cert.pem
// and, when ca-cert.pem is an intermediate, cert-chain.pem (see ParseCA). Errors name dir
// and the file.
func LoadCA(dir string, opts CAOptions) (*CA, error) {
	files, err := ReadCAFiles(dir)
	if err != nil {
		return nil, err
	}
	ca, err := ParseCA(files, opts)
	if err != nil {
		return nil, fmt.Errorf("identity: ca dir %s: %w", dir, err)
	}
	return ca, nil
}

// CAFileNames are the files of Istio's cacerts layout, in the order a CA directory
// or Secret lists them.
var CAFileNames = []string{CACertFile, CAKeyFile, CertChainFile, RootCertFile}

// ReadCAFiles reads the files of Istio's cacerts layout from dir, by file name. A file
// that does not exist is left out; ParseCA says which are required.
func ReadCAFiles(dir string) (map[string][]byte, error) {
	files := make(map[string][]byte, len(CAFileNames))
	for _, name := range CAFileNames {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("identity: ca dir %s: %w", dir, err)
		}
		files[name] = b
	}
	return files, nil
}

// ParseCA builds a CA from the files of Istio's cacerts layout, by file name (a CA
// directory's files, or a Secret's data): ca-cert.pem, the signing certificate (a root
// or an intermediate); ca-key.pem, its key; root-cert.pem, the trust bundle: every root
// the mesh trusts, one PEM certificate or several during a root rotation; and, when
// ca-cert.pem is an intermediate, cert-chain.pem, its chain up to the root. It refuses a
// key that does not match ca-cert.pem, a ca-cert.pem that is not a CA, a bundle holding
// anything but CA certificates, and a ca-cert.pem that does not verify to one of the
// roots in root-cert.pem: a bundle that does not hold the signing root would leave
// agents unable to verify the certificates the CA issues. Errors name the file; the
// caller adds where the files came from.
func ParseCA(files map[string][]byte, opts CAOptions) (*CA, error) {
	opts = opts.withDefaults()
	for _, name := range []string{CACertFile, CAKeyFile, RootCertFile} {
		if _, ok := files[name]; !ok {
			return nil, fmt.Errorf("%s: missing (required with %s)", name, strings.Join(CAFileNames, ", "))
		}
	}
	certs, err := ParseCertificates(files[CACertFile])
	if err != nil || len(certs) != 1 {
		return nil, fmt.Errorf("%s: want exactly one certificate: %v", CACertFile, errors.Join(err, fmt.Errorf("found %d", len(certs))))
	}
	cert := certs[0]
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("%s: %q is not a CA certificate (basic constraints CA and key usage certSign required)", CACertFile, cert.Subject)
	}
	signer, err := ParsePrivateKey(files[CAKeyFile])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CAKeyFile, err)
	}
	if !publicKeysEqual(signer.Public(), cert.PublicKey) {
		return nil, fmt.Errorf("%s does not match the public key of %s", CAKeyFile, CACertFile)
	}
	rootsPEM := files[RootCertFile]
	roots, err := ParseCertificates(rootsPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", RootCertFile, err)
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("%s: no certificates", RootCertFile)
	}
	for i, r := range roots {
		if !r.IsCA {
			return nil, fmt.Errorf("%s: certificate %d (%q) is not a CA certificate: the trust bundle holds roots only", RootCertFile, i, r.Subject)
		}
	}
	chainCerts, err := ParseCertificates(files[CertChainFile])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", CertChainFile, err)
	}
	// The chain between the signing certificate and the roots: cert-chain.pem minus the
	// signing certificate itself and minus any root (Istio's cert-chain.pem usually
	// holds intermediate + root).
	var chain []*x509.Certificate
	for _, c := range chainCerts {
		if c.Equal(cert) || containsCert(roots, c) {
			continue
		}
		chain = append(chain, c)
	}
	ca := &CA{opts: opts, signer: signer, cert: cert, chain: chain, roots: roots, rootsPEM: rootsPEM}
	chains, err := ca.verify(cert, opts.Clock.Now())
	if err != nil {
		return nil, fmt.Errorf("%s (%q, issued by %q) does not verify to a root in %s through %s: %w; %s must hold the root %s chains to (in a root rotation, the new root is added to %s before signing switches to it)",
			CACertFile, cert.Subject, cert.Issuer, RootCertFile, CertChainFile, err, RootCertFile, CACertFile, RootCertFile)
	}
	ca.signingRoot = chains[0][len(chains[0])-1]
	return ca, nil
}

// TrustDomain is the trust domain the CA signs for.
func (ca *CA) TrustDomain() spiffeid.TrustDomain { return ca.opts.TrustDomain }

// Roots returns the trust bundle. The caller must not modify it.
func (ca *CA) Roots() []*x509.Certificate { return ca.roots }

// RootsPEM returns the trust bundle in PEM.
func (ca *CA) RootsPEM() []byte { return bytes.Clone(ca.rootsPEM) }

// SigningCertificate returns the certificate that signs leaves.
func (ca *CA) SigningCertificate() *x509.Certificate { return ca.cert }

// SigningRoot returns the root of the trust bundle that the signing certificate, and so
// every leaf the CA issues, chains to.
func (ca *CA) SigningRoot() *x509.Certificate { return ca.signingRoot }

// MaxTTL is the longest lifetime of the leaves the CA issues.
func (ca *CA) MaxTTL() time.Duration { return ca.opts.MaxTTL }

// Current returns ca itself: a CA that never changes is its own CASource.
func (ca *CA) Current() *CA { return ca }

// A CASource returns the CA in force. A CA that the operator may rotate while the
// controller runs (controller.CAReloader) is one; so is a *CA, which never changes. Each
// request uses the CA returned when it starts.
type CASource interface {
	Current() *CA
}

// Equal reports whether ca and other sign with the same certificate and chain and
// publish the same trust bundle.
func (ca *CA) Equal(other *CA) bool {
	return other != nil && ca.cert.Equal(other.cert) && certsEqual(ca.chain, other.chain) && certsEqual(ca.roots, other.roots)
}

func certsEqual(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}

// Fingerprint is the SHA-256 of a certificate's DER encoding in lower-case hex, as
// `openssl x509 -in root.pem -outform DER | sha256sum` prints it: how logs, metrics and
// the admin endpoints name a root.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// verify checks that c chains, through the CA's chain, to one of its roots at time now.
func (ca *CA) verify(c *x509.Certificate, now time.Time) ([][]*x509.Certificate, error) {
	return verifyChain(c, append([]*x509.Certificate{ca.cert}, ca.chain...), ca.roots, now)
}

// verifyChain checks that c chains through intermediates to one of roots at time now,
// for any key usage (the SPIFFE checks are the TLS layer's).
func verifyChain(c *x509.Certificate, intermediates, roots []*x509.Certificate, now time.Time) ([][]*x509.Certificate, error) {
	opts := x509.VerifyOptions{
		Roots:         x509.NewCertPool(),
		Intermediates: x509.NewCertPool(),
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}
	for _, r := range roots {
		opts.Roots.AddCert(r)
	}
	for _, i := range intermediates {
		opts.Intermediates.AddCert(i)
	}
	return c.Verify(opts)
}

// write persists a self-signed CA into dir in the cacerts layout, key file mode 0600.
func (ca *CA) write(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("identity: ca dir: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(ca.signer)
	if err != nil {
		return fmt.Errorf("identity: marshal ca key: %w", err)
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		// The key first: a crash after it but before the certificate leaves a partial
		// directory that LoadOrCreateCA refuses instead of silently replacing.
		{CAKeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600},
		{CACertFile, encodeCerts(ca.cert), 0o644},
		{CertChainFile, encodeCerts(ca.cert), 0o644},
		{RootCertFile, ca.rootsPEM, 0o644},
	}
	for _, f := range files {
		if err := WriteFileAtomic(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return fmt.Errorf("identity: write %s: %w", f.name, err)
		}
	}
	return nil
}

// WriteFileAtomic writes data to path through a temporary file in the same directory,
// synced and renamed into place: a reader sees the old content or the new, never part.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func randomSerial() *big.Int {
	// 128 random bits, positive, as RFC 5280 §4.1.2.2 allows up to 20 octets.
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		panic("identity: crypto/rand failed: " + err.Error())
	}
	return n.Add(n, big.NewInt(1))
}

func containsCert(set []*x509.Certificate, c *x509.Certificate) bool {
	for _, s := range set {
		if s.Equal(c) {
			return true
		}
	}
	return false
}

// ServingCertificate issues a TLS server certificate for the CA's own gRPC endpoint,
// for the given DNS names and IP addresses, valid for lifetime (clamped to the signing
// certificate). It bypasses the workload signing rules: it is minted in process, never
// from a CSR.
func (ca *CA) ServingCertificate(dnsNames []string, ips []net.IP, lifetime time.Duration) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	now := ca.opts.Clock.Now()
	notAfter := now.Add(lifetime)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{Organization: []string{ca.opts.TrustDomain.String()}, CommonName: "veil CA server"},
		NotBefore:    now.Add(-Backdate),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dnsNames,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.signer)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("identity: serving certificate: %w", err)
	}
	out := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	if !containsCert(ca.roots, ca.cert) {
		out.Certificate = append(out.Certificate, ca.cert.Raw)
	}
	for _, c := range ca.chain {
		out.Certificate = append(out.Certificate, c.Raw)
	}
	return out, nil
}
