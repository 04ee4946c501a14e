package controller

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/veilmesh/veil/internal/kubetest"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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
