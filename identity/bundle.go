package identity

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TrustBundle is the set of roots a node trusts for one trust domain. It trusts the
// roots of every source that vouches for some (the agent has two: its --ca-root file,
// the bundle the controller publishes, and the CA's latest answer, the bundle the CA has
// in force): a root either adds is trusted at once, and a root is dropped once none
// names it any more. So a root rotation (a new root added, later the old one removed)
// reaches the node while everything runs, a source that lags behind the other (a CA
// replica that has not read the change yet, a ConfigMap the kubelet has not rewritten
// yet) never takes a root away early, and a change the CA refused never takes one away
// at all. Handshakes read it when they verify a peer, so a change applies to every
// handshake that follows and to no established connection. Safe for concurrent use.
type TrustBundle struct {
	td  spiffeid.TrustDomain
	cur atomic.Pointer[bundleVersion]

	mu      sync.Mutex // serialises changes; guards the fields below
	sources map[string][]*x509.Certificate
	subs    []func()
}

// bundleVersion is one content of a TrustBundle; never modified once stored.
type bundleVersion struct {
	roots   []*x509.Certificate
	by      [][]string // by[i]: the sources that vouch for roots[i]
	x509    *x509bundle.Bundle
	updated time.Time
}

// NewTrustBundle returns an empty bundle for td: it verifies nobody until Set.
func NewTrustBundle(td spiffeid.TrustDomain) *TrustBundle {
	b := &TrustBundle{td: td, sources: map[string][]*x509.Certificate{}}
	b.cur.Store(&bundleVersion{x509: x509bundle.New(td)})
	return b
}

// TrustDomain is the trust domain the bundle's roots vouch for.
func (b *TrustBundle) TrustDomain() spiffeid.TrustDomain { return b.td }

// Roots returns the roots in force. The caller must not modify them.
func (b *TrustBundle) Roots() []*x509.Certificate { return b.cur.Load().roots }

// GetX509BundleForTrustDomain implements go-spiffe's x509bundle.Source.
func (b *TrustBundle) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != b.td {
		return nil, fmt.Errorf("identity: no trust bundle for trust domain %q (this one is %q)", td, b.td)
	}
	v := b.cur.Load()
	if len(v.roots) == 0 {
		return nil, fmt.Errorf("identity: the trust bundle of %q holds no root yet", td)
	}
	return v.x509, nil
}

// Set replaces the roots source vouches for (an empty set is refused: a source that
// has nothing to say says nothing) and reports whether the roots in force changed. When
// they did, the OnChange functions are called.
func (b *TrustBundle) Set(source string, roots []*x509.Certificate) (bool, error) {
	if len(roots) == 0 {
		return false, fmt.Errorf("identity: trust bundle from %s: no roots", source)
	}
	b.mu.Lock()
	b.sources[source] = dedupCerts(roots)
	names := make([]string, 0, len(b.sources))
	for n := range b.sources {
		names = append(names, n)
	}
	sort.Strings(names)
	next := &bundleVersion{updated: time.Now()}
	for _, n := range names {
		for _, r := range b.sources[n] {
			i := slices.IndexFunc(next.roots, r.Equal)
			if i < 0 {
				next.roots, next.by = append(next.roots, r), append(next.by, nil)
				i = len(next.roots) - 1
			}
			next.by[i] = append(next.by[i], n)
		}
	}
	cur := b.cur.Load()
	changed := !sameCertSet(next.roots, cur.roots)
	if !changed {
		next.updated = cur.updated
	}
	next.x509 = x509bundle.FromX509Authorities(b.td, next.roots)
	b.cur.Store(next)
	subs := append([]func(){}, b.subs...)
	b.mu.Unlock()
	if changed {
		for _, f := range subs {
			f()
		}
	}
	return changed, nil
}

// OnChange registers f, called after every change of the roots in force (possibly
// concurrently across changes). f must not block.
func (b *TrustBundle) OnChange(f func()) {
	b.mu.Lock()
	b.subs = append(b.subs, f)
	b.mu.Unlock()
}

