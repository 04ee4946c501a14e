package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chartutil"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"
)

const (
	repo     = "../../.."
	chartDir = "../veil"
)

// rendered is a rendering decoded into typed objects: each document strictly (a field
// the API does not have is an error, so a misspelt key in a template fails here).
type rendered struct {
	daemonSet    *appsv1.DaemonSet
	deployment   *appsv1.Deployment
	service      *corev1.Service
	pdb          *policyv1.PodDisruptionBudget
	accounts     []*corev1.ServiceAccount
	clusterRoles map[string]*rbacv1.ClusterRole
	roles        map[string]*rbacv1.Role
	crbs         []*rbacv1.ClusterRoleBinding
	rbs          []*rbacv1.RoleBinding
	crds         []*apiextv1.CustomResourceDefinition
	namespaces   []*corev1.Namespace
}

func decode(t *testing.T, manifest string) *rendered {
	t.Helper()
	r := &rendered{clusterRoles: map[string]*rbacv1.ClusterRole{}, roles: map[string]*rbacv1.Role{}}
	for _, d := range Documents(manifest) {
		var tm struct{ APIVersion, Kind string }
		if err := yaml.Unmarshal([]byte(d), &tm); err != nil {
			t.Fatalf("%v\n%s", err, d)
		}
		var into any
		var after func()
		switch tm.Kind {
		case "DaemonSet":
			if r.daemonSet != nil {
				t.Fatal("two DaemonSets")
			}
			r.daemonSet = &appsv1.DaemonSet{}
			into = r.daemonSet
		case "Deployment":
			if r.deployment != nil {
				t.Fatal("two Deployments")
			}
			r.deployment = &appsv1.Deployment{}
			into = r.deployment
		case "Service":
			r.service = &corev1.Service{}
			into = r.service
		case "PodDisruptionBudget":
			r.pdb = &policyv1.PodDisruptionBudget{}
			into = r.pdb
		case "ServiceAccount":
			o := &corev1.ServiceAccount{}
			r.accounts, into = append(r.accounts, o), o
		case "ClusterRole":
			o := &rbacv1.ClusterRole{}
			into, after = o, func() { r.clusterRoles[o.Name] = o }
		case "Role":
			o := &rbacv1.Role{}
			into, after = o, func() { r.roles[o.Name] = o }
		case "ClusterRoleBinding":
			o := &rbacv1.ClusterRoleBinding{}
			r.crbs, into = append(r.crbs, o), o
		case "RoleBinding":
			o := &rbacv1.RoleBinding{}
			r.rbs, into = append(r.rbs, o), o
		case "CustomResourceDefinition":
			o := &apiextv1.CustomResourceDefinition{}
			r.crds, into = append(r.crds, o), o
		case "Namespace":
			o := &corev1.Namespace{}
			r.namespaces, into = append(r.namespaces, o), o
		default:
			t.Fatalf("unexpected kind %s %s", tm.APIVersion, tm.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(d), into); err != nil {
			t.Fatalf("%s: %v", tm.Kind, err)
		}
		if after != nil {
			after()
		}
	}
	for what, missing := range map[string]bool{"DaemonSet": r.daemonSet == nil, "Deployment": r.deployment == nil,
		"Service": r.service == nil, "PodDisruptionBudget": r.pdb == nil} {
		if missing {
			t.Fatalf("no %s rendered", what)
		}
	}
	return r
}

func render(t *testing.T, namespace string, set ...string) *rendered {
	t.Helper()
	out, err := Render(chartDir, namespace, set...)
	if err != nil {
		t.Fatal(err)
	}
	return decode(t, out)
}

// pod is the agent's pod and its one container.
func (r *rendered) agent(t *testing.T) (*corev1.PodSpec, *corev1.Container) {
	t.Helper()
	spec := &r.daemonSet.Spec.Template.Spec
	if len(spec.Containers) != 1 || len(spec.InitContainers) != 0 {
		t.Fatalf("the agent's pod has %d containers and %d init containers, want 1 and 0", len(spec.Containers), len(spec.InitContainers))
	}
	return spec, &spec.Containers[0]
}

func (r *rendered) controller(t *testing.T) (*corev1.PodSpec, *corev1.Container) {
	t.Helper()
	spec := &r.deployment.Spec.Template.Spec
	if len(spec.Containers) != 1 {
		t.Fatalf("the controller's pod has %d containers", len(spec.Containers))
	}
	return spec, &spec.Containers[0]
}

// flag returns the value of --name=value in args, and whether it is there (once).
func argOf(t *testing.T, args []string, name string) (string, bool) {
	t.Helper()
	var vals []string
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			vals = append(vals, v)
		}
	}
	if len(vals) > 1 {
		t.Fatalf("--%s given %d times: %q", name, len(vals), args)
	}
	if len(vals) == 0 {
		return "", false
	}
	return vals[0], true
}

