package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/controller"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/internal/kubetest"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
)

// veilctl runs the command line and returns its output.
func veilctl(args ...string) (stdout, stderr string, err error) {
	var out, errOut bytes.Buffer
	err = run(context.Background(), args, &out, &errOut)
	return out.String(), errOut.String(), err
}

// generate prints the Gateway istioctl waypoint generate prints, and refuses what cannot
// be a waypoint with an error naming the flag.
func TestWaypointGenerate(t *testing.T) {
	for _, tc := range []struct {
		name, args, want, err string
	}{
		{"default", "-n bookinfo", `apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: bookinfo
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
`, ""},
		{"for all", "-n bookinfo --name reviews-wp --for all", `apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  labels:
    istio.io/waypoint-for: all
  name: reviews-wp
  namespace: bookinfo
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
`, ""},
		{"no namespace: default", "--for workload", "namespace: default", ""},
		{"none", "-n bookinfo --name none", "", `--name none: "none" cannot name a waypoint`},
		{"bad name", "-n bookinfo --name Way_Point", "", `--name "Way_Point": cannot name a waypoint`},
		{"bad for", "-n bookinfo --for everything", "", `--for "everything": want service, workload, all or none`},
		{"bad namespace", "-n Book.Info", "", `-n "Book.Info": not a namespace name`},
		{"stray argument", "-n bookinfo extra", "", `unexpected arguments ["extra"]`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, _, err := veilctl(append([]string{"waypoint", "generate"}, strings.Fields(tc.args)...)...)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if strings.HasPrefix(tc.want, "apiVersion") && out != tc.want || !strings.Contains(out, tc.want) {
				t.Fatalf("got\n%s\nwant\n%s", out, tc.want)
			}
		})
	}
	if _, _, err := veilctl("waypoint", "frobnicate"); err == nil || !strings.Contains(err.Error(), `unknown subcommand "frobnicate"`) {
		t.Errorf("unknown subcommand: %v", err)
	}
	if out, _, err := veilctl("waypoint", "-h"); err != nil || !strings.Contains(out, "veilctl waypoint apply -n NS") {
		t.Errorf("-h: %v\n%s", err, out)
	}
}

// installGatewayAPI applies the Gateway API CRDs veil's chart ships (GatewayClass, Gateway).
func installGatewayAPI(t *testing.T, kc *kubetest.Cluster) {
	dir := filepath.Join("..", "..", "deploy", "helm", "veil", "files", "crds")
	kc.Kubectl(t, "apply", "--server-side", "-f", filepath.Join(dir, "gatewayclasses.gateway.networking.k8s.io.yaml"),
		"-f", filepath.Join(dir, "gateways.gateway.networking.k8s.io.yaml"))
	kc.Kubectl(t, "wait", "--for", "condition=established", "--timeout", "60s",
		"crd/gatewayclasses.gateway.networking.k8s.io", "crd/gateways.gateway.networking.k8s.io")
}

