package manifests

import (
	"os"
	"strings"
	"testing"

	"github.com/veilmesh/veil/internal/kubetest"
)

// The manifests apply to a real API server (server-side dry run: every object passes the
// API server's validation and defaulting), and the DaemonSet is shaped as DESIGN.md says.
func TestManifestsApplyServerSide(t *testing.T) {
	data, err := os.ReadFile("veil.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"priorityClassName: system-node-critical", "maxSurge: 1, maxUnavailable: 0", "hostNetwork: true",
		"audience: istio-ca", "mountPropagation: HostToContainer", "terminationGracePeriodSeconds: 30", "fieldPath: spec.nodeName"} {
		if !strings.Contains(string(data), want) {
			t.Errorf("veil.yaml lacks %q", want)
		}
	}
	kc := kubetest.Start(t)
	// A server-side dry run validates every object; objects in veil-system need the
	// namespace to exist first.
	kc.InstallIstioCRDs(t)
	kc.Kubectl(t, "create", "namespace", "veil-system")
	kc.Kubectl(t, "apply", "--server-side", "-f", "veil.yaml", "--dry-run=server")
	out := kc.Kubectl(t, "apply", "--server-side", "-f", "veil.yaml")
	for _, want := range []string{"daemonset.apps/veil-agent", "deployment.apps/veil-controller", "poddisruptionbudget.policy/veil-controller", "clusterrole.rbac.authorization.k8s.io/veil-controller"} {
		if !strings.Contains(out, want) {
			t.Errorf("apply did not create %s:\n%s", want, out)
		}
	}
	// The agent container declares no ports: on a host-network pod they become host
	// ports, and the surge pod of a rolling update would never schedule.
	ports := kc.Kubectl(t, "get", "daemonset", "-n", "veil-system", "veil-agent", "-o", "jsonpath={.spec.template.spec.containers[0].ports}")
	if strings.TrimSpace(ports) != "" {
		t.Fatalf("the agent declares ports %s", ports)
	}
	// The controller may do what it needs, and no more.
	for _, c := range []struct {
		verb, resource, ns, want string
	}{
		{"create", "tokenreviews.authentication.k8s.io", "", "yes"},
		{"watch", "pods", "bookinfo", "yes"},
		{"list", "authorizationpolicies.security.istio.io", "bookinfo", "yes"},
		{"create", "secrets", "veil-system", "yes"},
		{"get", "secrets", "bookinfo", "no"},
		{"delete", "pods", "bookinfo", "no"},
	} {
		args := []string{"auth", "can-i", c.verb, c.resource, "--as", "system:serviceaccount:veil-system:veil-controller"}
		if c.ns != "" {
			args = append(args, "-n", c.ns)
		}
		out, _ := kc.Run(args...)
		got := strings.TrimSpace(out)
		if got != c.want {
			t.Errorf("can the controller %s %s in %q: %s, want %s", c.verb, c.resource, c.ns, got, c.want)
		}
	}
}