// BundleState describes a trust bundle for the admin endpoint and metrics.
type BundleState struct {
	TrustDomain string     `json:"trust_domain"`
	Roots       []RootInfo `json:"roots"`
	// Updated is when the roots in force last changed.
	Updated time.Time `json:"updated,omitzero"`
}

// RootInfo describes one root of a bundle.
type RootInfo struct {
	// SHA256 is the root's Fingerprint.
	SHA256    string    `json:"sha256"`
	Subject   string    `json:"subject"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	// Sources are those that vouch for the root: "file PATH", "the CA's answer".
	Sources []string `json:"sources"`
}

// State describes the roots in force.
func (b *TrustBundle) State() BundleState {
	v := b.cur.Load()
	s := BundleState{TrustDomain: b.td.String(), Roots: []RootInfo{}, Updated: v.updated}
	for i, r := range v.roots {
		s.Roots = append(s.Roots, RootInfo{SHA256: Fingerprint(r), Subject: r.Subject.String(), NotBefore: r.NotBefore, NotAfter: r.NotAfter, Sources: v.by[i]})
	}
	return s
}

func dedupCerts(certs []*x509.Certificate) []*x509.Certificate {
	out := make([]*x509.Certificate, 0, len(certs))
	for _, c := range certs {
		if !containsCert(out, c) {
			out = append(out, c)
		}
	}
	return out
}

func sameCertSet(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for _, c := range a {
		if !containsCert(b, c) {
			return false
		}
	}
	return true
}

// BundleFile keeps a TrustBundle's source "file PATH" equal to a PEM trust bundle on
// disk: the agent's --ca-root, in Kubernetes the ConfigMap the controller publishes the
// CA's bundle to, which the kubelet rewrites when it changes. OnChange tells the owner
// the file changed, so it can ask the CA for the bundle in force (Manager.Refresh): a
// root the file drops is dropped once the CA's answer drops it too.
type BundleFile struct {
	Path   string
	Bundle *TrustBundle
	// OnChange, when set, is called after each change of the file's content.
	OnChange func()
	Log      *slog.Logger // nil means slog.Default()

	mu   sync.Mutex // serialises Load; guards last
	last []byte
}

// Load reads the file and, when its content changed since the last Load, makes its
// roots the file's source of the bundle. A file that cannot be read or holds no
// certificate is an error naming it; the roots it vouched for stay.
func (f *BundleFile) Load() (changed bool, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	data, err := os.ReadFile(f.Path)
	if err != nil {
		return false, fmt.Errorf("identity: trust bundle file: %w", err)
	}
	if f.last != nil && bytes.Equal(data, f.last) {
		return false, nil
	}
	roots, err := ParseCertificates(data)
	if err == nil && len(roots) == 0 {
		err = errors.New("no certificates")
	}
	if err != nil {
		return false, fmt.Errorf("identity: trust bundle file %s: %w", f.Path, err)
	}
	first := f.last == nil
	f.last = data
	if _, err := f.Bundle.Set("file "+f.Path, roots); err != nil {
		return false, err
	}
	if !first {
		log := f.Log
		if log == nil {
			log = slog.Default()
		}
		log.Info("trust bundle file changed", "file", f.Path, "roots", strings.Join(fingerprints(roots), ","))
		if f.OnChange != nil {
			f.OnChange()
		}
	}
	return true, nil
}

// Watch calls Load every interval until ctx ends, logging errors once each.
func (f *BundleFile) Watch(ctx context.Context, interval time.Duration) {
	log := f.Log
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
		_, err := f.Load()
		switch {
		case err != nil && err.Error() != lastErr:
			log.Warn("trust bundle file not applied; the bundle in force stays", "err", err)
			lastErr = err.Error()
		case err == nil:
			lastErr = ""
		}
	}
}

func fingerprints(certs []*x509.Certificate) []string {
	out := make([]string, len(certs))
	for i, c := range certs {
		out[i] = Fingerprint(c)
	}
	return out
}
