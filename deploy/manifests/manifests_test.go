// Package manifests tests deploy/manifests/veil.yaml, which deploy/helm/render renders
// from the Helm chart (its own tests check the chart's shape, and that this file is what
// the chart renders), against a real API server: it applies, it grants what the code
// uses, and the code uses all it grants.
package manifests

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/veilmesh/veil/internal/kubetest"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"
)

// objects are the RBAC objects and workloads of veil.yaml, decoded.
type objects struct {
	clusterRoles        map[string]rbacv1.ClusterRole
	roles               map[string]rbacv1.Role // by namespace/name
	clusterRoleBindings []rbacv1.ClusterRoleBinding
	roleBindings        []rbacv1.RoleBinding
	deployments         map[string]appsv1.Deployment
	kinds               map[string]int
}

var separator = regexp.MustCompile(`(?m)^---[ \t]*$`)

func load(t *testing.T) ([]byte, *objects) {
	t.Helper()
	data, err := os.ReadFile("veil.yaml")
	if err != nil {
		t.Fatal(err)
	}
	o := &objects{clusterRoles: map[string]rbacv1.ClusterRole{}, roles: map[string]rbacv1.Role{},
		deployments: map[string]appsv1.Deployment{}, kinds: map[string]int{}}
	for _, d := range separator.Split(string(data), -1) {
		var tm struct{ Kind string }
		if err := yaml.Unmarshal([]byte(d), &tm); err != nil {
			t.Fatal(err)
		}
		if tm.Kind == "" {
			continue // the header's comments
		}
		o.kinds[tm.Kind]++
		var into any
		var keep func()
		switch tm.Kind {
		case "ClusterRole":
			var r rbacv1.ClusterRole
			into, keep = &r, func() { o.clusterRoles[r.Name] = r }
		case "Role":
			var r rbacv1.Role
			into, keep = &r, func() { o.roles[r.Namespace+"/"+r.Name] = r }
		case "ClusterRoleBinding":
			var b rbacv1.ClusterRoleBinding
			into, keep = &b, func() { o.clusterRoleBindings = append(o.clusterRoleBindings, b) }
		case "RoleBinding":
			var b rbacv1.RoleBinding
			into, keep = &b, func() { o.roleBindings = append(o.roleBindings, b) }
		case "Deployment":
			var dep appsv1.Deployment
			into, keep = &dep, func() { o.deployments[dep.Name] = dep }
		default:
			continue
		}
		if err := yaml.UnmarshalStrict([]byte(d), into); err != nil {
			t.Fatalf("%s: %v", tm.Kind, err)
		}
		keep()
	}
	return data, o
}

