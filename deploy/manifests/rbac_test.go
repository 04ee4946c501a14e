package manifests

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cniconf"
	"github.com/veilmesh/veil/internal/kubetest"
	"github.com/veilmesh/veil/internal/removal"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"
	appsv1 "k8s.io/api/apps/v1"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

const (
	controllerUser = "system:serviceaccount:veil-system:veil-controller"
	agentUser      = "system:serviceaccount:veil-system:veil-agent"
)

// unused are the permissions veil.yaml grants that this test does not see used, each
// with the reason it is granted anyway. Empty: every permission is seen used.
var unused = map[string]string{}

// auditEvent is what the test reads of an audit.k8s.io/v1 Event.
type auditEvent struct {
	Stage string
	Verb  string
	User  struct {
		Username string
	}
	ObjectRef *struct {
		Resource, Subresource, Namespace, Name, APIGroup string
	}
	RequestURI  string
	Annotations map[string]string
}

// request is one kind of request in the audit log.
type request struct {
	user, group, resource, verb, namespace, name string
}

func (r request) String() string {
	g := r.group
	if g == "" {
		g = "core"
	}
	s := fmt.Sprintf("%s %s/%s", r.verb, g, r.resource)
	if r.namespace != "" {
		s += " in " + r.namespace
	}
	if r.name != "" {
		s += " named " + r.name
	}
	return s
}

// RBAC least privilege, shown against a real API server with an audit log: the real
// veil-controller runs as its service account with the flags the Deployment gives it
// (informers, the CA Secret created, the root published, an agent's certificate request
// authorized with a TokenReview and a pod lookup, a Gateway's waypoint deployed and its
// status written; then restarted after the CA Secret was replaced and the Gateway
// re-created, so the published root is updated and the waypoint's objects are taken over
// (with the new trust bundle), then deleted with their Gateway); the real veil-cni adds a pod with the
// agent's kubeconfig, and the agent's own check of its DaemonSet is made as its service
// account. Then every verb on every resource the ClusterRoles and Roles
// grant must appear in the log for that account (or be listed in unused with a reason),
// and no request of either account may have been forbidden.
func TestRBACIsNecessary(t *testing.T) {
	_, objs := load(t)
	kc := kubetest.Start(t, kubetest.WithAudit(""))
	kc.Kubectl(t, "apply", "--server-side", "-f", "veil.yaml")
	kc.Kubectl(t, "wait", "--for", "condition=established", "--timeout", "60s",
		"crd/peerauthentications.security.istio.io", "crd/authorizationpolicies.security.istio.io", "crd/requestauthentications.security.istio.io",
		"crd/gateways.gateway.networking.k8s.io") // served before the controller starts, so it watches them at once
	admin := kubernetes.NewForConfigOrDie(kc.Config)
	ctx := context.Background()

	// The cluster, as an admin: a meshed namespace with a pod on node-1, and node-1's agent.
	mustCreate(t, func() error {
		_, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bookinfo",
			Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}, metav1.CreateOptions{})
		return err
	})
	agentPod := newPod(t, admin, "veil-system", "veil-agent", "veil-agent-node-1", "node-1", "10.0.0.1")
	newPod(t, admin, "bookinfo", "reviews", "reviews-1", "node-1", "10.1.1.10")
	// bookinfo's waypoint, as veilctl waypoint apply writes it.
	gateways := dynamic.NewForConfigOrDie(kc.Config).Resource(schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "gateways"}).Namespace("bookinfo")
	gateway := createWaypointGateway(t, gateways)

	// The controller's credentials: its service account's token, as in its pod.
	dir := t.TempDir()
	ctrlToken := token(t, admin, "veil-controller", nil, nil)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: %q, insecure-skip-tls-verify: true}}]
