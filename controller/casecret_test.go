package controller

import (
	"bytes"
	"context"
	"sync"
	"testing"

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
