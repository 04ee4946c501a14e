package controller

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/veilmesh/veil/identity"
)

// DefaultCAReloadInterval is how often a CAReloader reads the CA's files again.
const DefaultCAReloadInterval = 5 * time.Second

// CAReloader holds the CA in force and replaces it when the operator changes the CA's
// files (a --ca-dir, or the cacerts Secret) while the controller runs, as istiod reloads
// a plug-in CA: the root rotation of README "Rotating the root CA" is three such changes.
// A change is taken only when agents can follow it without a failed connection;
// anything else is refused with an error naming the files and the field, logged, and the
// CA in force stays (fail closed):
//   - files that do not make a CA (identity.ParseCA: a key that does not match its
//     certificate, a root-cert.pem that does not hold the root ca-cert.pem chains to, ...);
//   - signing switched to a root the bundle in force does not hold: agents would refuse
//     the certificates it signs until they learn it (add the root first, then switch);
//   - a root removed from root-cert.pem while certificates it signed may still be valid:
//     this controller signed under it less than the longest certificate lifetime
//     (CAOptions.MaxTTL, --max-ttl) ago. A controller started since cannot know, and
//     takes the removal.
//
// Create it with NewCAReloader; it is safe for concurrent use.
type CAReloader struct {
	// Interval between reads. Default DefaultCAReloadInterval.
	Interval time.Duration
	// Publish, when set, is called with every CA taken, to publish its trust bundle
	// (PublishRoot). A failure is retried at the next interval.
	Publish func(ctx context.Context, ca *identity.CA) error
	// Now is the clock. Default time.Now.
	Now func() time.Time
	Log *slog.Logger

	read  func(context.Context) (map[string][]byte, error)
	where string
	opts  identity.CAOptions
	cur   atomic.Pointer[identity.CA]

	mu sync.Mutex // serialises Reload; guards the fields below
	// digest is that of the files last read; refused is set when they were refused, so
	// they are tried again (a removal refused as too early becomes acceptable in time).
	digest      [sha256.Size]byte
	refused     bool
	unpublished bool // the CA in force is not published yet
	// retired maps the fingerprint of a root that signing left to when it left it.
	retired map[string]time.Time
}

// NewCAReloader returns a reloader holding ca, which read returns the files of (by file
// name, Istio's cacerts layout: identity.ReadCAFiles for a directory, SecretCAFiles for a
// Secret); where names them in errors and logs ("ca dir /var/lib/veil/ca", "CA secret
// veil-system/cacerts"); opts are ca's options (trust domain, MaxTTL).
func NewCAReloader(ca *identity.CA, read func(context.Context) (map[string][]byte, error), where string, opts identity.CAOptions) *CAReloader {
	r := &CAReloader{read: read, where: where, opts: opts, retired: map[string]time.Time{}}
	r.cur.Store(ca)
	return r
}

// Current implements identity.CASource: the CA in force.
func (r *CAReloader) Current() *identity.CA { return r.cur.Load() }

func (r *CAReloader) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// Reload reads the files once and takes them when they changed and are a safe step. It
// reports whether the CA in force changed; an error says why files were refused.
func (r *CAReloader) Reload(ctx context.Context) (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	files, err := r.read(ctx)
	if err != nil {
		return false, fmt.Errorf("controller: %s: %w", r.where, err)
	}
	d := digestFiles(files)
	if d == r.digest && !r.refused {
		return false, nil
	}
	r.digest, r.refused = d, true
	next, err := identity.ParseCA(files, r.opts)
	if err != nil {
		return false, fmt.Errorf("controller: %s: %w", r.where, err)
	}
	cur := r.cur.Load()
	if next.Equal(cur) {
		r.refused = false
		return false, nil
	}
	now := r.now()
	if err := r.check(cur, next, now); err != nil {
		return false, fmt.Errorf("controller: %s: %w", r.where, err)
	}
	r.refused = false
	if !next.SigningRoot().Equal(cur.SigningRoot()) {
		r.retired[identity.Fingerprint(cur.SigningRoot())] = now
		delete(r.retired, identity.Fingerprint(next.SigningRoot()))
	}
	r.cur.Store(next)
	r.unpublished = r.Publish != nil
	return true, nil
}