// The manifests apply to a real API server (server-side dry run: every object passes the
// API server's validation and defaulting, then for real), the DaemonSet the API server
// keeps is shaped as DESIGN.md says, and the service accounts may do what they need.
func TestManifestsApplyServerSide(t *testing.T) {
	_, objs := load(t)
	for kind, want := range map[string]int{"Namespace": 1, "DaemonSet": 1, "Deployment": 1, "Service": 1, "PodDisruptionBudget": 1,
		"ServiceAccount": 2, "ClusterRole": 2, "ClusterRoleBinding": 2, "Role": 2, "RoleBinding": 2} {
		if objs.kinds[kind] != want {
			t.Errorf("%d %s objects, want %d", objs.kinds[kind], kind, want)
		}
	}
	if objs.kinds["CustomResourceDefinition"] < 3 {
		t.Errorf("%d CRDs", objs.kinds["CustomResourceDefinition"])
	}
	kc := kubetest.Start(t)
	// A server-side dry run validates every object; objects in veil-system need the
	// namespace to exist first.
	kc.Kubectl(t, "create", "namespace", "veil-system")
	kc.Kubectl(t, "apply", "--server-side", "-f", "veil.yaml", "--dry-run=server")
	out := kc.Kubectl(t, "apply", "--server-side", "-f", "veil.yaml")
	for _, want := range []string{"daemonset.apps/veil-agent", "deployment.apps/veil-controller", "poddisruptionbudget.policy/veil-controller",
		"clusterrole.rbac.authorization.k8s.io/veil-controller", "clusterrole.rbac.authorization.k8s.io/veil-agent", "role.rbac.authorization.k8s.io/veil-controller",
		"customresourcedefinition.apiextensions.k8s.io/authorizationpolicies.security.istio.io",
		"customresourcedefinition.apiextensions.k8s.io/httproutes.gateway.networking.k8s.io"} {
		if !strings.Contains(out, want) {
			t.Errorf("apply did not create %s:\n%s", want, out)
		}
	}
	// What the API server keeps, after its defaulting.
	var ds appsv1.DaemonSet
	if err := json.Unmarshal([]byte(kc.Kubectl(t, "get", "daemonset", "-n", "veil-system", "veil-agent", "-o", "json")), &ds); err != nil {
		t.Fatal(err)
	}
	spec := ds.Spec.Template.Spec
	c := spec.Containers[0]
	// No ports: on a host-network pod they become host ports, and the surge pod of a
	// rolling update would never schedule.
	if len(c.Ports) != 0 {
		t.Errorf("the agent declares ports %+v", c.Ports)
	}
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	if ru == nil || ru.MaxSurge == nil || ru.MaxSurge.String() != "1" || ru.MaxUnavailable == nil || ru.MaxUnavailable.String() != "0" {
		t.Errorf("rolling update %+v", ru)
	}
	if !spec.HostNetwork || !spec.HostPID || spec.PriorityClassName != "system-node-critical" {
		t.Errorf("hostNetwork %v hostPID %v priorityClassName %s", spec.HostNetwork, spec.HostPID, spec.PriorityClassName)
	}
	if sc := c.SecurityContext; sc == nil || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) ||
		!slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF", "PERFMON"}) {
		t.Errorf("security context %+v", sc)
	}
	// Each account may do what it needs, and no more.
	for _, c := range []struct {
		as, verb, resource, ns, want string
	}{
		{"veil-controller", "create", "tokenreviews.authentication.k8s.io", "", "yes"},
		{"veil-controller", "watch", "pods", "bookinfo", "yes"},
		{"veil-controller", "get", "pods", "bookinfo", "yes"},
		{"veil-controller", "list", "authorizationpolicies.security.istio.io", "bookinfo", "yes"},
		{"veil-controller", "watch", "gateways.gateway.networking.k8s.io", "bookinfo", "yes"},
		{"veil-controller", "list", "httproutes.gateway.networking.k8s.io", "bookinfo", "no"},
		{"veil-controller", "create", "secrets", "veil-system", "yes"},
		{"veil-controller", "get", "secrets/cacerts", "veil-system", "yes"},
		{"veil-controller", "get", "secrets/other", "veil-system", "no"},
		{"veil-controller", "list", "secrets", "veil-system", "no"},
		{"veil-controller", "update", "configmaps/veil-ca-root", "veil-system", "yes"},
		{"veil-controller", "update", "configmaps/other", "veil-system", "no"},
		{"veil-controller", "get", "secrets", "bookinfo", "no"},
		{"veil-controller", "delete", "pods", "bookinfo", "no"},
		{"veil-controller", "get", "namespaces", "", "no"},
		// Waypoints: what it deploys, but no ConfigMap outside its namespace.
		{"veil-controller", "create", "deployments.apps", "bookinfo", "yes"},
		{"veil-controller", "delete", "serviceaccounts", "bookinfo", "yes"},
		{"veil-controller", "update", "gateways.gateway.networking.k8s.io", "bookinfo", "no"},
		{"veil-controller", "create", "configmaps", "bookinfo", "no"},
		{"veil-agent", "get", "pods", "bookinfo", "yes"},
		{"veil-agent", "get", "daemonsets.apps/veil-agent", "veil-system", "yes"},
		{"veil-agent", "get", "daemonsets.apps/other", "veil-system", "no"},
		{"veil-agent", "get", "namespaces", "", "yes"},
		{"veil-agent", "list", "pods", "bookinfo", "no"},
		{"veil-agent", "get", "secrets", "veil-system", "no"},
		{"veil-agent", "create", "tokenreviews.authentication.k8s.io", "", "no"},
	} {
		args := []string{"auth", "can-i", c.verb, c.resource, "--as", "system:serviceaccount:veil-system:" + c.as}
		if c.ns != "" {
			args = append(args, "-n", c.ns)
		}
		out, _ := kc.Run(args...)
		got := strings.TrimSpace(out)
		if got != c.want {
			t.Errorf("can %s %s %s in %q: %s, want %s", c.as, c.verb, c.resource, c.ns, got, c.want)
		}
	}
	// deploy/kind's Bookinfo (which this machine cannot run: no Docker engine) is valid.
	out = kc.Kubectl(t, "apply", "--server-side", "-f", "../kind/bookinfo.yaml")
	for _, want := range []string{"namespace/bookinfo", "namespace/legacy", "pod/productpage", "pod/frontend", "pod/sleep", "pod/meshed-sleep",
		"pod/reviews", "pod/ratings", "service/productpage", "service/reviews", "service/ratings"} {
		if !strings.Contains(out, want) {
			t.Errorf("deploy/kind/bookinfo.yaml did not create %s:\n%s", want, out)
		}
	}
}
