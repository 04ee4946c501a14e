package identity

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net/url"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/utils/clock"
)

// CAAnswer is the source, in a TrustBundle, of the roots of the CA's latest answer.
const CAAnswer = "the CA's answer"

// issueTimeout bounds one certificate request.
const issueTimeout = 30 * time.Second

// ErrClosed is returned by a Manager's methods after Close.
var ErrClosed = errors.New("identity: certificate manager closed")

// ManagerOptions configure a Manager. The zero value of every field but Issuer means
// its default.
type ManagerOptions struct {
	// Issuer signs CSRs; required.
	Issuer Issuer
	// TTL is the lifetime asked of the CA. Default DefaultMaxTTL; the CA may clamp it.
	TTL time.Duration
	// InitialBackoff is the wait after a first failed attempt; it doubles with each
	// further failure up to MaxBackoff. Defaults 1s and 1m.
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
	// Jitter spreads renewals and retries so that a node's pods do not all renew at
	// once: renewal happens up to Jitter x half the lifetime before half-life, and a
	// retry waits up to Jitter x its backoff less. Default 0.1; negative means none.
	Jitter float64
	// Clock, for tests. Default the real clock.
	Clock clock.WithTicker
	// Rand returns a number in [0, 1) for jitter. Default math/rand/v2.Float64.
	Rand func() float64
	// Log receives renewals and failures. Default slog.Default().
	Log *slog.Logger
	// Bundle is the trust bundle of its trust domain (the agent's, with --ca-root as
	// another source). The manager makes the roots of every CA answer (the last element
	// of the response: the bundle the CA has in force) its source CAAnswer, and when the
	// roots in force change renews at once any certificate that no longer chains to one
	// of them. Default: a bundle per trust domain, held by the manager only.
	Bundle *TrustBundle
}

// Certificate is a workload's key and certificate chain as the manager holds them. It
// is immutable; a renewal produces a new Certificate.
type Certificate struct {
	ID    spiffeid.ID
	Chain []*x509.Certificate // leaf first, then intermediates
	Roots []*x509.Certificate
	Key   crypto.Signer

	tls  tls.Certificate
	svid x509svid.SVID
	root *x509.Certificate // the root of Roots the chain verifies to
}

func newCertificate(iss *Issued, key crypto.Signer) *Certificate {
	c := &Certificate{ID: iss.ID, Chain: iss.Chain, Roots: iss.Roots, Key: key}
	// Verified at the end of the leaf's validity, when the chain is valid too (a leaf never
	// outlives its signing certificate): only which root it reaches matters here.
	if chains, err := verifyChain(iss.Leaf(), iss.Chain[1:], iss.Roots, iss.Leaf().NotAfter.Add(-time.Second)); err == nil {
		c.root = chains[0][len(chains[0])-1]
	}
	c.tls = tls.Certificate{PrivateKey: key, Leaf: iss.Leaf()}
	for _, x := range iss.Chain {
		c.tls.Certificate = append(c.tls.Certificate, x.Raw)
	}
	c.svid = x509svid.SVID{ID: iss.ID, Certificates: iss.Chain, PrivateKey: key}
	return c
}

// Leaf is the workload's certificate.
func (c *Certificate) Leaf() *x509.Certificate { return c.Chain[0] }

// Root is the root of the CA's bundle that the certificate chains to; nil when the
// chain did not verify (an Issuer that skipped its checks).
func (c *Certificate) Root() *x509.Certificate { return c.root }

// TLSCertificate returns the certificate for crypto/tls. The caller must not modify it.
func (c *Certificate) TLSCertificate() *tls.Certificate { return &c.tls }

// GetX509SVID implements go-spiffe's x509svid.Source, so a Certificate plugs into
// go-spiffe's tlsconfig.
func (c *Certificate) GetX509SVID() (*x509svid.SVID, error) { return &c.svid, nil }

// CertState describes one identity's certificate for the admin endpoint.
type CertState struct {
	ID          string    `json:"id"`
	State       string    `json:"state"` // pending, valid, renewing (valid, last renewal failed), expired
	Serial      string    `json:"serial,omitempty"`
	NotBefore   time.Time `json:"not_before,omitzero"`
	NotAfter    time.Time `json:"not_after,omitzero"`
	RenewAt     time.Time `json:"renew_at,omitzero"`
	NextAttempt time.Time `json:"next_attempt,omitzero"`
	Failures    int       `json:"failures,omitempty"`
	LastError   string    `json:"last_error,omitempty"`
	// RootSHA256 is the Fingerprint of the root the certificate chains to: during a
	// root rotation, which root signed it.
	RootSHA256 string `json:"root_sha256,omitempty"`
	// Chain describes the certificate chain, leaf first, then the roots it verifies to.
	Chain []CertInfo `json:"chain,omitempty"`
}