// check refuses a step agents cannot follow without failed connections.
func (r *CAReloader) check(cur, next *identity.CA, now time.Time) error {
	newRoot := next.SigningRoot()
	if !newRoot.Equal(cur.SigningRoot()) && !containsRoot(cur.Roots(), newRoot) {
		return fmt.Errorf("%s now chains to root %q (sha256 %s), which the trust bundle in force does not hold: agents would refuse the certificates it signs. "+
			"First add that root to %s while %s and %s stay as they are; once every agent trusts it, switch %s, %s and %s to it (README: Rotating the root CA)",
			identity.CACertFile, newRoot.Subject, identity.Fingerprint(newRoot), identity.RootCertFile, identity.CACertFile, identity.CAKeyFile,
			identity.CACertFile, identity.CAKeyFile, identity.CertChainFile)
	}
	maxTTL := cur.MaxTTL()
	for _, old := range cur.Roots() {
		if containsRoot(next.Roots(), old) {
			continue
		}
		fp := identity.Fingerprint(old)
		if old.Equal(cur.SigningRoot()) {
			return fmt.Errorf("%s drops root %q (sha256 %s), which signs the certificates in use: they stay valid for up to %v (--max-ttl). "+
				"Switch signing to the new root first, keeping this one in %s, and remove it %v later (README: Rotating the root CA)",
				identity.RootCertFile, old.Subject, fp, maxTTL, identity.RootCertFile, maxTTL)
		}
		if left, ok := r.retired[fp]; ok && now.Before(left.Add(maxTTL)) {
			return fmt.Errorf("%s drops root %q (sha256 %s), but certificates it signed until %s stay valid until %s (--max-ttl %v): keep it in %s until then (README: Rotating the root CA)",
				identity.RootCertFile, old.Subject, fp, left.UTC().Format(time.RFC3339), left.Add(maxTTL).UTC().Format(time.RFC3339), maxTTL, identity.RootCertFile)
		}
	}
	return nil
}

// Run reads the files every Interval until ctx ends, logging what it takes and what it
// refuses (each refusal once), and publishing each CA taken.
func (r *CAReloader) Run(ctx context.Context) {
	interval := r.Interval
	if interval <= 0 {
		interval = DefaultCAReloadInterval
	}
	log := r.Log
	if log == nil {
		log = slog.Default()
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	var lastErr string
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		prev := r.Current()
		changed, err := r.Reload(ctx)
		switch {
		case err != nil && err.Error() != lastErr:
			log.Error("ca: change refused; the CA in force stays", "err", err)
			lastErr = err.Error()
		case err == nil:
			lastErr = ""
		}
		if changed {
			next := r.Current()
			added, removed := diffRoots(prev.Roots(), next.Roots())
			log.Info("ca: reloaded", "from", r.where, "signing", next.SigningCertificate().Subject.String(),
				"signing_root", identity.Fingerprint(next.SigningRoot()), "roots", strings.Join(RootFingerprints(next), ","),
				"added", strings.Join(added, ","), "removed", strings.Join(removed, ","))
		}
		r.publish(ctx, log)
	}
}

// publish publishes the CA in force when it is not yet.
func (r *CAReloader) publish(ctx context.Context, log *slog.Logger) {
	r.mu.Lock()
	pending := r.unpublished
	r.mu.Unlock()
	if !pending {
		return
	}
	ca := r.Current()
	if err := r.Publish(ctx, ca); err != nil {
		log.Warn("ca: trust bundle not published; retrying", "err", err)
		return
	}
	r.mu.Lock()
	if r.cur.Load() == ca {
		r.unpublished = false
	}
	r.mu.Unlock()
	log.Info("ca: trust bundle published", "roots", strings.Join(RootFingerprints(ca), ","))
}

// RootFingerprints lists the fingerprints of ca's trust bundle, for logs.
func RootFingerprints(ca *identity.CA) []string {
	var out []string
	for _, r := range ca.Roots() {
		out = append(out, identity.Fingerprint(r))
	}
	return out
}

func diffRoots(prev, next []*x509.Certificate) (added, removed []string) {
	for _, c := range next {
		if !containsRoot(prev, c) {
			added = append(added, identity.Fingerprint(c))
		}
	}
	for _, c := range prev {
		if !containsRoot(next, c) {
			removed = append(removed, identity.Fingerprint(c))
		}
	}
	return added, removed
}

func containsRoot(set []*x509.Certificate, c *x509.Certificate) bool {
	for _, s := range set {
		if s.Equal(c) {
			return true
		}
	}
	return false
}

// digestFiles hashes the files by name, so any change of any file shows.
func digestFiles(files map[string][]byte) [sha256.Size]byte {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	h := sha256.New()
	for _, n := range names {
		fmt.Fprintf(h, "%s\x00%d\x00", n, len(files[n]))
		h.Write(files[n])
	}
	var d [sha256.Size]byte
	h.Sum(d[:0])
	return d
}