users: [{name: veil-controller, user: {token: %q}}]
contexts: [{name: test, context: {cluster: test, user: veil-controller}}]
current-context: test
`, kc.Config.Host, ctrlToken), 0o600); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "veil-controller")
	build := exec.Command("go", "build", "-o", bin, "./cmd/veil-controller")
	build.Dir = "../.."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/veil-controller: %v\n%s", err, out)
	}
	// Its flags are the Deployment's, but for where it listens and how it reaches the API
	// server.
	dep, ok := objs.deployments["veil-controller"]
	if !ok || len(dep.Spec.Template.Spec.Containers) != 1 {
		t.Fatal("no veil-controller Deployment with one container")
	}
	var args []string
	var serverName string
	for _, a := range dep.Spec.Template.Spec.Containers[0].Args {
		switch {
		case strings.HasPrefix(a, "--kubeconfig="):
			a = "--kubeconfig=" + kubeconfig
		case strings.HasPrefix(a, "--listen="):
			a = "--listen=127.0.0.1:0"
		case strings.HasPrefix(a, "--server-name="):
			serverName = strings.TrimPrefix(a, "--server-name=")
		}
		args = append(args, a)
	}

	// 1. First start: no CA Secret yet (get, then create), no root ConfigMap yet (get, then
	// create), informers (list, watch), and node-1's agent asks for reviews' certificate
	// (a TokenReview, then a get of the agent's pod). The waypoint: GatewayClass
	// istio-waypoint created (get, create, status), its objects created, and once its pod
	// is ready the Gateway's status written.
	addr := startController(t, bin, args)
	root := waitRoot(t, admin, "")
	agentToken := token(t, admin, "veil-agent", []string{"istio-ca"}, agentPod)
	askCertificate(t, addr, serverName, root, agentToken, spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/reviews"))
	waypointProgrammed(t, admin, gateways)
	stopController(t)

	// 2. The CA is replaced (an operator plugs in a new root: here, deletes the Secret so
	// that the controller generates one): the restarted controller updates the published
	// root.
	if err := admin.CoreV1().Secrets("veil-system").Delete(ctx, "cacerts", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// Meanwhile the Gateway is deleted and made again (no garbage collector runs here):
	// the restarted controller takes the waypoint's objects over (update), with the new
	// trust bundle in its Deployment, and deletes them all once the Gateway is deleted.
	if err := gateways.Delete(ctx, gateway.GetName(), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gateway = createWaypointGateway(t, gateways)
	addr = startController(t, bin, args)
	root = waitRoot(t, admin, root)
	askCertificate(t, addr, serverName, root, agentToken, spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/reviews"))
	waypointTakenOver(t, admin, gateway, root)
	if err := gateways.Delete(ctx, gateway.GetName(), metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waypointRemoved(t, admin)
	stopController(t)

	// 3. The real veil-cni, run as a container runtime runs it (CNI_COMMAND=ADD, the
	// chained configuration with a prevResult on stdin) with the kubeconfig the agent
	// writes from its service account's token: it reads the pod and its namespace. The pod
	// is outside the mesh, so the plugin passes it through without an agent.
	agentToken = token(t, admin, "veil-agent", nil, agentPod) // the agent pod's own, automounted
	mustCreate(t, func() error {
		_, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "legacy"}}, metav1.CreateOptions{})
		return err
	})
	sleep := newPod(t, admin, "legacy", "sleep", "sleep", "node-1", "10.1.1.20")
	runCNIAdd(t, dir, kc.Config.Host, kc.CACert(), agentToken, sleep)

	// 4. The agent follows its DaemonSet while it runs and, stopping without a successor
	// (--uninstall=auto), asks whether it is deleted: internal/removal, which the agent
	// runs with its in-cluster account, run here with the same account.
	agentClient := kubernetes.NewForConfigOrDie(&rest.Config{Host: kc.Config.Host, BearerToken: agentToken,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}})
	watchCtx, stopWatch := context.WithCancel(ctx)
	w := removal.Start(watchCtx, agentClient, "veil-system", "veil-agent")
	if removing, err := w.Removing(ctx); err != nil || removing {
		t.Fatalf("the agent's account asking about its DaemonSet: %v, %v; want not removing", removing, err)
	}
	if err := admin.AppsV1().DaemonSets("veil-system").Delete(ctx, "veil-agent", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for removing, _ := w.Removing(ctx); !removing; removing, _ = w.Removing(ctx) {
		if time.Now().After(deadline) {
			t.Fatal("the agent never saw its DaemonSet deleted")
		}
		time.Sleep(50 * time.Millisecond)
	}
	stopWatch()

	// The audit log: what each account did, and whether anything was forbidden.
	used := readAudit(t, kc.AuditLog)
	for _, u := range []string{controllerUser, agentUser} {
		var seen []string
		for r := range used {
			if r.user == u {
				seen = append(seen, r.String())
			}
		}
		sort.Strings(seen)
		t.Logf("%s:\n  %s", u, strings.Join(seen, "\n  "))
	}

	// Every permission granted to either account was used.
	type grant struct {
		user      string
		namespace string // "" for a ClusterRole
		rule      rbacv1.PolicyRule
		from      string
	}
	var grants []grant
	subjectUsers := func(subjects []rbacv1.Subject) []string {
		var users []string
		for _, s := range subjects {
			if s.Kind != "ServiceAccount" {
				t.Errorf("binding to %s %s: veil binds only its service accounts", s.Kind, s.Name)
				continue
			}
			users = append(users, "system:serviceaccount:"+s.Namespace+":"+s.Name)
		}
		return users
	}
	for _, b := range objs.clusterRoleBindings {
		role, ok := objs.clusterRoles[b.RoleRef.Name]
		if b.RoleRef.Kind != "ClusterRole" || !ok {
			t.Errorf("ClusterRoleBinding %s binds %s %s, which veil.yaml does not define", b.Name, b.RoleRef.Kind, b.RoleRef.Name)
			continue
		}
		for _, u := range subjectUsers(b.Subjects) {
			for _, r := range role.Rules {
				grants = append(grants, grant{user: u, rule: r, from: "ClusterRole " + role.Name})
			}
		}
	}
	for _, b := range objs.roleBindings {
		role, ok := objs.roles[b.Namespace+"/"+b.RoleRef.Name]
		if b.RoleRef.Kind != "Role" || !ok {
			t.Errorf("RoleBinding %s/%s binds %s %s, which veil.yaml does not define in its namespace", b.Namespace, b.Name, b.RoleRef.Kind, b.RoleRef.Name)
			continue
		}
		for _, u := range subjectUsers(b.Subjects) {
			for _, r := range role.Rules {
				grants = append(grants, grant{user: u, namespace: b.Namespace, rule: r, from: "Role " + b.Namespace + "/" + role.Name})
			}
		}
	}
	if len(grants) == 0 {
		t.Fatal("veil.yaml grants nothing")
	}
	for _, g := range grants {
		if len(g.rule.NonResourceURLs) > 0 {
			t.Errorf("%s grants non-resource URLs %v", g.from, g.rule.NonResourceURLs)
		}
		for _, group := range g.rule.APIGroups {
			for _, res := range g.rule.Resources {
				for _, verb := range g.rule.Verbs {
					if group == "*" || res == "*" || verb == "*" {
						t.Errorf("%s grants a wildcard: %+v", g.from, g.rule)
						continue
					}
					key := g.user + ": " + request{group: group, resource: res, verb: verb}.String()
					seen := false
					for r := range used {
						seen = seen || r.user == g.user && r.group == group && r.resource == res && r.verb == verb &&
							(g.namespace == "" || r.namespace == g.namespace) &&
							(len(g.rule.ResourceNames) == 0 || slices.Contains(g.rule.ResourceNames, r.name))
					}
					if why, ok := unused[key]; ok {
						if seen {
							t.Errorf("%s (%s) is listed as unused (%s) but was used: remove it from unused", key, g.from, why)
						}
						continue
					}
					if !seen {
						t.Errorf("%s grants %s, which was never used: remove it, or list it in unused with the reason it is needed", g.from, key)
					}
				}
			}
		}
	}
}

// runCNIAdd runs veil-cni's ADD for pod as the container runtime would, with the
// kubeconfig the agent writes (cniconf.Kubeconfig), and checks it passes the previous
// plugin's result through.
func runCNIAdd(t *testing.T, dir, host, caFile, tok string, pod *corev1.Pod) {
	t.Helper()
	bin := filepath.Join(dir, "veil-cni")
	build := exec.Command("go", "build", "-o", bin, "./cmd/veil-cni")
	build.Dir = "../.."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/veil-cni: %v\n%s", err, out)
	}
	ca, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(dir, "veil-cni.kubeconfig")
	if err := os.WriteFile(kubeconfig, cniconf.Kubeconfig(host, ca, tok), 0o600); err != nil {
		t.Fatal(err)
	}
	ip := pod.Status.PodIP
	conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "kindnet", "type": %q, "agentSocket": %q, "kubeconfig": %q,
		"prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/test"}], "ips": [{"address": "%s/32", "interface": 0}]}}`,
		cniconf.PluginType, filepath.Join(dir, "no-agent.sock"), kubeconfig, ip)
	cmd := exec.Command(bin)
	cmd.Stdin = strings.NewReader(conf)
	// No network namespace of its own (that needs root): the test's, and
	// CNI_NETNS_OVERRIDE so that skel lets the plugin run in it.
	cmd.Env = append(os.Environ(), "CNI_COMMAND=ADD", "CNI_CONTAINERID=rbac-test", "CNI_NETNS=/proc/self/ns/net", "CNI_NETNS_OVERRIDE=1", "CNI_IFNAME=eth0",
		"CNI_PATH="+dir, fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_UID=%s", pod.Namespace, pod.Name, pod.UID))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || !strings.Contains(string(out), ip) {
		t.Fatalf("veil-cni ADD of %s/%s: %v\nstdout: %s\nstderr: %s", pod.Namespace, pod.Name, err, out, stderr.String())
	}
}