// CertInfo describes one certificate of a chain.
type CertInfo struct {
	Subject   string    `json:"subject"`
	URIs      []string  `json:"uris,omitempty"`
	Issuer    string    `json:"issuer"`
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	IsCA      bool      `json:"is_ca"`
	Root      bool      `json:"root,omitempty"`
}

func certInfo(c *x509.Certificate, root bool) CertInfo {
	ci := CertInfo{Subject: c.Subject.String(), Issuer: c.Issuer.String(), Serial: c.SerialNumber.Text(16),
		NotBefore: c.NotBefore, NotAfter: c.NotAfter, IsCA: c.IsCA, Root: root}
	for _, u := range c.URIs {
		ci.URIs = append(ci.URIs, u.String())
	}
	return ci
}

// Manager obtains and renews the certificates of the workloads on a node: one key and
// certificate per identity, fetched on first use (or ahead of time with Prefetch),
// renewed at half-life with jitter, retried with capped exponential backoff, and kept
// until it expires when renewal fails. Concurrent Gets for one identity share a single
// CSR. Safe for concurrent use.
type Manager struct {
	opts   ManagerOptions
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu sync.Mutex // guards the fields below
	// entries holds one keeper per identity asked for and not forgotten.
	entries map[spiffeid.ID]*entry
	// bundles holds the trust bundle of each trust domain seen.
	bundles map[spiffeid.TrustDomain]*TrustBundle
	closed  bool
}

// entry is one identity's state. Its keeper goroutine is the only writer of cur and of
// the fields under mu.
type entry struct {
	id     spiffeid.ID
	ctx    context.Context // ends when the entry is forgotten or the manager closes
	cancel context.CancelFunc
	cur    atomic.Pointer[Certificate] // nil until the first issuance
	// kick, buffered, makes the keeper renew now instead of at its next renewal time.
	kick chan struct{}

	mu sync.Mutex // guards the fields below
	// changed is closed and replaced whenever an attempt completes.
	changed     chan struct{}
	lastErr     error
	failures    int
	renewAt     time.Time
	nextAttempt time.Time
}

// NewManager returns a running Manager. Close it to stop its renewals.
func NewManager(opts ManagerOptions) (*Manager, error) {
	if opts.Issuer == nil {
		return nil, errors.New("identity: manager needs an Issuer")
	}
	if opts.TTL <= 0 {
		opts.TTL = DefaultMaxTTL
	}
	if opts.InitialBackoff <= 0 {
		opts.InitialBackoff = time.Second
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = time.Minute
	}
	if opts.Jitter == 0 {
		opts.Jitter = 0.1
	} else if opts.Jitter < 0 {
		opts.Jitter = 0
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	if opts.Rand == nil {
		opts.Rand = mrand.Float64
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		opts:    opts,
		ctx:     ctx,
		cancel:  cancel,
		entries: make(map[spiffeid.ID]*entry),
		bundles: make(map[spiffeid.TrustDomain]*TrustBundle),
	}
	if b := opts.Bundle; b != nil {
		m.bundles[b.TrustDomain()] = b
		b.OnChange(func() { m.recheck(b) })
	}
	return m, nil
}

// Close stops every renewal and waits for them. Later calls return ErrClosed.
func (m *Manager) Close() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
	return nil
}

// Get returns a currently valid certificate for id, starting its issuance if this is
// the first request for id. It blocks until one is issued, the ongoing attempt fails
// (its error is returned; retries go on in the background), or ctx ends.
func (m *Manager) Get(ctx context.Context, id spiffeid.ID) (*Certificate, error) {
	e, err := m.entry(id)
	if err != nil {
		return nil, err
	}
	for {
		if c := e.cur.Load(); c != nil && m.opts.Clock.Now().Before(c.Leaf().NotAfter) {
			return c, nil
		}
		// Again under the lock the keeper stores it under: an issuance that completed
		// since the load above has already replaced changed.
		e.mu.Lock()
		c, lastErr, changed := e.cur.Load(), e.lastErr, e.changed
		e.mu.Unlock()
		if c != nil && m.opts.Clock.Now().Before(c.Leaf().NotAfter) {
			return c, nil
		}
		if lastErr != nil {
			return nil, fmt.Errorf("identity: no valid certificate for %s: %w", id, lastErr)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, fmt.Errorf("identity: waiting for a certificate for %s: %w", id, ctx.Err())
		case <-e.ctx.Done():
			if m.ctx.Err() != nil {
				return nil, ErrClosed
			}
			return nil, fmt.Errorf("identity: %s was forgotten while waiting for its certificate", id)
		}
	}
}

