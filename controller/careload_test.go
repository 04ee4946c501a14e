package controller

import (
	"context"
	"crypto/x509"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
)

// caDirFiles writes files into dir (the cacerts layout), as an operator edits a --ca-dir.
func caDirFiles(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for name, data := range files {
		if err := identity.WriteFileAtomic(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func readDir(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	files, err := identity.ReadCAFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func concat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// The three steps of README "Rotating the root CA" on a --ca-dir, taken while running;
// the mistakes refused, naming the directory and the file, with the CA in force kept:
// signing switched in the same change that adds its root, a bundle without the signing
// root, a root removed while certificates it signed may be valid. A removal refused as
// too early is taken once the longest certificate lifetime has passed.
func TestCAReloaderRotation(t *testing.T) {
	opts := identity.CAOptions{MaxTTL: time.Hour}
	dir, newDir := t.TempDir(), t.TempDir()
	ca, err := identity.LoadOrCreateCA(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := identity.LoadOrCreateCA(newDir, opts); err != nil {
		t.Fatal(err)
	}
	old, next := readDir(t, dir), readDir(t, newDir)
	oldRoot, newRoot := ca.SigningRoot(), parseOne(t, next[identity.RootCertFile])
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	r := NewCAReloader(ca, func(context.Context) (map[string][]byte, error) { return identity.ReadCAFiles(dir) }, "ca dir "+dir, opts)
	r.Now = func() time.Time { return now }
	var published []*identity.CA
	r.Publish = func(_ context.Context, ca *identity.CA) error { published = append(published, ca); return nil }
	ctx := context.Background()

	reload := func(t *testing.T, wantChange bool, wantErr ...string) {
		t.Helper()
		before := r.Current()
		changed, err := r.Reload(ctx)
		if len(wantErr) == 0 && err != nil {
			t.Fatalf("refused: %v", err)
		}
		for _, w := range wantErr {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Fatalf("error %v, want one containing %q", err, w)
			}
		}
		if changed != wantChange {
			t.Fatalf("changed = %v, want %v", changed, wantChange)
		}
		if !wantChange && r.Current() != before {
			t.Fatal("the CA in force changed")
		}
	}
	if changed, err := r.Reload(ctx); changed || err != nil {
		t.Fatalf("unchanged files: %v, %v", changed, err)
	}

	// The mistake: signing switched to a root the agents do not trust yet.
	caDirFiles(t, dir, map[string][]byte{identity.CACertFile: next[identity.CACertFile], identity.CAKeyFile: next[identity.CAKeyFile],
		identity.CertChainFile: next[identity.CertChainFile], identity.RootCertFile: concat(old[identity.RootCertFile], next[identity.RootCertFile])})
	reload(t, false, "ca dir "+dir, identity.CACertFile, identity.RootCertFile, "does not hold", identity.Fingerprint(newRoot))
	caDirFiles(t, dir, old)
	reload(t, false)

	// Step 1: the new root added to the bundle; signing unchanged.
	caDirFiles(t, dir, map[string][]byte{identity.RootCertFile: concat(old[identity.RootCertFile], next[identity.RootCertFile])})
	reload(t, true)
	if got := r.Current(); len(got.Roots()) != 2 || !got.SigningRoot().Equal(oldRoot) {
		t.Fatalf("step 1: %d roots, signing under %q", len(got.Roots()), got.SigningRoot().Subject)
	}

	// A bundle that does not hold the signing root is refused, naming the file.
	caDirFiles(t, dir, map[string][]byte{identity.RootCertFile: next[identity.RootCertFile]})
	reload(t, false, "ca dir "+dir, identity.RootCertFile, "does not verify")
	caDirFiles(t, dir, map[string][]byte{identity.RootCertFile: concat(old[identity.RootCertFile], next[identity.RootCertFile])})
	reload(t, false)

	// Step 2: signing switched to the new root; both roots stay.
	caDirFiles(t, dir, map[string][]byte{identity.CACertFile: next[identity.CACertFile], identity.CAKeyFile: next[identity.CAKeyFile], identity.CertChainFile: next[identity.CertChainFile]})
	reload(t, true)
	step2 := now
	if got := r.Current(); !got.SigningRoot().Equal(newRoot) || len(got.Roots()) != 2 {
		t.Fatalf("step 2: signing under %q, %d roots", got.SigningRoot().Subject, len(got.Roots()))
	}

	// Step 3 too early: certificates the old root signed may be valid for MaxTTL.
	now = step2.Add(opts.MaxTTL - time.Minute)
	caDirFiles(t, dir, map[string][]byte{identity.RootCertFile: next[identity.RootCertFile]})
	reload(t, false, "ca dir "+dir, identity.RootCertFile, "drops root", identity.Fingerprint(oldRoot), "stay valid until "+step2.Add(opts.MaxTTL).Format(time.RFC3339))
	// The same files, once the longest certificate lifetime has passed: step 3.
	now = step2.Add(opts.MaxTTL)
	reload(t, true)
	if got := r.Current(); len(got.Roots()) != 1 || !got.Roots()[0].Equal(newRoot) {
		t.Fatalf("step 3: roots %d", len(got.Roots()))
	}

	// Garbage is refused, naming the file; the CA in force stays.
	caDirFiles(t, dir, map[string][]byte{identity.CAKeyFile: []byte("not a key")})
	reload(t, false, "ca dir "+dir, identity.CAKeyFile)
	if err := os.Remove(filepath.Join(dir, identity.CAKeyFile)); err != nil {
		t.Fatal(err)
	}
	reload(t, false, identity.CAKeyFile+": missing")

	r.publish(ctx, slog.New(slog.DiscardHandler))
	if len(published) != 1 || published[0] != r.Current() {
		t.Fatalf("published %d CAs, want the one in force", len(published))
	}
}

// Removing the root that still signs, in the same change that switches signing away
// from it (steps 2 and 3 at once), is refused.
func TestCAReloaderRefusesDroppingTheSigningRoot(t *testing.T) {
	opts := identity.CAOptions{MaxTTL: time.Hour}
	dir, newDir := t.TempDir(), t.TempDir()
	ca, err := identity.LoadOrCreateCA(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := identity.LoadOrCreateCA(newDir, opts); err != nil {
		t.Fatal(err)
	}
	old, next := readDir(t, dir), readDir(t, newDir)
	caDirFiles(t, dir, map[string][]byte{identity.RootCertFile: concat(old[identity.RootCertFile], next[identity.RootCertFile])})
	r := NewCAReloader(ca, func(context.Context) (map[string][]byte, error) { return identity.ReadCAFiles(dir) }, "ca dir "+dir, opts)
	if changed, err := r.Reload(context.Background()); !changed || err != nil {
		t.Fatalf("step 1: %v, %v", changed, err)
	}
	caDirFiles(t, dir, next)
	changed, err := r.Reload(context.Background())
	if changed || err == nil || !strings.Contains(err.Error(), "signs the certificates in use") || !strings.Contains(err.Error(), identity.RootCertFile) {
		t.Fatalf("steps 2 and 3 at once: %v, %v; want refused", changed, err)
	}
}

func parseOne(t *testing.T, pemData []byte) *x509.Certificate {
	t.Helper()
	certs, err := identity.ParseCertificates(pemData)
	if err != nil || len(certs) != 1 {
		t.Fatalf("want one certificate: %v", err)
	}
	return certs[0]
}

// The CA server follows the CA in force: after signing switched to a new root, its own
// TLS certificate is issued under that root too, so an agent that trusts only the new
// root (after step 3) connects, and the certificates it gets chain to the new root.
func TestCAServerFollowsTheCA(t *testing.T) {
	opts := identity.CAOptions{MaxTTL: time.Hour}
	dir, newDir := t.TempDir(), t.TempDir()
	ca, err := identity.LoadOrCreateCA(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	newCA, err := identity.LoadOrCreateCA(newDir, opts)
	if err != nil {
		t.Fatal(err)
	}
	old, next := readDir(t, dir), readDir(t, newDir)
	r := NewCAReloader(ca, func(context.Context) (map[string][]byte, error) { return identity.ReadCAFiles(dir) }, "ca dir "+dir, opts)
	const token = "node-1-token-0123456789"
	auth, err := identity.NewNodeTokens(map[string]string{"node-1": token})
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/reviews")
	place := identity.Placement{}
	place.Add("node-1", id)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- (&CAServer{CA: r, Auth: auth, Workloads: place, ServerNames: []string{"veil-controller"}, Log: slog.New(slog.DiscardHandler)}).Serve(ctx, lis)
	}()
	defer func() { cancel(); <-done }()
	issue := func(roots []*x509.Certificate) (*identity.Issued, error) {
		t.Helper()
		b := identity.NewTrustBundle(ca.TrustDomain())
		if _, err := b.Set("test", roots); err != nil {
			t.Fatal(err)
		}
		conn, err := identity.DialCABundle(lis.Addr().String(), "veil-controller", b, identity.BearerToken(token))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		key, csr, err := identity.NewCSR(id)
		if err != nil {
			t.Fatal(err)
		}
		ictx, icancel := context.WithTimeout(ctx, 10*time.Second)
		defer icancel()
		return identity.NewClient(conn).Issue(ictx, id, csr, key, time.Hour)
	}
	if _, err := issue(newCA.Roots()); err == nil {
		t.Fatal("a client trusting only the new root connected before the rotation")
	}
	caDirFiles(t, dir, map[string][]byte{identity.RootCertFile: concat(old[identity.RootCertFile], next[identity.RootCertFile])})
	if changed, err := r.Reload(ctx); !changed || err != nil {
		t.Fatalf("step 1: %v, %v", changed, err)
	}
	caDirFiles(t, dir, map[string][]byte{identity.CACertFile: next[identity.CACertFile], identity.CAKeyFile: next[identity.CAKeyFile], identity.CertChainFile: next[identity.CertChainFile]})
	if changed, err := r.Reload(ctx); !changed || err != nil {
		t.Fatalf("step 2: %v, %v", changed, err)
	}
	iss, err := issue(newCA.Roots())
	if err != nil {
		t.Fatalf("a client trusting only the new root, after signing switched: %v", err)
	}
	if len(iss.Roots) != 2 || iss.Chain[0].CheckSignatureFrom(newCA.SigningRoot()) != nil {
		t.Fatalf("issued with %d roots, want both, and signed by the new root", len(iss.Roots))
	}
	if _, err := issue(ca.Roots()); err == nil {
		t.Fatal("a client trusting only the old root still connected after signing switched")
	}
}
