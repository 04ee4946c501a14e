package controller

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/internal/kubetest"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// waypointEnv is an API server with the Gateway API CRDs and a namespace bookinfo.
type waypointEnv struct {
	t        *testing.T
	kc       *kubetest.Cluster
	cs       kubernetes.Interface
	gateways dynamic.NamespaceableResourceInterface
	classes  dynamic.NamespaceableResourceInterface
	logs     *syncBuffer
}

func newWaypointEnv(t *testing.T) *waypointEnv {
	kc := kubetest.Start(t)
	installGatewayCRDs(t, kc)
	dyn := dynamic.NewForConfigOrDie(kc.Config)
	e := &waypointEnv{t: t, kc: kc, cs: kubernetes.NewForConfigOrDie(kc.Config), gateways: dyn.Resource(GatewayGVR),
		classes: dyn.Resource(GatewayClassGVR), logs: &syncBuffer{}}
	if _, err := e.cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bookinfo"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return e
}

const testRoot = "-----BEGIN CERTIFICATE-----\nroot one\n-----END CERTIFICATE-----\n"

// run runs w (with the test's API server, fast timings and the test's log) until the
// test ends or stop is called.
func (e *waypointEnv) run(w *Waypoints) (stop func()) {
	w.Config = e.kc.Config
	if w.Image == "" {
		w.Image = "veil/veil-waypoint:test"
	}
	if w.CAAddr == "" {
		w.CAAddr = "veil-controller.veil-system.svc:15012"
	}
	if w.Roots == nil {
		w.Roots = func() []byte { return []byte(testRoot) }
	}
	w.Settle, w.Interval, w.GatewayRecheck = 20*time.Millisecond, 300*time.Millisecond, 100*time.Millisecond
	w.Log = slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				e.t.Error(err)
			}
		})
	}
	e.t.Cleanup(stop)
	return stop
}