// Prefetch starts issuance for identities not yet held, without waiting: the agent
// calls it for pods scheduled on its node before their first connection.
func (m *Manager) Prefetch(ids ...spiffeid.ID) error {
	for _, id := range ids {
		if _, err := m.entry(id); err != nil {
			return err
		}
	}
	return nil
}

// Forget stops renewing id and drops its certificate (its last pod left the node).
func (m *Manager) Forget(id spiffeid.ID) {
	m.mu.Lock()
	e := m.entries[id]
	delete(m.entries, id)
	m.mu.Unlock()
	if e != nil {
		e.cancel()
	}
}

// GetX509BundleForTrustDomain implements go-spiffe's x509bundle.Source with the trust
// bundle of td: the roots the CA returned most recently, and those of the bundle's other
// sources (a BundleFile).
func (m *Manager) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	m.mu.Lock()
	b := m.bundles[td]
	m.mu.Unlock()
	if b == nil {
		return nil, fmt.Errorf("identity: no trust bundle for trust domain %q", td)
	}
	return b.GetX509BundleForTrustDomain(td)
}

// bundle returns td's trust bundle, creating it when needed.
func (m *Manager) bundle(td spiffeid.TrustDomain) *TrustBundle {
	m.mu.Lock()
	defer m.mu.Unlock()
	b := m.bundles[td]
	if b == nil {
		b = NewTrustBundle(td)
		m.bundles[td] = b
		b.OnChange(func() { m.recheck(b) })
	}
	return b
}

// Bundles describes the trust bundle of every trust domain, sorted by trust domain.
func (m *Manager) Bundles() []BundleState {
	m.mu.Lock()
	out := make([]BundleState, 0, len(m.bundles))
	for _, b := range m.bundles {
		out = append(out, b.State())
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].TrustDomain < out[j].TrustDomain })
	return out
}

// recheck renews at once every certificate of b's trust domain that no longer chains
// to one of b's roots: peers that hold the new bundle would refuse it.
func (m *Manager) recheck(b *TrustBundle) {
	roots := b.Roots()
	for _, e := range m.entriesOf(b.TrustDomain()) {
		if c := e.cur.Load(); c != nil && c.root != nil && !containsCert(roots, c.root) {
			m.opts.Log.Info("trust bundle no longer holds the root of a certificate: renewing it now",
				"identity", e.id.String(), "root", Fingerprint(c.root))
			e.renewNow()
		}
	}
}

// Refresh asks the CA for the trust bundle it has in force, by renewing now the
// certificate of td that was issued first (the answer carries the bundle, which becomes
// the source CAAnswer). The agent calls it when its --ca-root file changes, so that a
// root the file dropped is dropped once the CA confirms. Without a certificate of td, it
// does nothing.
func (m *Manager) Refresh(td spiffeid.TrustDomain) {
	var oldest *entry
	var at time.Time
	for _, e := range m.entriesOf(td) {
		if c := e.cur.Load(); c != nil && (oldest == nil || c.Leaf().NotBefore.Before(at)) {
			oldest, at = e, c.Leaf().NotBefore
		}
	}
	if oldest != nil {
		oldest.renewNow()
	}
}

func (m *Manager) entriesOf(td spiffeid.TrustDomain) []*entry {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*entry
	for id, e := range m.entries {
		if id.TrustDomain() == td {
			out = append(out, e)
		}
	}
	return out
}

