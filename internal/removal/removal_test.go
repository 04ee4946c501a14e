package removal

import (
	"context"
	"testing"
	"time"

	"github.com/veilmesh/veil/internal/kubetest"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Against a real API server: a DaemonSet deleted with its pods is a removal; one
// deleted with its pods orphaned (to replace it) is not, nor is one present again.
// (TestRBACIsNecessary runs the watch with the agent's own, least-privilege account.)
func TestRemoving(t *testing.T) {
	kc := kubetest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := kubernetes.NewForConfigOrDie(kc.Config)
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "veil-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"app": "veil-agent"}
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "veil-agent", Namespace: "veil-system"},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "agent", Image: "veil/veil-agent:dev"}}}},
		},
	}
	dss := client.AppsV1().DaemonSets("veil-system")
	if _, err := dss.Create(ctx, ds, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	w := Start(ctx, client, "veil-system", "veil-agent")
	want := func(why string, removing bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, err := w.Removing(ctx)
			if err == nil && got == removing {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: Removing = %v, %v; want %v", why, got, err, removing)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	want("present", false)

	// kubectl delete --cascade=orphan: the API server sets the orphan finalizer, which the
	// garbage collector (none runs here) removes once the pods are orphaned.
	orphan := metav1.DeletePropagationOrphan
	if err := dss.Delete(ctx, "veil-agent", metav1.DeleteOptions{PropagationPolicy: &orphan}); err != nil {
		t.Fatal(err)
	}
	want("being deleted with its pods orphaned", false)
	for deadline := time.Now().Add(10 * time.Second); !w.orphaning.Load(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the watch never saw the orphaning deletion")
		}
	}
	got, err := dss.Get(ctx, "veil-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got.Finalizers = nil // what the garbage collector does
	if _, err := dss.Update(ctx, got, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	want("deleted with its pods orphaned", false)

	// Re-created, then deleted with its pods (helm uninstall): a removal.
	if _, err := dss.Create(ctx, ds, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want("re-created", false)
	for deadline := time.Now().Add(10 * time.Second); w.orphaning.Load(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the watch never saw the DaemonSet re-created")
		}
	}
	background := metav1.DeletePropagationBackground
	if err := dss.Delete(ctx, "veil-agent", metav1.DeleteOptions{PropagationPolicy: &background}); err != nil {
		t.Fatal(err)
	}
	want("deleted with its pods", true)
}
