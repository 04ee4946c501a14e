package controller

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/kubetest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// The CA in a Secret, against a real API server: two replicas starting together end with
// one root; a restart reuses it; a broken Secret is refused, not replaced; the root is
// published in a ConfigMap.
func TestCASecret(t *testing.T) {
	kc := kubetest.Start(t)
	cs := kubernetes.NewForConfigOrDie(kc.Config)
	ctx := context.Background()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "veil-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var cas [2]*identity.CA
	var errs [2]error
	var wg sync.WaitGroup
	for i := range cas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cas[i], errs[i] = LoadOrCreateCASecret(ctx, cs, "veil-system", "cacerts", identity.CAOptions{})
		}()
	}
	wg.Wait()
	if errs[0] != nil || errs[1] != nil {
		t.Fatal(errs)
	}
	if !bytes.Equal(cas[0].RootsPEM(), cas[1].RootsPEM()) {
		t.Fatal("two replicas starting together ended with two roots")
	}
	again, err := LoadOrCreateCASecret(ctx, cs, "veil-system", "cacerts", identity.CAOptions{})
	if err != nil || !bytes.Equal(again.RootsPEM(), cas[0].RootsPEM()) {
		t.Fatalf("a restart did not reuse the root: %v", err)
	}
	if err := PublishRoot(ctx, cs, "veil-system", "veil-ca-root", again); err != nil {
		t.Fatal(err)
	}
	cm, err := cs.CoreV1().ConfigMaps("veil-system").Get(ctx, "veil-ca-root", metav1.GetOptions{})
	if err != nil || cm.Data[RootConfigMapKey] != string(again.RootsPEM()) {
		t.Fatalf("published root: %v", err)
	}
	if _, err := cs.CoreV1().Secrets("veil-system").Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "broken"},
		Data: map[string][]byte{identity.CACertFile: cas[0].RootsPEM()}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateCASecret(ctx, cs, "veil-system", "broken", identity.CAOptions{}); err == nil {
		t.Fatal("a Secret holding only some of the CA's files was used")
	}
	s, err := cs.CoreV1().Secrets("veil-system").Get(ctx, "broken", metav1.GetOptions{})
	if err != nil || len(s.Data) != 1 {
		t.Fatalf("the broken Secret was changed: %v", err)
	}
}

// rotationCommands returns the shell blocks of README "Rotating the root CA", in order.
func rotationCommands(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(b), "\n### Rotating the root CA\n")
	if !ok {
		t.Fatal(`README.md has no section "Rotating the root CA"`)
	}
	if end := strings.Index(sec, "\n### "); end >= 0 {
		sec = sec[:end]
	}
	var blocks []string
	for {
		_, rest, ok := strings.Cut(sec, "```sh\n")
		if !ok {
			return blocks
		}
		block, after, _ := strings.Cut(rest, "```\n")
		blocks = append(blocks, block)
		sec = after
	}
}

// The README's root rotation on Kubernetes, its commands run as written against a real
// API server: the CA in force saved from the Secret, a new root made with openssl, then
// each step's `cacerts` (kubectl create --dry-run | kubectl replace). The controller's
// reloader takes each step from the Secret and publishes the bundle; step 3 before the
// longest certificate lifetime is refused.
func TestCASecretRotation(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Fatal("the README's commands need openssl: install it (scripts/deps.sh test does)")
	}
	blocks := rotationCommands(t)
	if len(blocks) < 5 {
		t.Fatalf("README: %d shell blocks in Rotating the root CA, want helpers, preparation, three steps", len(blocks))
	}
	helpers, prepare, steps := blocks[0], blocks[1], blocks[2:5]
	kc := kubetest.Start(t)
	cs := kubernetes.NewForConfigOrDie(kc.Config)
	ctx := context.Background()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "veil-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	opts := identity.CAOptions{MaxTTL: time.Hour}
	ca, err := LoadOrCreateCASecret(ctx, cs, "veil-system", "cacerts", opts)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	r := NewCAReloader(ca, SecretCAFiles(cs, "veil-system", "cacerts"), "CA secret veil-system/cacerts", opts)
	r.Now = func() time.Time { return now }
	r.Publish = func(ctx context.Context, ca *identity.CA) error {
		return PublishRoot(ctx, cs, "veil-system", "veil-ca-root", ca)
	}
	log := slog.New(slog.DiscardHandler)

	dir := t.TempDir()
	sh := func(script string) string {
		t.Helper()
		cmd := exec.Command("bash", "-euo", "pipefail", "-c", script)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "KUBECONFIG="+kc.Kubeconfig, "PATH="+kc.Bin+":"+os.Getenv("PATH"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v\n%s\n--- output\n%s", err, script, out)
		}
		return string(out)
	}
	out := sh(helpers + prepare + `echo "fingerprints $OLD $NEW"`)
	_, fps, _ := strings.Cut(out, "fingerprints ")
	oldFP, newFP, _ := strings.Cut(strings.TrimSpace(fps), " ")
	if oldFP != identity.Fingerprint(ca.SigningRoot()) {
		t.Fatalf("README's fingerprint of the old root %q, want %q", oldFP, identity.Fingerprint(ca.SigningRoot()))
	}
	step := func(i int) {
		t.Helper()
		for _, line := range strings.Split(steps[i], "\n") {
			if strings.HasPrefix(line, "cacerts ") {
				sh(helpers + line)
				return
			}
		}
		t.Fatalf("README step %d runs no cacerts", i+1)
	}
	roots := func() []string {
		cm, err := cs.CoreV1().ConfigMaps("veil-system").Get(ctx, "veil-ca-root", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		certs, err := identity.ParseCertificates([]byte(cm.Data[RootConfigMapKey]))
		if err != nil {
			t.Fatal(err)
		}
		var fps []string
		for _, c := range certs {
			fps = append(fps, identity.Fingerprint(c))
		}
		return fps
	}

	step(0)
	if changed, err := r.Reload(ctx); !changed || err != nil {
		t.Fatalf("step 1: %v, %v", changed, err)
	}
	r.publish(ctx, log)
	if got := roots(); !slices.Equal(got, []string{oldFP, newFP}) {
		t.Fatalf("after step 1 the ConfigMap holds %v, want the old and the new root", got)
	}
	step(1)
	if changed, err := r.Reload(ctx); !changed || err != nil {
		t.Fatalf("step 2: %v, %v", changed, err)
	}
	if got := identity.Fingerprint(r.Current().SigningRoot()); got != newFP {
		t.Fatalf("after step 2 the CA signs under %s, want the new root %s", got, newFP)
	}
	step(2)
	if changed, err := r.Reload(ctx); changed || err == nil || !strings.Contains(err.Error(), "CA secret veil-system/cacerts: root-cert.pem drops root") {
		t.Fatalf("step 3 at once: %v, %v; want refused, naming the Secret and the key", changed, err)
	}
	now = now.Add(opts.MaxTTL)
	if changed, err := r.Reload(ctx); !changed || err != nil {
		t.Fatalf("step 3 after --max-ttl: %v, %v", changed, err)
	}
	r.publish(ctx, log)
	if got := roots(); !slices.Equal(got, []string{newFP}) {
		t.Fatalf("after step 3 the ConfigMap holds %v, want the new root only", got)
	}
	// A controller starting now loads the rotated Secret.
	again, err := LoadOrCreateCASecret(ctx, cs, "veil-system", "cacerts", opts)
	if err != nil || identity.Fingerprint(again.SigningRoot()) != newFP {
		t.Fatalf("a restart after the rotation: %v", err)
	}
}