// renewNow makes e's keeper renew without waiting for its renewal time.
func (e *entry) renewNow() {
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// States returns every identity's certificate state, sorted by identity.
func (m *Manager) States() []CertState {
	m.mu.Lock()
	es := make([]*entry, 0, len(m.entries))
	for _, e := range m.entries {
		es = append(es, e)
	}
	m.mu.Unlock()
	now := m.opts.Clock.Now()
	out := make([]CertState, 0, len(es))
	for _, e := range es {
		s := CertState{ID: e.id.String(), State: "pending"}
		if c := e.cur.Load(); c != nil {
			leaf := c.Leaf()
			s.Serial = leaf.SerialNumber.Text(16)
			s.NotBefore, s.NotAfter = leaf.NotBefore, leaf.NotAfter
			s.State = "valid"
			if !now.Before(leaf.NotAfter) {
				s.State = "expired"
			}
			if c.root != nil {
				s.RootSHA256 = Fingerprint(c.root)
			}
			for _, x := range c.Chain {
				s.Chain = append(s.Chain, certInfo(x, false))
			}
			for _, x := range c.Roots {
				s.Chain = append(s.Chain, certInfo(x, true))
			}
		}
		e.mu.Lock()
		s.RenewAt, s.NextAttempt, s.Failures = e.renewAt, e.nextAttempt, e.failures
		if e.lastErr != nil {
			s.LastError = e.lastErr.Error()
			if s.State == "valid" {
				s.State = "renewing"
			}
		}
		e.mu.Unlock()
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// entry returns id's entry, creating it and starting its keeper if needed.
func (m *Manager) entry(id spiffeid.ID) (*entry, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	if e := m.entries[id]; e != nil {
		return e, nil
	}
	ctx, cancel := context.WithCancel(m.ctx)
	e := &entry{id: id, ctx: ctx, cancel: cancel, changed: make(chan struct{}), kick: make(chan struct{}, 1)}
	m.entries[id] = e
	m.wg.Add(1)
	go m.keep(ctx, e)
	return e, nil
}

// keep issues e's certificate, then renews it at half-life (or when kicked), retrying
// failures with backoff, until ctx ends.
func (m *Manager) keep(ctx context.Context, e *entry) {
	defer m.wg.Done()
	log := m.opts.Log.With("identity", e.id.String())
	for {
		// A kick that arrived while this attempt was pending is served by it.
		select {
		case <-e.kick:
		default:
		}
		c, err := m.issue(ctx, e.id)
		if ctx.Err() != nil {
			return
		}
		now := m.opts.Clock.Now()
		var wait time.Duration
		e.mu.Lock()
		if err != nil {
			e.failures++
			e.lastErr = err
			wait = m.backoff(e.failures)
			e.nextAttempt = now.Add(wait)
			log.Warn("certificate request failed", "failures", e.failures, "retry_in", wait, "err", err)
		} else {
			// The CA's bundle first: whoever gets the certificate verifies peers with it.
			b := m.bundle(e.id.TrustDomain())
			if _, err := b.Set(CAAnswer, c.Roots); err != nil {
				log.Warn("trust bundle not updated", "err", err)
			}
			e.cur.Store(c)
			// A kick for the certificate just replaced is moot; the new one is checked here.
			select {
			case <-e.kick:
			default:
			}
			if c.root != nil && !containsCert(b.Roots(), c.root) {
				e.renewNow()
			}
			e.failures, e.lastErr = 0, nil
			e.renewAt = m.renewAt(c.Leaf(), now)
			e.nextAttempt = e.renewAt
			wait = e.renewAt.Sub(now)
			log.Info("certificate issued", "serial", c.Leaf().SerialNumber.Text(16), "not_after", c.Leaf().NotAfter, "renew_at", e.renewAt)
		}
		close(e.changed)
		e.changed = make(chan struct{})
		e.mu.Unlock()

		t := m.opts.Clock.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C():
		case <-e.kick:
			t.Stop()
		}
	}
}

// issue makes a fresh key and CSR for id and has the Issuer sign it.
func (m *Manager) issue(ctx context.Context, id spiffeid.ID) (*Certificate, error) {
	key, csrPEM, err := NewCSR(id)
	if err != nil {
		return nil, err
	}
	// A CA that accepts and then stalls must not hold renewal forever.
	ctx, cancel := context.WithTimeout(ctx, issueTimeout)
	defer cancel()
	iss, err := m.opts.Issuer.Issue(ctx, id, csrPEM, key, m.opts.TTL)
	if err != nil {
		return nil, err
	}
	return newCertificate(iss, key), nil
}

// renewAt is half-way through the leaf's lifetime, less up to Jitter of that half. The
// lifetime counts from when the leaf arrived (received), not from its NotBefore, which
// the CA backdates for clock skew: a leaf shorter than the backdate would otherwise be
// renewed as soon as it arrives, again and again.
func (m *Manager) renewAt(leaf *x509.Certificate, received time.Time) time.Time {
	start := leaf.NotBefore
	if received.After(start) && received.Before(leaf.NotAfter) {
		start = received
	}
	half := leaf.NotAfter.Sub(start) / 2
	early := time.Duration(float64(half) * m.opts.Jitter * m.opts.Rand())
	return start.Add(half - early)
}

// backoff is InitialBackoff doubled per failure after the first, capped at MaxBackoff,
// less up to Jitter of itself.
func (m *Manager) backoff(failures int) time.Duration {
	d := m.opts.InitialBackoff
	for i := 1; i < failures && d < m.opts.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, m.opts.MaxBackoff)
	return d - time.Duration(float64(d)*m.opts.Jitter*m.opts.Rand())
}

// NewCSR generates an ECDSA P-256 key and a PEM CSR whose only SAN is id.
func NewCSR(id spiffeid.ID) (crypto.Signer, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: generate key for %s: %w", id, err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: CSR for %s: %w", id, err)
	}
	return key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}
