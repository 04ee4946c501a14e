package controller

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/api"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/internal/kubetest"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
)

// watchConfigs runs src and returns a function that waits for a config satisfying ok.
func watchConfigs(t *testing.T, src Source) func(what string, ok func(*Config) bool) *Config {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan *Config, 1000)
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, func(c *Config) { ch <- c }) }()
	t.Cleanup(func() { cancel(); <-done })
	var last *Config
	return func(what string, ok func(*Config) bool) *Config {
		t.Helper()
		if last != nil && ok(last) {
			return last
		}
		deadline := time.After(60 * time.Second)
		for {
			select {
			case c := <-ch:
				last = c
				if ok(c) {
					return c
				}
			case <-deadline:
				t.Fatalf("no config with %s (last: %d pods, %d services, %d policies)", what, len(last.Cluster.Pods), len(last.Cluster.Services), len(last.Policies))
			}
		}
	}
}

func hasPod(name, ip string) func(*Config) bool {
	return func(c *Config) bool {
		for _, p := range c.Cluster.Pods {
			if p.Name == name && len(p.IPs) > 0 && p.IPs[0].String() == ip {
				return true
			}
		}
		return false
	}
}

func noPod(name string) func(*Config) bool {
	return func(c *Config) bool {
		for _, p := range c.Cluster.Pods {
			if p.Name == name {
				return false
			}
		}
		return true
	}
}