// eventually polls ok until it holds, failing the test after 30 s with ok's last word.
func (e *waypointEnv) eventually(what string, ok func() (bool, string)) {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		done, last := ok()
		if done {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s: never (last: %s)\nlog:\n%s", what, last, e.logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// createGateway creates bookinfo/name of class with the listeners given as
// name/port/protocol.
func (e *waypointEnv) createGateway(name, class string, labels map[string]any, listeners ...string) *unstructured.Unstructured {
	e.t.Helper()
	var ls []any
	for _, l := range listeners {
		f := strings.Split(l, "/")
		var port int64
		fmt.Sscan(f[1], &port)
		ls = append(ls, map[string]any{"name": f[0], "port": port, "protocol": f[2]})
	}
	gw := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
		"metadata": map[string]any{"name": name, "namespace": "bookinfo", "labels": labels},
		"spec":     map[string]any{"gatewayClassName": class, "listeners": ls},
	}}
	gw, err := e.gateways.Namespace("bookinfo").Create(context.Background(), gw, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	return gw
}

func (e *waypointEnv) gateway(name string) *unstructured.Unstructured {
	e.t.Helper()
	gw, err := e.gateways.Namespace("bookinfo").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	return gw
}

// conditionOf returns the status, reason and message of gw's condition typ.
func conditionOf(gw *unstructured.Unstructured, typ string) (status, reason, message string) {
	conds, _, _ := unstructured.NestedSlice(gw.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == typ {
			s, _ := m["status"].(string)
			r, _ := m["reason"].(string)
			msg, _ := m["message"].(string)
			return s, r, msg
		}
	}
	return "", "", ""
}

// waitCondition waits for the Gateway's condition typ to have status and reason.
func (e *waypointEnv) waitCondition(name, typ, status, reason string) (message string) {
	e.t.Helper()
	e.eventually(fmt.Sprintf("Gateway %s: %s=%s (%s)", name, typ, status, reason), func() (bool, string) {
		s, r, m := conditionOf(e.gateway(name), typ)
		message = m
		return s == status && r == reason, fmt.Sprintf("%s=%s (%s): %s", typ, s, r, m)
	})
	return message
}

// A Gateway of class istio-waypoint, with veil owning the class, gets what istiod would
// deploy: the class created as veil's, a ServiceAccount, the trust bundle, a Deployment
// of veil-waypoint and a Service, all owned by the Gateway. Its status says Accepted, and
// Programmed with the Service's address and DNS name once a waypoint pod is ready; the
// addresses go when no pod is. A scale is kept, a new trust bundle is written, nothing is
// written without a change, and deleting the Gateway removes it all (this API server
// runs no garbage collector: the controller deletes them itself).
func TestWaypointsDeploy(t *testing.T) {
	e := newWaypointEnv(t)
	ctx := context.Background()
	root := []byte(testRoot)
	rootNow := func() []byte { return slices.Clone(root) }
	gw := e.createGateway("waypoint", cluster.WaypointClass, map[string]any{cluster.WaypointForLabel: "all"}, "mesh/15008/HBONE")
	w := &Waypoints{Image: "registry.example/veil-waypoint:1.2", PullPolicy: corev1.PullAlways, Roots: rootNow,
		TrustDomain: "example.org", RootNamespace: "mesh-root", PolicyPlacement: "istio"}
	e.run(w)

	// The class, veil's and accepted.
	e.eventually("GatewayClass istio-waypoint created as veil's and accepted", func() (bool, string) {
		gc, err := e.classes.Get(ctx, cluster.WaypointClass, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		ctrl, _, _ := unstructured.NestedString(gc.Object, "spec", "controllerName")
		s, r, _ := conditionOf(gc, "Accepted")
		return ctrl == WaypointControllerName && s == "True" && r == "Accepted", fmt.Sprintf("controller %s, Accepted=%s", ctrl, s)
	})

	// The objects, as istiod makes them.
	var (
		sa  *corev1.ServiceAccount
		dep *appsv1.Deployment
		svc *corev1.Service
	)
	e.eventually("the ServiceAccount, Deployment and Service", func() (bool, string) {
		var err1, err2, err3 error
		sa, err1 = e.cs.CoreV1().ServiceAccounts("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		dep, err2 = e.cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		svc, err3 = e.cs.CoreV1().Services("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		err := errors.Join(err1, err2, err3)
		return err == nil, fmt.Sprint(err)
	})
	for _, o := range []metav1.Object{sa, dep, svc} {
		ref := metav1.GetControllerOf(o)
		if ref == nil || ref.UID != gw.GetUID() || ref.Kind != "Gateway" || ref.Name != "waypoint" || ref.APIVersion != "gateway.networking.k8s.io/v1" {
			t.Errorf("%s: controller %+v, want the Gateway (uid %s)", o.GetName(), ref, gw.GetUID())
		}
		if o.GetLabels()[cluster.GatewayNameLabel] != "waypoint" {
			t.Errorf("%s: labels %v", o.GetName(), o.GetLabels())
		}
	}
	if *dep.Spec.Replicas != 1 {
		t.Errorf("replicas %d", *dep.Spec.Replicas)
	}
	pod := dep.Spec.Template
	if pod.Labels[cluster.GatewayNameLabel] != "waypoint" || pod.Labels["istio.io/dataplane-mode"] != "none" {
		t.Errorf("pod labels %v", pod.Labels)
	}
	if pod.Spec.ServiceAccountName != "waypoint" || pod.Spec.AutomountServiceAccountToken == nil || *pod.Spec.AutomountServiceAccountToken {
		t.Errorf("service account %q, automount %v: want its own account, no API token", pod.Spec.ServiceAccountName, pod.Spec.AutomountServiceAccountToken)
	}
	if len(pod.Spec.Containers) != 1 {
		t.Fatalf("containers %+v", pod.Spec.Containers)
	}
	c := pod.Spec.Containers[0]
	if c.Image != "registry.example/veil-waypoint:1.2" || c.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("image %s %s", c.Image, c.ImagePullPolicy)
	}
	wantArgs := []string{"--ca-addr=veil-controller.veil-system.svc:15012", "--ca-server-name=veil-controller.veil-system.svc",
		"--ca-root=/etc/veil/ca/root-cert.pem", "--token-file=/var/run/secrets/tokens/istio-token", "--trust-domain=example.org",
		"--root-namespace=mesh-root", "--namespace=$(POD_NAMESPACE)", "--gateway=$(GATEWAY_NAME)", "--pod-ip=$(POD_IP)",
		"--hbone-addr=[::]:15008", "--metrics-addr=:15020", "--ready-addr=:15021", "--policy-placement=istio"}
	if !slices.Equal(c.Args, wantArgs) {
		t.Errorf("args\n got %q\nwant %q", c.Args, wantArgs)
	}
	if got := pod.Annotations[cluster.PolicyPlacementAnnotation]; got != "istio" {
		t.Errorf("pod annotation %s=%q, want the placement the waypoint runs (istio)", cluster.PolicyPlacementAnnotation, got)
	}
	env := map[string]string{}
	for _, v := range c.Env {
		switch {
		case v.ValueFrom != nil && v.ValueFrom.FieldRef != nil:
			env[v.Name] = "field " + v.ValueFrom.FieldRef.FieldPath
		default:
			env[v.Name] = v.Value
		}
	}
	if env["POD_NAMESPACE"] != "field metadata.namespace" || env["POD_IP"] != "field status.podIP" || env["GATEWAY_NAME"] != "waypoint" {
		t.Errorf("env %v", env)
	}
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	if ports["mesh"] != 15008 || ports["metrics"] != 15020 || ports["status-port"] != 15021 {
		t.Errorf("ports %v", ports)
	}
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz/ready" || p.HTTPGet.Port.IntValue() != 15021 {
		t.Errorf("readiness probe %+v", p)
	}
	if sc := c.SecurityContext; sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("security context %+v", sc)
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Spec.Volumes {
		volumes[v.Name] = v
	}
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	if v := volumes[mounts["/var/run/secrets/tokens"]]; v.Projected == nil || len(v.Projected.Sources) != 1 || v.Projected.Sources[0].ServiceAccountToken == nil ||
		v.Projected.Sources[0].ServiceAccountToken.Audience != "istio-ca" || v.Projected.Sources[0].ServiceAccountToken.Path != "istio-token" {
		t.Errorf("token volume %+v: want the projected token (audience istio-ca) at /var/run/secrets/tokens/istio-token", v.VolumeSource)
	}
	if v := volumes[mounts["/etc/veil/ca"]]; v.DownwardAPI == nil || len(v.DownwardAPI.Items) != 1 || v.DownwardAPI.Items[0].Path != "root-cert.pem" ||
		v.DownwardAPI.Items[0].FieldRef == nil || v.DownwardAPI.Items[0].FieldRef.FieldPath != "metadata.annotations['veilmesh.io/ca-root']" ||
		pod.Annotations["veilmesh.io/ca-root"] != testRoot {
		t.Errorf("trust bundle volume %+v, annotations %v: want /etc/veil/ca/root-cert.pem from the pod's annotation", v.VolumeSource, pod.Annotations)
	}
	if len(svc.Spec.Ports) != 2 || svc.Spec.Ports[0].Name != "mesh" || svc.Spec.Ports[0].Port != 15008 || svc.Spec.Ports[0].TargetPort.IntValue() != 15008 ||
		svc.Spec.Ports[1].Name != "status-port" || svc.Spec.Ports[1].Port != 15021 {
		t.Errorf("service ports %+v", svc.Spec.Ports)
	}
	if svc.Spec.Selector[cluster.GatewayNameLabel] != "waypoint" || svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == "None" {
		t.Errorf("service selector %v, clusterIP %q", svc.Spec.Selector, svc.Spec.ClusterIP)
	}
	for k, v := range svc.Spec.Selector {
		if pod.Labels[k] != v {
			t.Errorf("the Service selects %s=%s, which the pods lack", k, v)
		}
	}

	// Accepted, but not programmed and no address while no pod is ready.
	e.waitCondition("waypoint", "Accepted", "True", "Accepted")
	e.waitCondition("waypoint", "Programmed", "False", "NoResources")
	if a, _, _ := unstructured.NestedSlice(e.gateway("waypoint").Object, "status", "addresses"); len(a) != 0 {
		t.Fatalf("addresses %v with no ready pod", a)
	}

	// A ready waypoint pod (no kubelet: its status is set here).
	p, err := e.cs.CoreV1().Pods("bookinfo").Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "waypoint-1", Labels: pod.Labels},
		Spec: *pod.Spec.DeepCopy()}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	setPodReady := func(ready bool) {
		t.Helper()
		p.Status.Phase, p.Status.PodIP, p.Status.PodIPs = corev1.PodRunning, "10.1.1.30", []corev1.PodIP{{IP: "10.1.1.30"}}
		status := corev1.ConditionFalse
		if ready {
			status = corev1.ConditionTrue
		}
		p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: status}}
		if p, err = e.cs.CoreV1().Pods("bookinfo").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	setPodReady(false)
	time.Sleep(500 * time.Millisecond)
	if s, _, _ := conditionOf(e.gateway("waypoint"), "Programmed"); s != "False" {
		t.Fatalf("Programmed=%s with a pod that is not ready", s)
	}
	setPodReady(true)
	msg := e.waitCondition("waypoint", "Programmed", "True", "Programmed")
	if !strings.Contains(msg, "waypoint.bookinfo.svc.cluster.local:15008") {
		t.Errorf("Programmed message %q", msg)
	}
	addrs, _, _ := unstructured.NestedSlice(e.gateway("waypoint").Object, "status", "addresses")
	want := []any{map[string]any{"type": "IPAddress", "value": svc.Spec.ClusterIP},
		map[string]any{"type": "Hostname", "value": "waypoint.bookinfo.svc.cluster.local"}}
	if fmt.Sprint(addrs) != fmt.Sprint(want) {
		t.Fatalf("addresses %v, want %v", addrs, want)
	}
	// What the agents read of it: the Gateway as the Kubernetes source parses it.
	st, errs := cluster.Parse("gw", unstructuredDoc(e.gateway("waypoint")).data)
	if len(errs) > 0 || len(st.Gateways) != 1 || len(st.Gateways[0].Addresses) != 1 ||
		st.Gateways[0].Addresses[0] != netip.MustParseAddr(svc.Spec.ClusterIP) || st.Gateways[0].Hostnames[0] != "waypoint.bookinfo.svc.cluster.local" {
		t.Fatalf("parsed %+v, %v", st.Gateways, errs)
	}

	// The pod stops being ready: no address, not programmed.
	setPodReady(false)
	e.waitCondition("waypoint", "Programmed", "False", "NoResources")
	if a, _, _ := unstructured.NestedSlice(e.gateway("waypoint").Object, "status", "addresses"); len(a) != 0 {
		t.Fatalf("addresses %v with no ready pod", a)
	}
	setPodReady(true)
	e.waitCondition("waypoint", "Programmed", "True", "Programmed")

	// Nothing is written without a change: several passes leave every version alone.
	versions := func() string {
		t.Helper()
		var out []string
		for _, get := range []func() (metav1.Object, error){
			func() (metav1.Object, error) {
				return e.cs.CoreV1().ServiceAccounts("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
			},
			func() (metav1.Object, error) {
				return e.cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
			},
			func() (metav1.Object, error) {
				return e.cs.CoreV1().Services("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
			},
			func() (metav1.Object, error) { return e.gateway("waypoint"), nil },
			func() (metav1.Object, error) { return e.classes.Get(ctx, cluster.WaypointClass, metav1.GetOptions{}) },
		} {
			o, err := get()
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, o.GetName()+"@"+o.GetResourceVersion())
		}
		return strings.Join(out, " ")
	}
	before := versions()
	for range 4 {
		w.Resync()
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(400 * time.Millisecond) // and a periodic pass
	if after := versions(); after != before {
		t.Fatalf("rewritten without a change:\n before %s\n after  %s", before, after)
	}

	// An operator scales the waypoint; the trust bundle changes: the bundle is written
	// (the pods roll), the scale kept.
	dep, err = e.cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dep.Spec.Replicas = ptrTo(int32(3))
	if _, err := e.cs.AppsV1().Deployments("bookinfo").Update(ctx, dep, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	root = []byte(testRoot + "-----BEGIN CERTIFICATE-----\nroot two\n-----END CERTIFICATE-----\n")
	w.Resync()
	e.eventually("the new trust bundle written", func() (bool, string) {
		dep, err = e.cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		return err == nil && dep.Spec.Template.Annotations["veilmesh.io/ca-root"] == string(root), fmt.Sprint(err)
	})
	if dep, err = e.cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{}); err != nil || *dep.Spec.Replicas != 3 {
		t.Fatalf("replicas %v (%v): the operator's scale is lost", dep.Spec.Replicas, err)
	}

	// A Deployment deleted by hand is made again.
	if err := e.cs.AppsV1().Deployments("bookinfo").Delete(ctx, "waypoint", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.eventually("the Deployment made again", func() (bool, string) {
		d, err := e.cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		return err == nil && d.UID != dep.UID, fmt.Sprint(err)
	})

	// Deleting the Gateway deletes what was made for it.
	if err := e.gateways.Namespace("bookinfo").Delete(ctx, "waypoint", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.eventually("everything made for the Gateway deleted", func() (bool, string) {
		var left []string
		if _, err := e.cs.CoreV1().ServiceAccounts("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			left = append(left, "ServiceAccount")
		}
		if _, err := e.cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			left = append(left, "Deployment")
		}
		if _, err := e.cs.CoreV1().Services("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			left = append(left, "Service")
		}
		return len(left) == 0, fmt.Sprint("left: ", left)
	})
}

// What the controller must not or cannot deploy: a Gateway whose ServiceAccount name is
// taken by another object (left alone; the Gateway says why), Gateways it cannot serve
// (Accepted=False naming the field; nothing deployed), a Gateway of another class (not
// touched). An object made for an earlier Gateway of the same name is taken over, and a
// waypoint whose Gateway turns invalid is removed.
func TestWaypointsRefuses(t *testing.T) {
	e := newWaypointEnv(t)
	ctx := context.Background()
	// An application's account, named like the Gateway about to be made.
	foreign, err := e.cs.CoreV1().ServiceAccounts("bookinfo").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "reviews"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// What an earlier Gateway "adopted" left (deleted while no controller ran).
	orphan, err := e.cs.CoreV1().ServiceAccounts("bookinfo").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "adopted",
		Labels: map[string]string{managedByLabel: managedBy, cluster.GatewayNameLabel: "adopted"},
		OwnerReferences: []metav1.OwnerReference{{APIVersion: "gateway.networking.k8s.io/v1", Kind: "Gateway", Name: "adopted",
			UID: types.UID("4c1f2a3e-0000-4000-8000-000000000001"), Controller: ptrTo(true)}}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.createGateway("reviews", cluster.WaypointClass, nil, "mesh/15008/HBONE")
	e.createGateway("none", cluster.WaypointClass, nil, "mesh/15008/HBONE")
	e.createGateway("http", cluster.WaypointClass, nil, "mesh/15008/HBONE", "web/80/HTTP")
	e.createGateway("badfor", cluster.WaypointClass, map[string]any{cluster.WaypointForLabel: "everything"}, "mesh/15008/HBONE")
	e.createGateway("ingress", "other-class", nil, "web/80/HTTP")
	adopted := e.createGateway("adopted", cluster.WaypointClass, nil, "mesh/15008/HBONE")
	e.run(&Waypoints{})

	msg := e.waitCondition("reviews", "Programmed", "False", "Invalid")
	if !strings.Contains(msg, "ServiceAccount bookinfo/reviews exists and was not made for this Gateway") {
		t.Errorf("Programmed message %q", msg)
	}
	for name, want := range map[string]struct{ reason, field string }{
		"none":   {"Invalid", "metadata.name: a waypoint cannot be called none"},
		"http":   {"ListenersNotValid", "spec.listeners[1]: protocol HTTP on port 80"},
		"badfor": {"Invalid", `metadata.labels[istio.io/waypoint-for]: "everything"`},
	} {
		if msg := e.waitCondition(name, "Accepted", "False", want.reason); !strings.Contains(msg, want.field) {
			t.Errorf("%s: Accepted message %q, want it to name %q", name, msg, want.field)
		}
	}
	e.eventually("the orphan taken over", func() (bool, string) {
		sa, err := e.cs.CoreV1().ServiceAccounts("bookinfo").Get(ctx, "adopted", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		ref := metav1.GetControllerOf(sa)
		return sa.UID == orphan.UID && ref != nil && ref.UID == adopted.GetUID(), fmt.Sprintf("%+v", ref)
	})
	e.eventually("the taken-over waypoint deployed", func() (bool, string) {
		_, err := e.cs.AppsV1().Deployments("bookinfo").Get(ctx, "adopted", metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	})

	// Nothing deployed for the others; the application's account untouched; the other
	// class's Gateway has no status from veil.
	deps, err := e.cs.AppsV1().Deployments("bookinfo").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range deps.Items {
		if d.Name != "adopted" {
			t.Errorf("Deployment %s deployed", d.Name)
		}
	}
	if sa, err := e.cs.CoreV1().ServiceAccounts("bookinfo").Get(ctx, "reviews", metav1.GetOptions{}); err != nil || sa.ResourceVersion != foreign.ResourceVersion {
		t.Errorf("the application's ServiceAccount was changed (%v)", err)
	}
	if s, r, _ := conditionOf(e.gateway("ingress"), "Accepted"); r != "Pending" {
		t.Errorf("a Gateway of another class: Accepted=%s (%s), want the API server's default (Pending)", s, r)
	}

	// The adopted waypoint's Gateway turns invalid: what was made for it goes.
	gw := e.gateway("adopted")
	if err := unstructured.SetNestedSlice(gw.Object, []any{map[string]any{"name": "web", "port": int64(8080), "protocol": "HTTP"}}, "spec", "listeners"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.gateways.Namespace("bookinfo").Update(ctx, gw, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitCondition("adopted", "Accepted", "False", "ListenersNotValid")
	e.eventually("the invalid waypoint removed", func() (bool, string) {
		_, err := e.cs.AppsV1().Deployments("bookinfo").Get(ctx, "adopted", metav1.GetOptions{})
		_, err2 := e.cs.CoreV1().ServiceAccounts("bookinfo").Get(ctx, "adopted", metav1.GetOptions{})
		return apierrors.IsNotFound(err) && apierrors.IsNotFound(err2), fmt.Sprint(err, err2)
	})
	if _, err := e.cs.CoreV1().ServiceAccounts("bookinfo").Get(ctx, "reviews", metav1.GetOptions{}); err != nil {
		t.Errorf("the application's ServiceAccount: %v", err)
	}
}

// When GatewayClass istio-waypoint is Istio's (istio.io/mesh-controller), istiod deploys
// the waypoints: veil deploys nothing and writes no status. A controller that finds the
// class gone creates it as veil's and deploys; one that finds it Istio's again removes
// what was deployed.
func TestWaypointsIstioClass(t *testing.T) {
	e := newWaypointEnv(t)
	ctx := context.Background()
	istioClass := func() {
		t.Helper()
		if err := e.classes.Delete(ctx, cluster.WaypointClass, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
		if _, err := e.classes.Create(ctx, &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
			"metadata": map[string]any{"name": cluster.WaypointClass},
			"spec":     map[string]any{"controllerName": IstioWaypointControllerName},
		}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	deployment := func() error {
		_, err := e.cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		return err
	}
	istioClass()
	e.createGateway("waypoint", cluster.WaypointClass, nil, "mesh/15008/HBONE")
	stop := e.run(&Waypoints{})
	e.eventually("the class seen as Istio's", func() (bool, string) {
		return strings.Contains(e.logs.String(), "is Istio's"), ""
	})
	time.Sleep(time.Second) // a few passes
	for _, err := range []error{
		func() error {
			_, err := e.cs.CoreV1().ServiceAccounts("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
			return err
		}(),
		deployment(),
		func() error {
			_, err := e.cs.CoreV1().Services("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
			return err
		}(),
	} {
		if !apierrors.IsNotFound(err) {
			t.Errorf("deployed under Istio's class (%v)", err)
		}
	}
	if s, r, _ := conditionOf(e.gateway("waypoint"), "Accepted"); r != "Pending" {
		t.Errorf("status written under Istio's class: Accepted=%s (%s), want the API server's default (Pending)", s, r)
	}
	gc, err := e.classes.Get(ctx, cluster.WaypointClass, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s, _, _ := conditionOf(gc, "Accepted"); s == "True" {
		t.Errorf("Istio's GatewayClass accepted by veil")
	}
	stop()

	// Istio uninstalled with its class: the next controller makes the class veil's.
	if err := e.classes.Delete(ctx, cluster.WaypointClass, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	stop = e.run(&Waypoints{})
	e.eventually("deployed once the class is veil's", func() (bool, string) {
		err := deployment()
		return err == nil, fmt.Sprint(err)
	})
	stop()

	// Istio installed again (its class replaces veil's): the next controller removes the
	// waypoint.
	istioClass()
	e.run(&Waypoints{})
	e.eventually("removed once the class is Istio's", func() (bool, string) {
		err := deployment()
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
}

// Settings the controller cannot deploy waypoints with are refused, naming the field.
func TestWaypointsValidate(t *testing.T) {
	good := func() *Waypoints {
		return &Waypoints{Config: &rest.Config{}, Image: "veil/veil-waypoint:1", CAAddr: "veil-controller.veil-system.svc:15012",
			Roots: func() []byte { return []byte(testRoot) }}
	}
	if err := good().Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		change func(*Waypoints)
		want   string
	}{
		{"no image", func(w *Waypoints) { w.Image = "" }, "Image: required"},
		{"bad pull policy", func(w *Waypoints) { w.PullPolicy = "Sometimes" }, `PullPolicy "Sometimes"`},
		{"CA address without a port", func(w *Waypoints) { w.CAAddr = "veil-controller" }, `CAAddr "veil-controller": want host:port`},
		{"no trust bundle", func(w *Waypoints) { w.Roots = nil }, "Roots: required"},
		{"bad placement", func(w *Waypoints) { w.PolicyPlacement = "sidecar" }, `PolicyPlacement "sidecar": want veil or istio`},
		{"no API server", func(w *Waypoints) { w.Config = nil }, "Config: required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := good()
			tc.change(w)
			err := w.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want it to say %q", err, tc.want)
			}
			if err := w.Run(context.Background()); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Run: %v", err)
			}
		})
	}
}
