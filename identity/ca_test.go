package identity

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestCARestartKeepsRoot(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca1, err := LoadOrCreateCA(dir, CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("%s mode %v, want 0600", CAKeyFile, st.Mode().Perm())
	}
	ca2, err := LoadOrCreateCA(dir, CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !ca1.Roots()[0].Equal(ca2.Roots()[0]) {
		t.Fatal("restarted CA has a different root")
	}
	// A leaf from the restarted CA verifies against the first CA's bundle.
	iss, err := ca2.Sign(csrPEM(t, &x509.CertificateRequest{URIs: uris(t, "spiffe://cluster.local/ns/a/sa/b")}, mustKey(t)), 0)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca1.Roots()[0])
	if _, err := iss.Leaf().Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("leaf of restarted CA does not verify to the original root: %v", err)
	}
}

func TestPluginIntermediateIssuesLeavesChainingToItsRoot(t *testing.T) {
	dir, root, inter := pluginCA(t)
	ca, err := LoadOrCreateCA(dir, CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	id := mustID(t, "bookinfo", "reviews")
	iss, err := ca.Sign(csrPEM(t, &x509.CertificateRequest{URIs: uris(t, id.String())}, mustKey(t)), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(iss.Chain) != 2 || !iss.Chain[1].Equal(inter) {
		t.Fatalf("chain = %d certs, want leaf + operator intermediate", len(iss.Chain))
	}
	if len(iss.Roots) != 1 || !iss.Roots[0].Equal(root) {
		t.Fatal("roots are not the operator's root")
	}
	if err := iss.check(nil, time.Now()); err != nil {
		t.Fatalf("leaf does not chain to the operator root: %v", err)
	}
	// No certificate in the chain is the root: it travels separately, as the bundle.
	for _, c := range iss.Chain {
		if c.Equal(root) {
			t.Fatal("root included in the chain")
		}
	}
}

func TestPluginCABundleWithSeveralRoots(t *testing.T) {
	dir, root, _ := pluginCA(t)
	now := time.Now()
	other := caCert(t, "next root", mustKey(t), nil, nil, now, now.Add(time.Hour))
	writeFile(t, dir, RootCertFile, EncodeCertificates(other, root))
	ca, err := LoadCA(dir, CAOptions{})
	if err != nil {
		t.Fatalf("bundle with two roots (rotation): %v", err)
	}
	if len(ca.Roots()) != 2 {
		t.Fatalf("%d roots, want 2", len(ca.Roots()))
	}
}

func TestLoadCARefuses(t *testing.T) {
	tests := []struct {
		name    string
		mangle  func(t *testing.T, dir string)
		wantErr string
	}{
		{
			name: "key that does not match the certificate",
			mangle: func(t *testing.T, dir string) {
				writeFile(t, dir, CAKeyFile, keyPEM(t, mustKey(t)))
			},
			wantErr: "does not match",
		},
		{
			name: "chain that does not verify to the root",
			mangle: func(t *testing.T, dir string) {
				now := time.Now()
				writeFile(t, dir, RootCertFile, EncodeCertificates(caCert(t, "stranger", mustKey(t), nil, nil, now, now.Add(time.Hour))))
			},
			wantErr: "does not verify",
		},
		{
			name: "intermediate without its chain file and not in the bundle",
			mangle: func(t *testing.T, dir string) {
				os.Remove(filepath.Join(dir, CertChainFile))
				now := time.Now()
				// A root that is not the intermediate's issuer.
				writeFile(t, dir, RootCertFile, EncodeCertificates(caCert(t, "other", mustKey(t), nil, nil, now, now.Add(time.Hour))))
			},
			wantErr: "does not verify",
		},
		{
			name: "signing certificate that is not a CA",
			mangle: func(t *testing.T, dir string) {
				ca, err := NewSelfSignedCA(CAOptions{})
				if err != nil {
					t.Fatal(err)
				}
				key := mustKey(t)
				iss, err := ca.Sign(csrPEM(t, &x509.CertificateRequest{URIs: uris(t, "spiffe://cluster.local/ns/a/sa/b")}, key), 0)
				if err != nil {
					t.Fatal(err)
				}
				writeFile(t, dir, CACertFile, EncodeCertificates(iss.Leaf()))
				writeFile(t, dir, CAKeyFile, keyPEM(t, key))
			},
			wantErr: "not a CA",
		},
		{
			name: "missing key (partial directory is never regenerated)",
			mangle: func(t *testing.T, dir string) {
				os.Remove(filepath.Join(dir, CAKeyFile))
			},
			wantErr: CAKeyFile,
		},
		{
			name: "garbage key",
			mangle: func(t *testing.T, dir string) {
				writeFile(t, dir, CAKeyFile, []byte("not a key"))
			},
			wantErr: CAKeyFile,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir, _, _ := pluginCA(t)
			tc.mangle(t, dir)
			before := snapshotDir(t, dir)
			_, err := LoadOrCreateCA(dir, CAOptions{})
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("LoadOrCreateCA error = %v, want one containing %q", err, tc.wantErr)
			}
			if after := snapshotDir(t, dir); after != before {
				t.Fatal("a refused CA directory was modified")
			}
		})
	}
}

func snapshotDir(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range ents {
		data, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		b.WriteString(e.Name() + "\n" + string(data))
	}
	return b.String()
}