// The Kubernetes source against a real API server: objects created, updated and deleted
// through the API reach the config; finished pods drop out; after an API server restart
// the informers relist and changes keep coming.
func TestKubeSourceFollowsTheAPIServer(t *testing.T) {
	kc := kubetest.Start(t)
	kc.InstallIstioCRDs(t)
	cs := kubernetes.NewForConfigOrDie(kc.Config)
	ctx := context.Background()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bookinfo",
		Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// No controller manager: the namespace's default service account is made by hand.
	if _, err := cs.CoreV1().ServiceAccounts("bookinfo").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	newPod := func(name, node, ip string) {
		t.Helper()
		p, err := cs.CoreV1().Pods("bookinfo").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": "reviews"}},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: "default",
				Containers: []corev1.Container{{Name: "app", Image: "none", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 9080}}}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.Status.Phase = corev1.PodRunning
		p.Status.PodIP, p.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
		p.Status.HostIP = "10.0.0.2"
		if _, err := cs.CoreV1().Pods("bookinfo").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	newPod("reviews-1", "node-2", "10.1.2.10")
	if _, err := cs.CoreV1().Services("bookinfo").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "reviews"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "reviews"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 9080}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ready := true
	port := int32(6443)
	if _, err := cs.DiscoveryV1().EndpointSlices("default").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "kubernetes-x", Labels: map[string]string{"kubernetes.io/service-name": "kubernetes"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.99.0.250"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("https"), Port: &port}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	policyFile := filepath.Join(t.TempDir(), "strict.yaml")
	writeFile(t, policyFile, `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bookinfo}
spec: {mtls: {mode: STRICT}}
`)
	kc.Kubectl(t, "apply", "-f", policyFile)

	wait := watchConfigs(t, &KubeSource{Config: kc.Config, Settle: 20 * time.Millisecond})
	c := wait("the cluster as created", func(c *Config) bool {
		return hasPod("reviews-1", "10.1.2.10")(c) && len(c.Policies) == 1 && len(c.Cluster.EndpointSlices) >= 1 &&
			c.Cluster.Namespaces["bookinfo"] != nil
	})
	var svc bool
	for _, s := range c.Cluster.Services {
		svc = svc || s.Namespace == "bookinfo" && s.Name == "reviews" && len(s.ClusterIPs) == 1
	}
	if !svc {
		t.Fatal("the Service reviews (with the ClusterIP the API server gave it) is not in the config")
	}
	if c.Policies[0].Kind.String() != "PeerAuthentication" {
		t.Fatalf("policy %v", c.Policies[0].Kind)
	}

	t.Run("updates and deletes reach the config, each with a newer generation", func(t *testing.T) {
		g0 := c.Generation
		if g0 == 0 {
			t.Fatal("a config from the API server has no generation")
		}
		newPod("reviews-2", "node-1", "10.1.1.10")
		c1 := wait("the second pod", hasPod("reviews-2", "10.1.1.10"))
		if err := cs.CoreV1().Pods("bookinfo").Delete(ctx, "reviews-2", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
			t.Fatal(err)
		}
		c2 := wait("the second pod deleted", noPod("reviews-2"))
		// A delete is a change too: a replica that has not seen it must rank below.
		if !(g0 < c1.Generation && c1.Generation < c2.Generation) {
			t.Fatalf("generations %d, %d, %d: want them growing with each change", g0, c1.Generation, c2.Generation)
		}
		kc.Kubectl(t, "delete", "-f", policyFile)
		wait("the policy deleted", func(c *Config) bool { return len(c.Policies) == 0 })
	})
	t.Run("a finished pod is no workload", func(t *testing.T) {
		p, err := cs.CoreV1().Pods("bookinfo").Get(ctx, "reviews-1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.Status.Phase = corev1.PodSucceeded
		if _, err := cs.CoreV1().Pods("bookinfo").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		wait("the finished pod gone", noPod("reviews-1"))
	})
	t.Run("informers relist after an API server restart", func(t *testing.T) {
		kc.Restart(t)
		newPod("after-restart", "node-1", "10.1.1.20")
		wait("a pod created after the restart", hasPod("after-restart", "10.1.1.20"))
	})
}

func ptr[T any](v T) *T { return &v }

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// gatewayIn returns the Gateway ns/name of c, or nil.
func gatewayIn(c *Config, ns, name string) *cluster.Gateway {
	for _, g := range c.Cluster.Gateways {
		if g.Namespace == ns && g.Name == name {
			return g
		}
	}
	return nil
}

// hasWaypoint is a config with the Gateway bookinfo/waypoint listening on port.
func hasWaypoint(port uint16) func(*Config) bool {
	return func(c *Config) bool {
		g := gatewayIn(c, "bookinfo", "waypoint")
		return g != nil && len(g.Listeners) == 1 && g.Listeners[0].Port == port
	}
}

// installGatewayCRDs installs the Gateway API CRDs the chart ships (GatewayClass, Gateway).
func installGatewayCRDs(t *testing.T, kc *kubetest.Cluster) {
	t.Helper()
	dir := filepath.Join("..", "deploy", "helm", "veil", "files", "crds")
	kc.Kubectl(t, "apply", "--server-side", "-f", filepath.Join(dir, "gatewayclasses.gateway.networking.k8s.io.yaml"),
		"-f", filepath.Join(dir, "gateways.gateway.networking.k8s.io.yaml"))
	kc.Kubectl(t, "wait", "--for", "condition=established", "--timeout", "60s",
		"crd/gatewayclasses.gateway.networking.k8s.io", "crd/gateways.gateway.networking.k8s.io")
}

// Gateway API Gateways (waypoints) against a real API server. Without their CRD the
// source serves the rest, and says once that Gateways are not watched; when the CRD is
// installed it picks them up without a restart. A source started with the CRD in place
// has them in its first config. Changes and deletes follow; a Gateway that turns bad keeps
// its last good version; what is served decodes as an agent decodes it.
func TestKubeSourceGateways(t *testing.T) {
	kc := kubetest.Start(t)
	kc.InstallIstioCRDs(t)
	cs := kubernetes.NewForConfigOrDie(kc.Config)
	gateways := dynamic.NewForConfigOrDie(kc.Config).Resource(GatewayGVR).Namespace("bookinfo")
	ctx := context.Background()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bookinfo"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Services("bookinfo").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "reviews"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 9080}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	logs := &syncBuffer{}
	waitA := watchConfigs(t, &KubeSource{Config: kc.Config, Settle: 20 * time.Millisecond, GatewayRecheck: 100 * time.Millisecond,
		Log: slog.New(slog.NewTextHandler(logs, nil))})
	c := waitA("the Service, without the Gateway CRD", func(c *Config) bool { return len(c.Cluster.Services) > 0 })
	if len(c.Cluster.Gateways) != 0 {
		t.Fatalf("gateways %v without their CRD", c.Cluster.Gateways)
	}
	time.Sleep(350 * time.Millisecond) // a few rechecks
	if n := strings.Count(logs.String(), "Gateways (gateway.networking.k8s.io/v1) are not watched"); n != 1 {
		t.Fatalf("said %d times that Gateways are not watched, want once:\n%s", n, logs)
	}

	installGatewayCRDs(t, kc)
	gw := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "gateway.networking.k8s.io/v1",
		"kind":       "Gateway",
		"metadata":   map[string]any{"name": "waypoint", "labels": map[string]any{"istio.io/waypoint-for": "service"}},
		"spec": map[string]any{"gatewayClassName": "istio-waypoint",
			"listeners": []any{map[string]any{"name": "mesh", "port": int64(15008), "protocol": "HBONE"}}},
	}}
	gw, err := gateways.Create(ctx, gw, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	setAddresses := func(addrs ...map[string]any) *unstructured.Unstructured {
		t.Helper()
		list := make([]any, len(addrs))
		for i, a := range addrs {
			list[i] = a
		}
		// Retried on a conflict: the source only reads, but the test's own writes race.
		for {
			cur, err := gateways.Get(ctx, "waypoint", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := unstructured.SetNestedSlice(cur.Object, list, "status", "addresses"); err != nil {
				t.Fatal(err)
			}
			cur, err = gateways.UpdateStatus(ctx, cur, metav1.UpdateOptions{})
			if apierrors.IsConflict(err) {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			return cur
		}
	}
	vip := map[string]any{"type": "IPAddress", "value": "10.96.0.20"}
	host := map[string]any{"type": "Hostname", "value": "waypoint.bookinfo.svc.cluster.local"}
	setAddresses(vip, host)
	want := &cluster.Gateway{Namespace: "bookinfo", Name: "waypoint", ClassName: cluster.WaypointClass,
		Listeners: []cluster.GatewayListener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
		Addresses: []netip.Addr{netip.MustParseAddr("10.96.0.20")}, Hostnames: []string{"waypoint.bookinfo.svc.cluster.local"},
		Labels: map[string]string{"istio.io/waypoint-for": "service"}}
	complete := func(c *Config) bool {
		g := gatewayIn(c, "bookinfo", "waypoint")
		return g != nil && len(g.Addresses) == 1 && len(g.Hostnames) == 1
	}
	c = waitA("the Gateway, once its CRD is installed", complete)
	got := *gatewayIn(c, "bookinfo", "waypoint")
	if got.Source != "kube:Gateway/bookinfo/waypoint#1" {
		t.Errorf("source %q", got.Source)
	}
	if got.Source = ""; !reflect.DeepEqual(&got, want) {
		t.Fatalf("gateway\n got %+v\nwant %+v", &got, want)
	}
	if !strings.Contains(logs.String(), "the API server serves Gateways now") {
		t.Fatalf("no word of Gateways being watched now:\n%s", logs)
	}

	// A source started with the CRD in place: its very first config has the Gateway.
	waitB := watchConfigs(t, &KubeSource{Config: kc.Config, Settle: 20 * time.Millisecond})
	if first := waitB("a first config", func(*Config) bool { return true }); !complete(first) {
		t.Fatalf("first config of a source started with the CRD installed: gateways %+v", first.Cluster.Gateways)
	}

	t.Run("served as an agent decodes it", func(t *testing.T) {
		entries, errs := resources(c)
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		e := entries[api.Key{Kind: api.Kind_KIND_GATEWAY, Namespace: "bookinfo", Name: "waypoint"}]
		if e == nil {
			t.Fatal("no GATEWAY bookinfo/waypoint resource")
		}
		var wire api.Resource
		if err := proto.Unmarshal(e.enc, &wire); err != nil {
			t.Fatal(err)
		}
		_, d, err := wire.Decode()
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(d.Gateway, gatewayIn(c, "bookinfo", "waypoint")) {
			t.Fatalf("agent decodes %+v, want %+v", d.Gateway, gatewayIn(c, "bookinfo", "waypoint"))
		}
	})
	t.Run("a listener port changed, and a bad status kept at its last good version", func(t *testing.T) {
		cur, err := gateways.Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := unstructured.SetNestedSlice(cur.Object, []any{map[string]any{"name": "mesh", "port": int64(15009), "protocol": "HBONE"}}, "spec", "listeners"); err != nil {
			t.Fatal(err)
		}
		if _, err := gateways.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		g0 := c.Generation
		c1 := waitA("the new listener port", hasWaypoint(15009))
		waitB("the new listener port", hasWaypoint(15009))
		if c1.Generation <= g0 {
			t.Fatalf("generation %d after %d", c1.Generation, g0)
		}
		// 0.0.0.0 passes the CRD's validation (an IPv4 address), not veil's.
		bad := setAddresses(map[string]any{"type": "IPAddress", "value": "0.0.0.0"})
		rv, _ := strconv.ParseUint(bad.GetResourceVersion(), 10, 64)
		c2 := waitA("a config after the bad status", func(c *Config) bool { return c.Generation >= rv })
		if g := gatewayIn(c2, "bookinfo", "waypoint"); g == nil || len(g.Addresses) != 1 || g.Addresses[0] != want.Addresses[0] || g.Listeners[0].Port != 15009 {
			t.Fatalf("a Gateway gone bad: %+v; want its last good version", g)
		}
		setAddresses(vip)
		waitA("the fixed status", func(c *Config) bool {
			g := gatewayIn(c, "bookinfo", "waypoint")
			return g != nil && len(g.Addresses) == 1 && len(g.Hostnames) == 0
		})
	})
	t.Run("deleted", func(t *testing.T) {
		if err := gateways.Delete(ctx, "waypoint", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		gone := func(c *Config) bool { return gatewayIn(c, "bookinfo", "waypoint") == nil }
		waitA("the Gateway deleted", gone)
		waitB("the Gateway deleted", gone)
	})
}