func wantFlag(t *testing.T, args []string, name, want string) {
	t.Helper()
	if got, ok := argOf(t, args, name); !ok || got != want {
		t.Errorf("--%s=%q (given: %v), want %q", name, got, ok, want)
	}
}

// mountOf returns the volume mount of path in c (the deepest that holds it) and its volume.
func mountOf(t *testing.T, spec *corev1.PodSpec, c *corev1.Container, path string) (*corev1.VolumeMount, *corev1.Volume) {
	t.Helper()
	var best *corev1.VolumeMount
	for i, m := range c.VolumeMounts {
		if (path == m.MountPath || strings.HasPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/")) && (best == nil || len(m.MountPath) > len(best.MountPath)) {
			best = &c.VolumeMounts[i]
		}
	}
	if best == nil {
		t.Fatalf("%s is on no volume of %s", path, c.Name)
	}
	for i, v := range spec.Volumes {
		if v.Name == best.Name {
			return best, &spec.Volumes[i]
		}
	}
	t.Fatalf("mount %s names no volume", best.Name)
	return nil, nil
}

func wantHostPath(t *testing.T, spec *corev1.PodSpec, c *corev1.Container, mountPath, hostPath string, typ corev1.HostPathType) *corev1.VolumeMount {
	t.Helper()
	m, v := mountOf(t, spec, c, mountPath)
	if m.MountPath != mountPath {
		t.Errorf("%s is mounted at %s, want its own mount", mountPath, m.MountPath)
	}
	if v.HostPath == nil || v.HostPath.Path != hostPath || v.HostPath.Type == nil || *v.HostPath.Type != typ {
		t.Errorf("volume %s (at %s) is %+v, want hostPath %s of type %s", v.Name, mountPath, v.VolumeSource, hostPath, typ)
	}
	return m
}

