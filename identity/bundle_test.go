package identity

import (
	"context"
	"crypto"
	"crypto/x509"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"
)

// caFiles returns a self-signed CA's files (cacerts layout), by name.
func caFiles(t testing.TB, ca *CA) map[string][]byte {
	t.Helper()
	dir := t.TempDir()
	if err := ca.write(dir); err != nil {
		t.Fatal(err)
	}
	files, err := ReadCAFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// rotation is the CA files of the three steps of a root rotation from old to new.
type rotation struct {
	old, new        *CA
	oldFiles        map[string][]byte
	step1, step2    map[string][]byte // bundle old+new signing old; bundle old+new signing new
	step3, combined map[string][]byte // bundle new signing new; the mistake: bundle new signing old
}

func newRotation(t testing.TB, clk clock.PassiveClock) *rotation {
	t.Helper()
	oldCA, err := NewSelfSignedCA(CAOptions{Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	newCA, err := NewSelfSignedCA(CAOptions{Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	o, n := caFiles(t, oldCA), caFiles(t, newCA)
	both := append(append([]byte(nil), o[RootCertFile]...), n[RootCertFile]...)
	with := func(base map[string][]byte, roots []byte) map[string][]byte {
		out := map[string][]byte{}
		for k, v := range base {
			out[k] = v
		}
		out[RootCertFile] = roots
		return out
	}
	return &rotation{old: oldCA, new: newCA, oldFiles: o,
		step1: with(o, both), step2: with(n, both), step3: with(n, n[RootCertFile]), combined: with(o, n[RootCertFile])}
}

// A bundle of several roots: the CA signs under one, publishes all; a bundle that does
// not hold the signing root is refused with an error naming the directory and the file.
func TestCABundleOfSeveralRoots(t *testing.T) {
	r := newRotation(t, clock.RealClock{})
	ca, err := ParseCA(r.step2, CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ca.Roots()) != 2 || !ca.SigningRoot().Equal(r.new.SigningRoot()) {
		t.Fatalf("roots %d, signing root %q: want 2 roots, signing under the new one", len(ca.Roots()), ca.SigningRoot().Subject)
	}
	iss, err := ca.Sign(csrPEM(t, &x509.CertificateRequest{URIs: uris(t, "spiffe://cluster.local/ns/a/sa/b")}, mustKey(t)), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := verifyChain(iss.Leaf(), iss.Chain[1:], []*x509.Certificate{r.new.SigningRoot()}, time.Now()); err != nil {
		t.Fatalf("leaf does not chain to the new root: %v", err)
	}
	if len(iss.Roots) != 2 {
		t.Fatalf("issued with %d roots, want the whole bundle", len(iss.Roots))
	}

	dir := t.TempDir()
	for name, data := range r.combined {
		writeFile(t, dir, name, data)
	}
	_, err = LoadCA(dir, CAOptions{})
	for _, want := range []string{"ca dir " + dir, RootCertFile, CACertFile, "does not verify"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("bundle without the signing root: error %v, want one containing %q", err, want)
		}
	}

	leaf := caFiles(t, r.old)
	leaf[RootCertFile] = append(leaf[RootCertFile], EncodeCertificates(iss.Leaf())...)
	if _, err := ParseCA(leaf, CAOptions{}); err == nil || !strings.Contains(err.Error(), RootCertFile+": certificate 1") {
		t.Fatalf("a leaf in the bundle: %v, want an error naming %s and the certificate", err, RootCertFile)
	}
	delete(leaf, CAKeyFile)
	if _, err := ParseCA(leaf, CAOptions{}); err == nil || !strings.Contains(err.Error(), CAKeyFile+": missing") {
		t.Fatalf("no key: %v", err)
	}
}

// A root is trusted while one source vouches for it.
func TestTrustBundle(t *testing.T) {
	r := newRotation(t, clock.RealClock{})
	oldRoot, newRoot := r.old.SigningRoot(), r.new.SigningRoot()
	b := NewTrustBundle(testTD)
	if _, err := b.GetX509BundleForTrustDomain(testTD); err == nil {
		t.Fatal("an empty bundle verifies")
	}
	var changes atomic.Int32
	b.OnChange(func() { changes.Add(1) })
	set := func(source string, want bool, roots ...*x509.Certificate) {
		t.Helper()
		if changed, err := b.Set(source, roots); changed != want || err != nil {
			t.Fatalf("Set(%s, %d roots) = %v, %v; want changed %v", source, len(roots), changed, err, want)
		}
	}
	set("file", true, oldRoot)
	set("file", false, oldRoot, oldRoot)
	set(CAAnswer, true, oldRoot, newRoot) // the CA adds a root
	set("file", false, oldRoot, newRoot)
	set(CAAnswer, false, oldRoot) // a lagging CA replica takes nothing away
	xb, err := b.GetX509BundleForTrustDomain(testTD)
	if err != nil || len(xb.X509Authorities()) != 2 {
		t.Fatalf("bundle %v, %v: want 2 roots", xb, err)
	}
	st := b.State()
	if len(st.Roots) != 2 || st.Roots[1].SHA256 != Fingerprint(newRoot) || !slices.Equal(st.Roots[0].Sources, []string{"file", CAAnswer}) || !slices.Equal(st.Roots[1].Sources, []string{"file"}) {
		t.Fatalf("state %+v", st)
	}
	set("file", false, newRoot) // the file drops the old root: the CA still names it
	set(CAAnswer, true, newRoot)
	if roots := b.Roots(); len(roots) != 1 || !roots[0].Equal(newRoot) {
		t.Fatalf("%d roots once both sources dropped the old one", len(roots))
	}
	if _, err := b.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.example")); err == nil {
		t.Fatal("a bundle for another trust domain")
	}
	if _, err := b.Set("file", nil); err == nil {
		t.Fatal("an empty set of roots was taken")
	}
	if changes.Load() != 3 {
		t.Fatalf("%d change notifications, want 3", changes.Load())
	}
}

// The file is one source; a change tells the owner, who asks the CA for the other.
func TestBundleFile(t *testing.T) {
	r := newRotation(t, clock.RealClock{})
	oldRoot, newRoot := r.old.SigningRoot(), r.new.SigningRoot()
	path := filepath.Join(t.TempDir(), RootCertFile)
	write := func(certs ...*x509.Certificate) {
		if err := WriteFileAtomic(path, EncodeCertificates(certs...), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(oldRoot)
	b := NewTrustBundle(testTD)
	var told atomic.Int32
	f := &BundleFile{Path: path, Bundle: b, OnChange: func() { told.Add(1) }}
	if _, err := f.Load(); err != nil {
		t.Fatal(err)
	}
	if changed, _ := f.Load(); changed || told.Load() != 0 {
		t.Fatal("an unchanged file counts as a change")
	}
	b.Set(CAAnswer, []*x509.Certificate{oldRoot})
	write(oldRoot, newRoot)
	if _, err := f.Load(); err != nil || len(b.Roots()) != 2 || told.Load() != 1 {
		t.Fatalf("after adding a root: %v, %d roots, told %d times", err, len(b.Roots()), told.Load())
	}
	write(newRoot)
	if _, err := f.Load(); err != nil || len(b.Roots()) != 2 || told.Load() != 2 {
		t.Fatalf("after removing a root: %v, %d roots (the CA still names it), told %d times", err, len(b.Roots()), told.Load())
	}
	if err := os.WriteFile(path, []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Load(); err == nil || !strings.Contains(err.Error(), path) || len(b.Roots()) != 2 {
		t.Fatalf("a garbage file: %v, %d roots; want an error naming it and the bundle kept", err, len(b.Roots()))
	}
}

// switchIssuer issues with whichever CA it holds now.
type switchIssuer struct {
	ca    atomic.Pointer[CA]
	calls atomic.Int32
}

func (s *switchIssuer) Issue(ctx context.Context, id spiffeid.ID, csr []byte, key crypto.Signer, ttl time.Duration) (*Issued, error) {
	s.calls.Add(1)
	return s.ca.Load().Issue(ctx, id, csr, key, ttl)
}

// When the trust bundle drops the root of a certificate, the manager renews it at once;
// Refresh renews one certificate to learn the CA's bundle.
func TestManagerFollowsTheBundle(t *testing.T) {
	clk := clocktesting.NewFakeClock(t0)
	r := newRotation(t, clk)
	step1, err := ParseCA(r.step1, CAOptions{Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	step2, err := ParseCA(r.step2, CAOptions{Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	b := NewTrustBundle(testTD)
	iss := &switchIssuer{}
	iss.ca.Store(step1)
	m, err := NewManager(ManagerOptions{Issuer: iss, Clock: clk, Bundle: b, Rand: func() float64 { return 0 }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	id := mustID(t, "bookinfo", "reviews")
	c1, err := m.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if !c1.Root().Equal(r.old.SigningRoot()) || len(b.Roots()) != 2 {
		t.Fatalf("first certificate under %q with %d roots trusted; want the old root, both trusted", c1.Root().Subject, len(b.Roots()))
	}
	if st := state(t, m, id); st.RootSHA256 != Fingerprint(r.old.SigningRoot()) {
		t.Fatalf("state names root %s", st.RootSHA256)
	}
	// Signing switched; the bundle learns it dropped the old root.
	iss.ca.Store(step2)
	if _, err := b.Set(CAAnswer, []*x509.Certificate{r.new.SigningRoot()}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a renewal under the new root", func() bool {
		return state(t, m, id).RootSHA256 == Fingerprint(r.new.SigningRoot())
	})
	if n := iss.calls.Load(); n != 2 {
		t.Fatalf("%d CSRs, want 2", n)
	}
	// The CA's answer carries its bundle in force (both roots): it replaces the test's.
	eventually(t, "the CA's bundle", func() bool { return len(b.Roots()) == 2 })
	m.Refresh(testTD)
	eventually(t, "a refresh", func() bool { return iss.calls.Load() == 3 })
	m.Refresh(spiffeid.RequireTrustDomainFromString("other.example"))
	time.Sleep(50 * time.Millisecond)
	if n := iss.calls.Load(); n != 3 {
		t.Fatalf("%d CSRs after a refresh of a trust domain without certificates, want 3", n)
	}
	bs := m.Bundles()
	if len(bs) != 1 || len(bs[0].Roots) != 2 || bs[0].Roots[1].Sources[0] != CAAnswer {
		t.Fatalf("bundles %+v", bs)
	}
}

// A leaf shorter than the CA's backdate renews at half of what is left when it
// arrives, not at once and again.
func TestManagerShortLeafRenewsAtHalfLife(t *testing.T) {
	m, iss, clk := newTestManager(t, ManagerOptions{TTL: time.Minute})
	id := mustID(t, "bookinfo", "reviews")
	if _, err := m.Get(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	if st := state(t, m, id); !st.RenewAt.Equal(t0.Add(30 * time.Second)) {
		t.Fatalf("a 1m leaf renews at %v, want %v", st.RenewAt, t0.Add(30*time.Second))
	}
	step(t, clk, 29*time.Second)
	time.Sleep(20 * time.Millisecond)
	if n := iss.calls.Load(); n != 1 {
		t.Fatalf("%d CSRs before half-life, want 1", n)
	}
	clk.Step(time.Second)
	eventually(t, "renewal", func() bool { return iss.calls.Load() == 2 })
}

// A connection to the CA verifies its server against the bundle at each handshake: a
// CA serving under a root the agent does not trust yet is refused, and the same
// connection gets through once the bundle holds the root.
func TestDialCABundleFollowsTheBundle(t *testing.T) {
	r := newRotation(t, clock.RealClock{})
	srv := startCA(t, r.new)
	b := NewTrustBundle(testTD)
	if _, err := b.Set("file", r.old.Roots()); err != nil {
		t.Fatal(err)
	}
	conn, err := DialCABundle(srv.addr, "veil-ca.test", b, BearerToken(testTokens["node-1"]))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := NewClient(conn)
	id := mustID(t, "bookinfo", "reviews")
	issue := func() error {
		key, csr, err := NewCSR(id)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err = client.Issue(ctx, id, csr, key, time.Hour)
		return err
	}
	if err := issue(); err == nil || !strings.Contains(err.Error(), "CA server certificate") {
		t.Fatalf("a CA under an untrusted root: %v, want refused", err)
	}
	b.Set("file", append(r.old.Roots(), r.new.Roots()...))
	deadline := time.Now().Add(10 * time.Second)
	for issue() != nil {
		if time.Now().After(deadline) {
			t.Fatal("the connection never trusted the root added to the bundle")
		}
		time.Sleep(100 * time.Millisecond)
	}
}