// createWaypointGateway creates bookinfo's waypoint, a Gateway of class istio-waypoint.
func createWaypointGateway(t *testing.T, gateways dynamic.ResourceInterface) *unstructured.Unstructured {
	t.Helper()
	gw, err := gateways.Create(context.Background(), &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
		"metadata": map[string]any{"name": "waypoint"},
		"spec": map[string]any{"gatewayClassName": "istio-waypoint",
			"listeners": []any{map[string]any{"name": "mesh", "port": int64(15008), "protocol": "HBONE"}}},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return gw
}

// eventually polls ok for up to 60 s.
func eventually(t *testing.T, what string, ok func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		done, err := ok()
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: never (%v)", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waypointProgrammed waits for the controller to deploy bookinfo's waypoint, makes its
// pod ready (no kubelet here), and waits for the Gateway's status.addresses.
func waypointProgrammed(t *testing.T, cs kubernetes.Interface, gateways dynamic.ResourceInterface) {
	t.Helper()
	ctx := context.Background()
	var dep *appsv1.Deployment
	eventually(t, "the waypoint's Deployment", func() (bool, error) {
		var err error
		dep, err = cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		return err == nil, err
	})
	spec := dep.Spec.Template.Spec.DeepCopy()
	spec.NodeName = "node-1"
	p, err := cs.CoreV1().Pods("bookinfo").Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "waypoint-1", Labels: dep.Spec.Template.Labels},
		Spec: *spec}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Phase, p.Status.PodIP = corev1.PodRunning, "10.1.1.30"
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	if _, err := cs.CoreV1().Pods("bookinfo").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the waypoint's addresses in its Gateway's status", func() (bool, error) {
		gw, err := gateways.Get(ctx, "waypoint", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		addrs, _, _ := unstructured.NestedSlice(gw.Object, "status", "addresses")
		return len(addrs) == 2, fmt.Errorf("status %v", gw.Object["status"])
	})
}