// Against a real API server, with veil-controller's waypoint deployment running: apply
// writes the Gateway (server-side, so a later apply removes a label an earlier one set),
// --wait returns once the controller has programmed it (a waypoint pod ready), and
// --enroll-namespace labels the namespace, refusing to replace another waypoint's label
// without --overwrite. list shows the waypoints; delete removes them. A Gateway of
// another class is neither overwritten nor deleted, and without the Gateway API's CRDs
// the error says to install them.
func TestWaypointKube(t *testing.T) {
	kc := kubetest.Start(t)
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(kc.Config)
	gateways := dynamic.NewForConfigOrDie(kc.Config).Resource(gatewayGVR)
	kcfg := "--kubeconfig=" + kc.Kubeconfig
	for _, ns := range []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: "bookinfo", Labels: map[string]string{cluster.DataplaneModeLabel: cluster.DataplaneAmbient}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "legacy", Labels: map[string]string{cluster.UseWaypointLabel: "other"}}},
	} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	if _, _, err := veilctl("waypoint", "apply", "-n", "bookinfo", kcfg); err == nil || !strings.Contains(err.Error(), "install the Gateway API CRDs") {
		t.Fatalf("without the Gateway CRD: %v", err)
	}
	installGatewayAPI(t, kc)

	// The controller's waypoint deployment, as veil-controller runs it.
	wctx, stop := context.WithCancel(ctx)
	wdone := make(chan error, 1)
	go func() {
		wdone <- (&controller.Waypoints{Config: kc.Config, Image: "veil/veil-waypoint:test", CAAddr: "veil-controller.veil-system.svc:15012",
			Roots: func() []byte { return []byte("root") }, Settle: 20 * time.Millisecond, Log: slog.New(slog.DiscardHandler)}).Run(wctx)
	}()
	t.Cleanup(func() {
		stop()
		if err := <-wdone; err != nil {
			t.Error(err)
		}
	})

	// apply --wait: programmed once a pod of the Deployment the controller made is ready
	// (no kubelet here: the test makes the pod).
	type result struct {
		out string
		err error
	}
	applied := make(chan result, 1)
	go func() {
		out, _, err := veilctl("waypoint", "apply", "-n", "bookinfo", "--for", "all", "--wait", "--timeout", "60s", kcfg)
		applied <- result{out, err}
	}()
	deadline := time.Now().Add(60 * time.Second)
	for {
		d, err := cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		if err == nil {
			p, err := cs.CoreV1().Pods("bookinfo").Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "waypoint-1", Labels: d.Spec.Template.Labels},
				Spec: *d.Spec.Template.Spec.DeepCopy()}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			p.Status.Phase, p.Status.PodIP = corev1.PodRunning, "10.1.1.30"
			p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
			if _, err := cs.CoreV1().Pods("bookinfo").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the controller made no Deployment for the waypoint: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	r := <-applied
	if r.err != nil || !strings.Contains(r.out, "waypoint bookinfo/waypoint applied") || !strings.Contains(r.out, "waypoint bookinfo/waypoint is ready: ") ||
		!strings.Contains(r.out, "waypoint.bookinfo.svc.cluster.local") {
		t.Fatalf("apply --wait: %v\n%s", r.err, r.out)
	}
	gw, err := gateways.Namespace("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	listeners, _, _ := unstructured.NestedSlice(gw.Object, "spec", "listeners")
	class, _, _ := unstructured.NestedString(gw.Object, "spec", "gatewayClassName")
	var l map[string]any
	if len(listeners) == 1 {
		l, _ = listeners[0].(map[string]any)
	}
	if class != cluster.WaypointClass || l == nil || l["name"] != "mesh" || l["port"] != int64(15008) || l["protocol"] != "HBONE" || gw.GetLabels()[cluster.WaypointForLabel] != "all" {
		t.Fatalf("Gateway: class %s, listeners %v, labels %v", class, listeners, gw.GetLabels())
	}
	// Applied again with the default --for: the label goes.
	if _, _, err := veilctl("waypoint", "apply", "-n", "bookinfo", kcfg); err != nil {
		t.Fatal(err)
	}
	if gw, err = gateways.Namespace("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{}); err != nil || gw.GetLabels()[cluster.WaypointForLabel] != "" {
		t.Fatalf("labels %v (%v), want no %s", gw.GetLabels(), err, cluster.WaypointForLabel)
	}

	// --wait gives up with what the Gateway says.
	if _, _, err := veilctl("waypoint", "apply", "-n", "legacy", "--name", "slow", "--wait", "--timeout", "1s", kcfg); err == nil ||
		!strings.Contains(err.Error(), "legacy/slow not programmed after 1s: Programmed=False (NoResources)") {
		t.Fatalf("apply --wait with no ready pod: %v", err)
	}

	// Enrolment: bookinfo is labelled; legacy uses another waypoint: refused, then
	// replaced with --overwrite, with a warning that legacy is not in the mesh.
	out, _, err := veilctl("waypoint", "apply", "-n", "bookinfo", "--enroll-namespace", kcfg)
	if err != nil || !strings.Contains(out, "namespace bookinfo labelled istio.io/use-waypoint=waypoint") {
		t.Fatalf("enroll: %v\n%s", err, out)
	}
	if ns, err := cs.CoreV1().Namespaces().Get(ctx, "bookinfo", metav1.GetOptions{}); err != nil || ns.Labels[cluster.UseWaypointLabel] != "waypoint" ||
		ns.Labels[cluster.DataplaneModeLabel] != cluster.DataplaneAmbient {
		t.Fatalf("bookinfo labels %v (%v)", ns.Labels, err)
	}
	if _, _, err := veilctl("waypoint", "apply", "-n", "legacy", "--name", "slow", "--enroll-namespace", kcfg); err == nil ||
		!strings.Contains(err.Error(), `namespace legacy already uses waypoint "other" (istio.io/use-waypoint=other): add --overwrite`) {
		t.Fatalf("enroll over another waypoint: %v", err)
	}
	_, errOut, err := veilctl("waypoint", "apply", "-n", "legacy", "--name", "slow", "--enroll-namespace", "--overwrite", kcfg)
	if err != nil || !strings.Contains(errOut, "namespace legacy is not in the mesh") {
		t.Fatalf("enroll --overwrite: %v\n%s", err, errOut)
	}
	if ns, err := cs.CoreV1().Namespaces().Get(ctx, "legacy", metav1.GetOptions{}); err != nil || ns.Labels[cluster.UseWaypointLabel] != "slow" {
		t.Fatalf("legacy labels %v (%v)", ns.Labels, err)
	}

	// Another class's Gateway is not a waypoint: neither overwritten nor deleted.
	ingress := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
		"metadata": map[string]any{"name": "ingress"},
		"spec": map[string]any{"gatewayClassName": "istio",
			"listeners": []any{map[string]any{"name": "http", "port": int64(80), "protocol": "HTTP"}}}}}
	if _, err := gateways.Namespace("bookinfo").Create(ctx, ingress, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := veilctl("waypoint", "apply", "-n", "bookinfo", "--name", "ingress", kcfg); err == nil ||
		!strings.Contains(err.Error(), `Gateway bookinfo/ingress exists with gatewayClassName "istio": it is not a waypoint`) {
		t.Fatalf("apply over another class: %v", err)
	}

	// list, with the namespace from the flag and from every namespace; $KUBECONFIG works
	// as --kubeconfig.
	t.Setenv("KUBECONFIG", kc.Kubeconfig)
	out, _, err = veilctl("waypoint", "list", "-n", "bookinfo")
	if err != nil || !strings.Contains(out, "NAME") || !strings.Contains(out, "waypoint   service") || !strings.Contains(out, "True") || strings.Contains(out, "ingress") {
		t.Fatalf("list:\n%s\n%v", out, err)
	}
	out, _, err = veilctl("waypoint", "list", "-A")
	if err != nil || !strings.Contains(out, "NAMESPACE") || !strings.Contains(out, "legacy      slow") || !strings.Contains(out, "bookinfo    waypoint") {
		t.Fatalf("list -A:\n%s\n%v", out, err)
	}

	// delete: the other class's Gateway is refused; the waypoint goes, with a warning that
	// bookinfo still uses it; --all empties legacy.
	if _, _, err := veilctl("waypoint", "delete", "-n", "bookinfo", "ingress"); err == nil || !strings.Contains(err.Error(), "not a waypoint, left alone") {
		t.Fatalf("delete another class's Gateway: %v", err)
	}
	out, errOut, err = veilctl("waypoint", "delete", "-n", "bookinfo", "waypoint")
	if err != nil || !strings.Contains(out, "waypoint bookinfo/waypoint deleted") || !strings.Contains(errOut, "namespace bookinfo still uses waypoint waypoint") {
		t.Fatalf("delete: %v\n%s\n%s", err, out, errOut)
	}
	if _, err := gateways.Namespace("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("the Gateway after delete: %v", err)
	}
	if _, err := gateways.Namespace("bookinfo").Get(ctx, "ingress", metav1.GetOptions{}); err != nil {
		t.Fatalf("the other class's Gateway: %v", err)
	}
	if out, _, err := veilctl("waypoint", "delete", "-n", "legacy", "--all"); err != nil || !strings.Contains(out, "waypoint legacy/slow deleted") {
		t.Fatalf("delete --all: %v\n%s", err, out)
	}
	if _, _, err := veilctl("waypoint", "delete", "-n", "legacy"); err == nil || !strings.Contains(err.Error(), "name the waypoints, or give --all") {
		t.Fatalf("delete without names: %v", err)
	}
	if out, _, err := veilctl("waypoint", "list", "-n", "legacy"); err != nil || !strings.Contains(out, "No waypoints found.") {
		t.Fatalf("list of an empty namespace: %v\n%s", err, out)
	}
	// The controller removes what it deployed for the deleted waypoint.
	deadline = time.Now().Add(30 * time.Second)
	for {
		_, err := cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the waypoint's Deployment after its Gateway was deleted: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// --dir writes the Gateway as a file that veil-controller --config-dir loads cleanly
// (with the addresses given, the waypoint's), enrols a namespace no other file defines
// and refuses to redefine one another file does; list and delete work on the files
// veilctl wrote.
func TestWaypointDir(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "cluster.yaml"), []byte(`apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: handmade, namespace: bookinfo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
`), 0o644); err != nil {
		t.Fatal(err)
	}
	load := func() *controller.Config {
		t.Helper()
		cfg, err := (&controller.DirSource{Dir: dir}).Load()
		if err != nil {
			t.Fatalf("the controller loading the directory: %v", err)
		}
		return cfg
	}
	gateway := func(cfg *controller.Config, ns, name string) *cluster.Gateway {
		for _, g := range cfg.Cluster.Gateways {
			if g.Namespace == ns && g.Name == name {
				return g
			}
		}
		return nil
	}

	out, errOut, err := veilctl("waypoint", "apply", "--dir", dir, "-n", "bookinfo", "--for", "workload", "--address", "10.1.2.9", "--address", "fd00::9")
	file := filepath.Join(dir, "waypoint.bookinfo.waypoint.yaml")
	if err != nil || !strings.Contains(out, "waypoint bookinfo/waypoint applied: "+file) || errOut != "" {
		t.Fatalf("apply --dir: %v\n%s\n%s", err, out, errOut)
	}
	g := gateway(load(), "bookinfo", "waypoint")
	want := []netip.Addr{netip.MustParseAddr("10.1.2.9"), netip.MustParseAddr("fd00::9")}
	if g == nil || g.ClassName != cluster.WaypointClass || len(g.Listeners) != 1 || g.Listeners[0] != (cluster.GatewayListener{Name: "mesh", Port: 15008, Protocol: "HBONE"}) ||
		fmt.Sprint(g.Addresses) != fmt.Sprint(want) || g.Labels[cluster.WaypointForLabel] != "workload" {
		t.Fatalf("the controller reads %+v", g)
	}

	// bookinfo is defined in cluster.yaml: enrolling it there is the operator's edit.
	if _, _, err := veilctl("waypoint", "apply", "--dir", dir, "-n", "bookinfo", "--enroll-namespace"); err == nil ||
		!strings.Contains(err.Error(), "namespace bookinfo is defined in "+filepath.Join(dir, "cluster.yaml")+": set its label istio.io/use-waypoint: waypoint there") {
		t.Fatalf("enrol a namespace another file defines: %v", err)
	}
	// The hand-written Gateway is not redefined.
	if _, _, err := veilctl("waypoint", "apply", "--dir", dir, "-n", "bookinfo", "--name", "handmade"); err == nil ||
		!strings.Contains(err.Error(), "Gateway bookinfo/handmade is already defined in "+filepath.Join(dir, "cluster.yaml")) {
		t.Fatalf("redefine a Gateway: %v", err)
	}
	// A namespace no file defines is written with the waypoint, enrolled.
	_, errOut, err = veilctl("waypoint", "apply", "--dir", dir, "-n", "reviews", "--name", "rw", "--enroll-namespace")
	if err != nil || !strings.Contains(errOut, "no status.addresses") || !strings.Contains(errOut, "namespace reviews is not in the mesh") {
		t.Fatalf("apply --enroll-namespace: %v\n%s", err, errOut)
	}
	cfg := load()
	if ns := cfg.Cluster.Namespaces["reviews"]; ns == nil || ns.Labels[cluster.UseWaypointLabel] != "rw" || gateway(cfg, "reviews", "rw") == nil {
		t.Fatalf("namespace %+v, gateway %+v", cfg.Cluster.Namespaces["reviews"], gateway(cfg, "reviews", "rw"))
	}
	// Applied again (a new address), the enrolment stays.
	if _, _, err := veilctl("waypoint", "apply", "--dir", dir, "-n", "reviews", "--name", "rw", "--address", "10.1.2.10"); err != nil {
		t.Fatal(err)
	}
	if cfg := load(); cfg.Cluster.Namespaces["reviews"].Labels[cluster.UseWaypointLabel] != "rw" || len(gateway(cfg, "reviews", "rw").Addresses) != 1 {
		t.Fatalf("after a second apply: %+v", cfg.Cluster.Namespaces["reviews"])
	}
	if _, _, err := veilctl("waypoint", "apply", "--dir", dir, "-n", "reviews", "--wait"); err == nil || !strings.Contains(err.Error(), "--wait needs the API server") {
		t.Fatalf("--wait with --dir: %v", err)
	}
	if _, _, err := veilctl("waypoint", "apply", "--dir", dir, "-n", "reviews", "--address", "0.0.0.0"); err == nil || !strings.Contains(err.Error(), `--address "0.0.0.0": not a usable IP address`) {
		t.Fatalf("--address 0.0.0.0: %v", err)
	}

	out, _, err = veilctl("waypoint", "list", "--dir", dir)
	for _, w := range []string{"NAMESPACE", "bookinfo    handmade   service", "bookinfo    waypoint   workload", "10.1.2.9,fd00::9", "reviews     rw"} {
		if err != nil || !strings.Contains(out, w) {
			t.Fatalf("list --dir lacks %q: %v\n%s", w, err, out)
		}
	}
	if _, _, err := veilctl("waypoint", "delete", "--dir", dir, "-n", "bookinfo", "handmade"); err == nil || !strings.Contains(err.Error(), "which veilctl did not write") {
		t.Fatalf("delete a hand-written Gateway: %v", err)
	}
	if out, _, err := veilctl("waypoint", "delete", "--dir", dir, "-n", "reviews", "rw"); err != nil || !strings.Contains(out, "waypoint reviews/rw deleted") {
		t.Fatalf("delete --dir: %v\n%s", err, out)
	}
	if out, _, err := veilctl("waypoint", "delete", "--dir", dir, "-n", "bookinfo", "--all"); err == nil || !strings.Contains(out, "waypoint bookinfo/waypoint deleted") {
		t.Fatalf("delete --all --dir (the hand-written one refused): %v\n%s", err, out)
	}
	cfg = load()
	if gateway(cfg, "bookinfo", "waypoint") != nil || gateway(cfg, "reviews", "rw") != nil || cfg.Cluster.Namespaces["reviews"] != nil || gateway(cfg, "bookinfo", "handmade") == nil {
		t.Fatalf("after delete: gateways %v", cfg.Cluster.Gateways)
	}
	if _, _, err := veilctl("waypoint", "list", "--dir", dir, "--kubeconfig", "x"); err == nil || !strings.Contains(err.Error(), "give --dir or --kubeconfig, not both") {
		t.Fatalf("--dir and --kubeconfig: %v", err)
	}
}