// The DaemonSet as DESIGN.md and issue 12 shape it, and the rest of what the default
// values render.
func TestChartDefaults(t *testing.T) {
	r := render(t, Namespace)
	ds := r.daemonSet
	if ds.Name != "veil-agent" || ds.Namespace != Namespace {
		t.Errorf("DaemonSet %s/%s", ds.Namespace, ds.Name)
	}
	us := ds.Spec.UpdateStrategy
	if us.Type != appsv1.RollingUpdateDaemonSetStrategyType || us.RollingUpdate == nil ||
		us.RollingUpdate.MaxSurge == nil || us.RollingUpdate.MaxSurge.String() != "1" ||
		us.RollingUpdate.MaxUnavailable == nil || us.RollingUpdate.MaxUnavailable.String() != "0" {
		t.Errorf("update strategy %+v, want RollingUpdate maxSurge 1 maxUnavailable 0", us)
	}
	spec, c := r.agent(t)
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q", spec.PriorityClassName)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0] != (corev1.Toleration{Operator: corev1.TolerationOpExists}) {
		t.Errorf("tolerations %+v, want every taint tolerated", spec.Tolerations)
	}
	if !spec.HostNetwork || !spec.HostPID || spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("hostNetwork %v, hostPID %v, dnsPolicy %s", spec.HostNetwork, spec.HostPID, spec.DNSPolicy)
	}
	if spec.TerminationGracePeriodSeconds == nil || *spec.TerminationGracePeriodSeconds != 30 {
		t.Errorf("terminationGracePeriodSeconds %v", spec.TerminationGracePeriodSeconds)
	}
	if spec.ServiceAccountName != "veil-agent" || spec.AutomountServiceAccountToken != nil && !*spec.AutomountServiceAccountToken {
		t.Errorf("service account %q, automount %v: the CNI plugin's kubeconfig needs the account's token", spec.ServiceAccountName, spec.AutomountServiceAccountToken)
	}
	if c.Image != "veil/veil-agent:dev" || c.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("image %s, %s", c.Image, c.ImagePullPolicy)
	}
	// No declared ports: on a host-network pod they become host ports, and the surge pod of a
	// rolling update could not schedule beside the old one.
	if len(c.Ports) != 0 {
		t.Errorf("the agent declares ports %+v", c.Ports)
	}
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil || sc.Privileged == nil || *sc.Privileged {
		t.Fatalf("security context %+v", sc)
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) ||
		!slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF", "PERFMON"}) {
		t.Errorf("capabilities %+v", sc.Capabilities)
	}
	if len(c.Env) != 1 || c.Env[0].Name != "NODE_NAME" || c.Env[0].ValueFrom == nil || c.Env[0].ValueFrom.FieldRef == nil ||
		c.Env[0].ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("env %+v, want NODE_NAME from spec.nodeName", c.Env)
	}
	wantFlag(t, c.Args, "node", "$(NODE_NAME)")
	p := c.ReadinessProbe
	if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz/ready" || p.HTTPGet.Port.IntValue() != 15021 {
		t.Errorf("readiness probe %+v, want GET :15021/healthz/ready", p)
	}
	if c.LivenessProbe != nil || c.StartupProbe != nil {
		t.Errorf("a liveness or startup probe would restart an agent that drains or waits for the controller")
	}
	wantFlag(t, c.Args, "drain-grace", "29s")
	wantFlag(t, c.Args, "ca-addr", "veil-controller.veil-system.svc:15012")
	wantFlag(t, c.Args, "trust-domain", "cluster.local")
	wantFlag(t, c.Args, "log-level", "info")

	// bpffs from the host, with propagation; the pins under it.
	bpf := wantHostPath(t, spec, c, "/sys/fs/bpf", "/sys/fs/bpf", corev1.HostPathDirectory)
	if bpf.MountPropagation == nil || *bpf.MountPropagation != corev1.MountPropagationHostToContainer {
		t.Errorf("bpffs propagation %v", bpf.MountPropagation)
	}
	pins, _ := argOf(t, c.Args, "pin-dir")
	if m, _ := mountOf(t, spec, c, pins); m.Name != bpf.Name {
		t.Errorf("--pin-dir %s is not on bpffs", pins)
	}
	// /var/run/veil from the host: the handover socket (old and new agents of a node meet
	// there) and the CNI socket the plugin, running on the host, connects to.
	run := wantHostPath(t, spec, c, "/var/run/veil", "/var/run/veil", corev1.HostPathDirectoryOrCreate)
	for _, f := range []string{"handover-dir", "cni-socket"} {
		v, ok := argOf(t, c.Args, f)
		if !ok {
			t.Errorf("no --%s", f)
			continue
		}
		if m, _ := mountOf(t, spec, c, v); m.Name != run.Name {
			t.Errorf("--%s %s is not under the host's /var/run/veil", f, v)
		}
	}
	wantFlag(t, c.Args, "cni-socket", "/var/run/veil/cni.sock")
	// The CNI directories of the host.
	wantFlag(t, c.Args, "cni-conf-dir", "/host/etc/cni/net.d")
	wantFlag(t, c.Args, "cni-bin-dir", "/host/opt/cni/bin")
	// The plugin, run by the runtime on the node, finds its kubeconfig by the node's path.
	wantFlag(t, c.Args, "cni-host-conf-dir", "/etc/cni/net.d")
	wantHostPath(t, spec, c, "/host/etc/cni/net.d", "/etc/cni/net.d", corev1.HostPathDirectoryOrCreate)
	wantHostPath(t, spec, c, "/host/opt/cni/bin", "/opt/cni/bin", corev1.HostPathDirectoryOrCreate)
	wantHostPath(t, spec, c, "/var/lib/veil", "/var/lib/veil", corev1.HostPathDirectoryOrCreate)
	// The projected token (audience istio-ca) the controller reviews.
	tok, _ := argOf(t, c.Args, "token-file")
	if m, v := mountOf(t, spec, c, tok); v.Projected == nil || len(v.Projected.Sources) != 1 || v.Projected.Sources[0].ServiceAccountToken == nil ||
		v.Projected.Sources[0].ServiceAccountToken.Audience != "istio-ca" || filepath.Join(m.MountPath, v.Projected.Sources[0].ServiceAccountToken.Path) != tok {
		t.Errorf("--token-file %s: volume %+v", tok, v.VolumeSource)
	}
	// The root the controller publishes.
	root, _ := argOf(t, c.Args, "ca-root")
	if m, v := mountOf(t, spec, c, root); v.ConfigMap == nil || v.ConfigMap.Name != "veil-ca-root" || filepath.Join(m.MountPath, "root-cert.pem") != root {
		t.Errorf("--ca-root %s: volume %+v", root, v.VolumeSource)
	}
	// No volume is the host's root.
	for _, v := range spec.Volumes {
		if v.HostPath != nil && (v.HostPath.Path == "/" || v.HostPath.Path == "") {
			t.Errorf("volume %s mounts the host's root", v.Name)
		}
	}

	// The controller.
	cspec, cc := r.controller(t)
	if *r.deployment.Spec.Replicas != 2 || cspec.ServiceAccountName != "veil-controller" {
		t.Errorf("controller: %d replicas, account %s", *r.deployment.Spec.Replicas, cspec.ServiceAccountName)
	}
	for name, want := range map[string]string{"kubeconfig": "in-cluster", "ca-secret": "veil-system/cacerts", "root-configmap": "veil-system/veil-ca-root",
		"agent-service-account": "veil-system/veil-agent", "listen": ":15012", "server-name": "veil-controller.veil-system.svc", "trust-domain": "cluster.local"} {
		wantFlag(t, cc.Args, name, want)
	}
	// The waypoints it deploys: their image, and the CA's address as the agents have it.
	for name, want := range map[string]string{"waypoint-image": "veil/veil-waypoint:dev", "waypoint-image-pull-policy": "IfNotPresent",
		"waypoint-ca-addr": "veil-controller.veil-system.svc:15012", "waypoint-policy-placement": "veil"} {
		wantFlag(t, cc.Args, name, want)
	}
	if agentAddr, _ := argOf(t, c.Args, "ca-addr"); !slices.Contains(cc.Args, "--waypoint-ca-addr="+agentAddr) {
		t.Errorf("the waypoints reach the CA elsewhere than the agents (%s)", agentAddr)
	}
	for _, g := range []struct{ group, resource, verb string }{{"apps", "deployments", "create"}, {"", "serviceaccounts", "delete"},
		{"gateway.networking.k8s.io", "gateways/status", "update"}, {"gateway.networking.k8s.io", "gatewayclasses", "create"}} {
		if !grants(r.clusterRoles["veil-controller"], g.group, g.resource, g.verb) {
			t.Errorf("the controller may not %s %s/%s, which deploying waypoints needs", g.verb, g.group, g.resource)
		}
	}
	if csc := cc.SecurityContext; csc == nil || csc.ReadOnlyRootFilesystem == nil || !*csc.ReadOnlyRootFilesystem || csc.RunAsNonRoot == nil || !*csc.RunAsNonRoot {
		t.Errorf("controller security context %+v", csc)
	}
	// A read-only root, so the temporary directory a generated root is written to is a volume.
	if _, v := mountOf(t, cspec, cc, "/tmp/veil-ca-1"); v.EmptyDir == nil {
		t.Errorf("/tmp is %+v, want an emptyDir", v.VolumeSource)
	}
	if len(r.service.Spec.Ports) != 1 || r.service.Spec.Ports[0].Port != 15012 || r.service.Spec.Selector["app"] != "veil-controller" {
		t.Errorf("service %+v", r.service.Spec)
	}
	if r.pdb.Spec.MinAvailable == nil || r.pdb.Spec.MinAvailable.String() != "1" {
		t.Errorf("PodDisruptionBudget %+v", r.pdb.Spec)
	}
	if ar := r.clusterRoles["veil-agent"]; ar == nil || len(ar.Rules) != 1 || !slices.Equal(ar.Rules[0].Verbs, []string{"get"}) ||
		!slices.Equal(ar.Rules[0].Resources, []string{"pods", "namespaces"}) {
		t.Errorf("agent ClusterRole %+v", ar)
	}
	if ar := r.roles["veil-agent"]; ar == nil || ar.Namespace != Namespace || len(ar.Rules) != 1 || !slices.Equal(ar.Rules[0].Verbs, []string{"get", "list", "watch"}) ||
		!slices.Equal(ar.Rules[0].Resources, []string{"daemonsets"}) || !slices.Equal(ar.Rules[0].ResourceNames, []string{ds.Name}) {
		t.Errorf("agent Role %+v: it may get and watch its own DaemonSet, nothing else", ar)
	}
	// The CRDs: Istio's security ones and the Gateway API's standard channel, kept on
	// uninstall.
	var names []string
	for _, crd := range r.crds {
		names = append(names, crd.Name)
		if crd.Annotations["helm.sh/resource-policy"] != "keep" {
			t.Errorf("CRD %s is not kept on uninstall", crd.Name)
		}
		if crd.Spec.Group == "gateway.networking.k8s.io" && (crd.Annotations["gateway.networking.k8s.io/channel"] != "standard" || crd.Annotations["gateway.networking.k8s.io/bundle-version"] != "v1.6.3") {
			t.Errorf("CRD %s: %v", crd.Name, crd.Annotations)
		}
	}
	for _, want := range []string{"peerauthentications.security.istio.io", "authorizationpolicies.security.istio.io", "requestauthentications.security.istio.io",
		"gatewayclasses.gateway.networking.k8s.io", "gateways.gateway.networking.k8s.io", "httproutes.gateway.networking.k8s.io", "referencegrants.gateway.networking.k8s.io"} {
		if !slices.Contains(names, want) {
			t.Errorf("CRD %s not rendered (have %v)", want, names)
		}
	}
	for _, n := range names {
		if strings.HasSuffix(n, ".istio.io") && !strings.HasSuffix(n, ".security.istio.io") {
			t.Errorf("CRD %s: only Istio's security CRDs are needed", n)
		}
	}
}