// waypointTakenOver waits for the objects made for an earlier Gateway to belong to gw,
// and for the waypoint's trust bundle to be root.
func waypointTakenOver(t *testing.T, cs kubernetes.Interface, gw *unstructured.Unstructured, root string) {
	t.Helper()
	ctx := context.Background()
	for _, get := range []func() (metav1.Object, error){
		func() (metav1.Object, error) {
			return cs.CoreV1().ServiceAccounts("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		},
		func() (metav1.Object, error) {
			return cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		},
		func() (metav1.Object, error) {
			return cs.CoreV1().Services("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		},
	} {
		eventually(t, "the waypoint's objects taken over by the new Gateway", func() (bool, error) {
			o, err := get()
			if err != nil {
				return false, err
			}
			ref := metav1.GetControllerOf(o)
			return ref != nil && ref.UID == gw.GetUID(), fmt.Errorf("%s: controller %+v", o.GetName(), ref)
		})
	}
	eventually(t, "the new trust bundle in the waypoint's Deployment", func() (bool, error) {
		dep, err := cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{})
		return err == nil && dep.Spec.Template.Annotations["veilmesh.io/ca-root"] == root, err
	})
}

// waypointRemoved waits for the controller to delete the waypoint's objects.
func waypointRemoved(t *testing.T, cs kubernetes.Interface) {
	t.Helper()
	ctx := context.Background()
	eventually(t, "the waypoint's objects deleted with their Gateway", func() (bool, error) {
		var left []string
		if _, err := cs.CoreV1().ServiceAccounts("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			left = append(left, "ServiceAccount")
		}
		if _, err := cs.AppsV1().Deployments("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			left = append(left, "Deployment")
		}
		if _, err := cs.CoreV1().Services("bookinfo").Get(ctx, "waypoint", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			left = append(left, "Service")
		}
		return len(left) == 0, fmt.Errorf("left: %v", left)
	})
}

func mustCreate(t *testing.T, create func() error) {
	t.Helper()
	if err := create(); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// newPod creates a running pod (there is no kubelet: its status is set by hand).
func newPod(t *testing.T, cs kubernetes.Interface, ns, sa, name, node, ip string) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	mustCreate(t, func() error {
		_, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
		return err
	})
	p, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": sa}},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa, Containers: []corev1.Container{{Name: "c", Image: "none"}}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Phase = corev1.PodRunning
	p.Status.PodIP, p.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
	if p, err = cs.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return p
}

// token is a token of the service account veil-system/sa, for the audiences (nil: the
// API server's own), bound to pod when one is given (as the kubelet's are).
func token(t *testing.T, cs kubernetes.Interface, sa string, audiences []string, pod *corev1.Pod) string {
	t.Helper()
	req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{Audiences: audiences}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := cs.CoreV1().ServiceAccounts("veil-system").CreateToken(context.Background(), sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

var running *exec.Cmd

// startController runs veil-controller and returns the address it serves on.
func startController(t *testing.T, bin string, args []string) string {
	t.Helper()
	cmd := exec.Command(bin, args...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(t.TempDir(), "controller.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	running = cmd
	t.Cleanup(func() { stopController(t) })
	// The first line it prints, or "" when it exits without one.
	first := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case first <- sc.Text():
			default:
			}
		}
		select {
		case first <- "":
		default:
		}
	}()
	var line string
	select {
	case line = <-first:
	case <-time.After(60 * time.Second):
	}
	// veil-controller: CA on 127.0.0.1:PORT, trust bundle ..., config stream from ...
	rest, ok := strings.CutPrefix(line, "veil-controller: CA on ")
	addr, _, ok2 := strings.Cut(rest, ",")
	if !ok || !ok2 {
		log, _ := os.ReadFile(logf.Name())
		t.Fatalf("veil-controller did not start (it said %q):\n%s", line, log)
	}
	return addr
}

func stopController(t *testing.T) {
	if running == nil {
		return
	}
	running.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { running.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		running.Process.Kill()
		<-done
	}
	running = nil
}

// waitRoot waits for the published root to be there and differ from old.
func waitRoot(t *testing.T, cs kubernetes.Interface, old string) string {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		cm, err := cs.CoreV1().ConfigMaps("veil-system").Get(context.Background(), "veil-ca-root", metav1.GetOptions{})
		if err == nil && cm.Data["root-cert.pem"] != "" && cm.Data["root-cert.pem"] != old {
			return cm.Data["root-cert.pem"]
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new root published in veil-system/veil-ca-root (%v)", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// askCertificate asks the controller's CA for id's certificate as an agent, with its
// projected token, until the controller has the pod placed (its informers synced).
func askCertificate(t *testing.T, addr, serverName, root, tok string, id spiffeid.ID) {
	t.Helper()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(root)) {
		t.Fatal("the published root holds no certificate")
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: serverName})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := pb.NewIstioCertificateServiceClient(conn)
	_, csr, err := identity.NewCSR(id)
	if err != nil {
		t.Fatal(err)
	}
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+tok)
	deadline := time.Now().Add(60 * time.Second)
	for {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := client.CreateCertificate(rctx, &pb.IstioCertificateRequest{Csr: string(csr), ValidityDuration: 3600})
		cancel()
		if err == nil && len(resp.CertChain) > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("CreateCertificate for %s as node-1's agent: %v", id, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// readAudit returns the resource requests of veil's service accounts in the audit log,
// failing the test on any that was forbidden.
func readAudit(t *testing.T, path string) map[request]bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	used := map[request]bool{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	n := 0
	for sc.Scan() {
		var e auditEvent
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("audit log: %v", err)
		}
		n++
		if e.User.Username != controllerUser && e.User.Username != agentUser {
			continue
		}
		if d := e.Annotations["authorization.k8s.io/decision"]; d != "allow" {
			t.Errorf("%s was refused (%s: %s): %s %s", e.User.Username, d, e.Annotations["authorization.k8s.io/reason"], e.Verb, e.RequestURI)
		}
		if e.ObjectRef == nil {
			continue // discovery and other non-resource URLs: allowed to every authenticated user, checked above
		}
		res := e.ObjectRef.Resource
		if e.ObjectRef.Subresource != "" {
			res += "/" + e.ObjectRef.Subresource
		}
		used[request{user: e.User.Username, group: e.ObjectRef.APIGroup, resource: res, verb: e.Verb, namespace: e.ObjectRef.Namespace, name: e.ObjectRef.Name}] = true
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Fatal("the audit log is empty")
	}
	return used
}