// Values other than the defaults reach the objects, and CNI and CRDs can be turned off.
func TestChartValues(t *testing.T) {
	r := render(t, "mesh",
		"images.agent.repository=registry.example/veil-agent", "images.agent.tag=v1.2.3", "images.agent.pullPolicy=Always",
		"images.controller.repository=registry.example/veil-controller", "images.controller.tag=1.0",
		"imagePullSecrets[0].name=regcred",
		"trustDomain=example.org", "logLevel=debug", "ca.secretName=plugged-in", "ca.rootConfigMap=mesh-root",
		"agent.extraArgs[0]=--uplink=eth1", "agent.extraArgs[1]=--capture-host",
		"agent.tolerations[0].key=dedicated", "agent.tolerations[0].operator=Equal", "agent.tolerations[0].value=mesh", "agent.tolerations[0].effect=NoSchedule",
		"agent.nodeSelector.pool=mesh", "agent.resources.limits.memory=256Mi", "agent.terminationGracePeriodSeconds=60",
		"controller.replicas=3", "controller.extraArgs[0]=--max-ttl=12h", "controller.resources.requests.cpu=250m",
		"images.waypoint.repository=registry.example/veil-waypoint", "images.waypoint.tag=2.0", "images.waypoint.pullPolicy=Always",
		"policyPlacement=istio", "allowWaypointBypass=true",
		"cni.confDir=/var/lib/rancher/k3s/agent/etc/cni/net.d", "cni.binDir=/home/kubernetes/bin",
		"crds.install=false")
	spec, c := r.agent(t)
	if c.Image != "registry.example/veil-agent:v1.2.3" || c.ImagePullPolicy != corev1.PullAlways {
		t.Errorf("agent image %s %s", c.Image, c.ImagePullPolicy)
	}
	if len(spec.ImagePullSecrets) != 1 || spec.ImagePullSecrets[0].Name != "regcred" {
		t.Errorf("agent imagePullSecrets %+v", spec.ImagePullSecrets)
	}
	wantFlag(t, c.Args, "trust-domain", "example.org")
	wantFlag(t, c.Args, "log-level", "debug")
	wantFlag(t, c.Args, "ca-addr", "veil-controller.mesh.svc:15012")
	wantFlag(t, c.Args, "ca-server-name", "veil-controller.mesh.svc")
	wantFlag(t, c.Args, "drain-grace", "59s")
	wantFlag(t, c.Args, "policy-placement", "istio")
	if !slices.Contains(c.Args, "--allow-waypoint-bypass") {
		t.Errorf("agent args lack --allow-waypoint-bypass: %q", c.Args)
	}
	if n := len(c.Args); n < 2 || c.Args[n-2] != "--uplink=eth1" || c.Args[n-1] != "--capture-host" {
		t.Errorf("extra args not last: %q", c.Args)
	}
	if *spec.TerminationGracePeriodSeconds != 60 {
		t.Errorf("grace %d", *spec.TerminationGracePeriodSeconds)
	}
	want := corev1.Toleration{Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "mesh", Effect: corev1.TaintEffectNoSchedule}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0] != want {
		t.Errorf("tolerations %+v, want only %+v", spec.Tolerations, want)
	}
	if spec.NodeSelector["pool"] != "mesh" {
		t.Errorf("nodeSelector %v", spec.NodeSelector)
	}
	if got := c.Resources.Limits[corev1.ResourceMemory]; got.Cmp(resource.MustParse("256Mi")) != 0 {
		t.Errorf("agent memory limit %s", got.String())
	}
	wantHostPath(t, spec, c, "/host/etc/cni/net.d", "/var/lib/rancher/k3s/agent/etc/cni/net.d", corev1.HostPathDirectoryOrCreate)
	wantFlag(t, c.Args, "cni-host-conf-dir", "/var/lib/rancher/k3s/agent/etc/cni/net.d")
	wantHostPath(t, spec, c, "/host/opt/cni/bin", "/home/kubernetes/bin", corev1.HostPathDirectoryOrCreate)
	if _, v := mountOf(t, spec, c, "/etc/veil/ca/root-cert.pem"); v.ConfigMap == nil || v.ConfigMap.Name != "mesh-root" {
		t.Errorf("root volume %+v", v.VolumeSource)
	}

	cspec, cc := r.controller(t)
	if cc.Image != "registry.example/veil-controller:1.0" || *r.deployment.Spec.Replicas != 3 || len(cspec.ImagePullSecrets) != 1 {
		t.Errorf("controller image %s, %d replicas, pull secrets %v", cc.Image, *r.deployment.Spec.Replicas, cspec.ImagePullSecrets)
	}
	for name, want := range map[string]string{"ca-secret": "mesh/plugged-in", "root-configmap": "mesh/mesh-root", "agent-service-account": "mesh/veil-agent",
		"trust-domain": "example.org", "log-level": "debug", "server-name": "veil-controller.mesh.svc", "max-ttl": "12h",
		"waypoint-image": "registry.example/veil-waypoint:2.0", "waypoint-image-pull-policy": "Always", "waypoint-ca-addr": "veil-controller.mesh.svc:15012",
		"waypoint-policy-placement": "istio"} {
		wantFlag(t, cc.Args, name, want)
	}
	if got := cc.Resources.Requests[corev1.ResourceCPU]; got.Cmp(resource.MustParse("250m")) != 0 {
		t.Errorf("controller cpu request %s", got.String())
	}
	// The Role names the Secret and the ConfigMap the values name.
	role := r.roles["veil-controller"]
	if role == nil || role.Namespace != "mesh" {
		t.Fatalf("controller Role %+v", role)
	}
	var named []string
	for _, rule := range role.Rules {
		if len(rule.Resources) != 1 || rule.Resources[0] != "secrets" && rule.Resources[0] != "configmaps" {
			t.Errorf("controller Role rule %+v", rule)
		}
		named = append(named, rule.ResourceNames...)
	}
	if !slices.Equal(named, []string{"plugged-in", "mesh-root"}) {
		t.Errorf("the Role names %v", named)
	}
	var subjects []rbacv1.Subject
	for _, b := range r.crbs {
		subjects = append(subjects, b.Subjects...)
	}
	for _, b := range r.rbs {
		subjects = append(subjects, b.Subjects...)
	}
	for _, s := range subjects {
		if s.Namespace != "mesh" {
			t.Errorf("binding subject %+v, want namespace mesh", s)
		}
	}
	if len(r.crds) != 0 {
		t.Errorf("crds.install=false rendered %d CRDs", len(r.crds))
	}

	t.Run("cni.enabled=false", func(t *testing.T) {
		r := render(t, Namespace, "cni.enabled=false")
		spec, c := r.agent(t)
		for _, a := range c.Args {
			if strings.HasPrefix(a, "--cni-") {
				t.Errorf("flag %s without the CNI plugin", a)
			}
		}
		for _, m := range c.VolumeMounts {
			if strings.HasPrefix(m.MountPath, "/host/") {
				t.Errorf("mount %s without the CNI plugin", m.MountPath)
			}
		}
		// The handover still needs the host's /var/run/veil.
		wantHostPath(t, spec, c, "/var/run/veil", "/var/run/veil", corev1.HostPathDirectoryOrCreate)
		if r.clusterRoles["veil-agent"] != nil || r.roles["veil-agent"] != nil {
			t.Errorf("the agent needs no API access without the CNI plugin")
		}
	})
	t.Run("waypoint.deploy=false", func(t *testing.T) {
		r := render(t, Namespace, "waypoint.deploy=false")
		_, cc := r.controller(t)
		wantFlag(t, cc.Args, "waypoint-deploy", "false")
		if v, ok := argOf(t, cc.Args, "waypoint-image"); ok {
			t.Errorf("--waypoint-image=%s without waypoints", v)
		}
		for _, g := range []struct{ group, resource string }{{"apps", "deployments"}, {"", "serviceaccounts"}, {"gateway.networking.k8s.io", "gatewayclasses"}} {
			if grants(r.clusterRoles["veil-controller"], g.group, g.resource, "create") {
				t.Errorf("the controller may create %s/%s without waypoints to deploy", g.group, g.resource)
			}
		}
	})
	t.Run("a grace period too short to drain", func(t *testing.T) {
		if _, err := Render(chartDir, Namespace, "agent.terminationGracePeriodSeconds=1"); err == nil || !strings.Contains(err.Error(), "at least 2") {
			t.Errorf("err %v", err)
		}
	})
}

// grants reports whether role allows verb on group/resource.
func grants(role *rbacv1.ClusterRole, group, resource, verb string) bool {
	if role == nil {
		return false
	}
	for _, r := range role.Rules {
		if slices.Contains(r.APIGroups, group) && slices.Contains(r.Resources, resource) && slices.Contains(r.Verbs, verb) {
			return true
		}
	}
	return false
}

// helm lint finds nothing wrong, with the default values and the others above.
func TestChartLint(t *testing.T) {
	for _, vals := range []map[string]any{nil, {"cni": map[string]any{"enabled": false}, "crds": map[string]any{"install": false}, "waypoint": map[string]any{"deploy": false}}} {
		l := action.NewLint()
		l.Namespace = Namespace
		l.KubeVersion = &chartutil.KubeVersion{Version: "v1.35.0", Major: "1", Minor: "35"}
		res := l.Run([]string{chartDir}, vals)
		for _, m := range res.Messages {
			t.Logf("lint: %s", m)
		}
		if len(res.Errors) > 0 {
			t.Errorf("helm lint %v: %v", vals, res.Errors)
		}
	}
}

// What `make manifests` writes is what is committed: the chart's CRD files and
// deploy/manifests/veil.yaml.
func TestGeneratedFilesAreCurrent(t *testing.T) {
	files, err := CRDFiles(repo)
	if err != nil {
		t.Fatal(err)
	}
	have, _ := filepath.Glob(filepath.Join(chartDir, "files", "crds", "*"))
	if len(have) != len(files) {
		t.Errorf("files/crds holds %d files, want %d: run make manifests", len(have), len(files))
	}
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(chartDir, "files", "crds", name))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("files/crds/%s is stale (%v): run make manifests", name, err)
		}
	}
	want, err := Manifest(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(repo, "deploy", "manifests", "veil.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("deploy/manifests/veil.yaml is not what the chart renders: run make manifests\n%s", firstDiff(got, want))
	}
	// And it decodes: every document a known kind, strictly.
	r := decode(t, string(got))
	if len(r.namespaces) != 1 || r.namespaces[0].Name != Namespace {
		t.Errorf("namespaces %v", r.namespaces)
	}
}

func firstDiff(got, want []byte) string {
	g, w := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
	for i := 0; i < len(g) || i < len(w); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl {
			return fmt.Sprintf("line %d:\n  file:  %q\n  chart: %q", i+1, gl, wl)
		}
	}
	return ""
}
