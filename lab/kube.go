package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/kube"
	authv1 "k8s.io/api/authentication/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"
)

// A kube lab (Options.Kube) keeps its cluster in a real Kubernetes API server: etcd and
// kube-apiserver run in the fabric's namespace at APIServerIP, the controller reads them
// with --kubeconfig, and the agents authenticate with service-account tokens bound to
// their pods, checked by TokenReview.

// APIServerIP is a kube lab's API server address (port 6443), on the fabric beside the
// controller.
func APIServerIP() netip.Addr { return netip.MustParseAddr("10.99.0.253") }

const (
	// kubeTokenTTL is how long the agents' and the controller's tokens live: no kubelet
	// rotates them.
	kubeTokenTTL = 7 * 24 * time.Hour
	// agentSA is the agents' service account, as deploy/manifests/veil.yaml has it.
	agentSA = "veil-system/veil-agent"
	// fieldManager owns what the lab applies.
	fieldManager = "veilctl-lab"
)

// kubeAPI is a kube lab's API server and clients of it; safe for concurrent use.
type kubeAPI struct {
	srv    *kube.Server
	cs     kubernetes.Interface
	dyn    dynamic.Interface
	mapper meta.RESTMapper
}

func (l *Lab) kubeDir() string { return l.path("kube") }

func (l *Lab) kubeOptions() kube.Options {
	fab := l.fabricNS()
	return kube.Options{Netns: fab, Addr: APIServerIP().String(),
		Dial: func(ctx context.Context, _, addr string) (net.Conn, error) { return dialIn(ctx, fab, addr) }}
}

// useKube makes clients of srv the lab's.
func (l *Lab) useKube(srv *kube.Server) error {
	cs, err := kubernetes.NewForConfig(srv.Config)
	if err != nil {
		return fmt.Errorf("lab: kubernetes client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(srv.Config)
	if err != nil {
		return fmt.Errorf("lab: kubernetes client: %w", err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(cs.Discovery()))
	l.kube = &kubeAPI{srv: srv, cs: cs, dyn: dyn, mapper: mapper}
	return nil
}

// openKube finds the API server of a kube lab that is up; a lab without one is left
// as it is.
func (l *Lab) openKube() error {
	if _, err := os.Stat(filepath.Join(l.kubeDir(), "server.json")); err != nil {
		return nil
	}
	srv, err := kube.Open(l.kubeDir(), l.kubeOptions())
	if err != nil {
		return err
	}
	return l.useKube(srv)
}

// startKube runs the API server and fills it: Istio's CRDs, veil's namespace, service
// accounts and RBAC, the lab's cluster, and an agent pod per node with its token.
func (l *Lab) startKube(ctx context.Context) error {
	l.logf("lab %s: kube-apiserver and kubectl from scripts/kube-build.sh (cached; the first build takes minutes)", l.Spec.Name)
	if _, err := kube.Binaries(); err != nil {
		return err
	}
	l.logf("lab %s: starting etcd and kube-apiserver at %s", l.Spec.Name, APIServerIP())
	srv, err := kube.Start(l.kubeDir(), l.kubeOptions())
	if err != nil {
		return err
	}
	if err := l.useKube(srv); err != nil {
		return err
	}
	l.logf("lab %s: installing Istio's CRDs and veil's RBAC, creating the cluster's objects", l.Spec.Name)
	if err := srv.InstallIstioCRDs(); err != nil {
		return err
	}
	rbac, err := veilRBAC()
	if err != nil {
		return err
	}
	cluster, err := decodeObjects(l.Spec.ClusterYAML())
	if err != nil {
		return err
	}
	if _, err := l.kube.apply(ctx, append(rbac, cluster...), false); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	for _, node := range l.Spec.Nodes {
		if err := l.kubeAgent(ctx, node); err != nil {
			return err
		}
	}
	return l.writeKubeconfig(ctx, l.controllerKubeconfig(), "veil-system", "veil-controller")
}

// veilRBAC reads, from deploy/manifests/veil.yaml of the source tree this program was
// built from, what the controller and the agents run as: the veil-system Namespace, the
// ServiceAccounts and the RBAC. The lab runs the controller and the agents as its own
// processes, not as the Deployment and the DaemonSet.
func veilRBAC() ([]*unstructured.Unstructured, error) {
	_, here, _, _ := runtime.Caller(0)
	path := filepath.Join(filepath.Dir(here), "..", "deploy", "manifests", "veil.yaml")
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("lab: veil's RBAC, from the source tree this program was built from: %w", err)
	}
	objs, err := decodeObjects(data)
	if err != nil {
		return nil, fmt.Errorf("lab: %s: %w", path, err)
	}
	var out []*unstructured.Unstructured
	for _, o := range objs {
		switch o.GetKind() {
		case "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
			out = append(out, o)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("lab: %s holds no ServiceAccount or RBAC object", path)
	}
	return out, nil
}

// kubeAgent creates a node's agent pod, veil-system/veil-agent-NODE (host network, on
// the node, as the DaemonSet's pod would be), and writes the agent's token file: a token
// of veil-agent bound to that pod, for audience istio-ca, as the kubelet projects it.
func (l *Lab) kubeAgent(ctx context.Context, node string) error {
	ns, sa, _ := strings.Cut(agentSA, "/")
	ips, image := l.Spec.NodeIPs(node), "veil/veil-agent:dev"
	pod, err := yaml.Marshal(map[string]any{
		"apiVersion": "v1", "kind": "Pod",
		"metadata": map[string]any{"name": "veil-agent-" + node, "namespace": ns, "labels": map[string]any{"app": "veil-agent"}},
		"spec": map[string]any{"serviceAccountName": sa, "nodeName": node, "hostNetwork": true,
			"containers": []any{map[string]any{"name": "agent", "image": image}}},
		"status": runningStatus(ips, ips, "agent", image),
	})
	if err != nil {
		return err
	}
	objs, err := decodeObjects(pod)
	if err != nil {
		return err
	}
	applied, err := l.kube.apply(ctx, objs, false)
	if err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	tok, err := l.kube.token(ctx, ns, sa, "istio-ca", &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: applied[0].GetName(), UID: applied[0].GetUID()})
	if err != nil {
		return fmt.Errorf("lab: token of %s for pod %s/%s: %w", agentSA, ns, applied[0].GetName(), err)
	}
	return os.WriteFile(l.path("tokens", node), []byte(tok+"\n"), 0o600)
}

// token asks the TokenRequest API for a token of a service account.
func (k *kubeAPI) token(ctx context.Context, ns, sa, audience string, bound *authv1.BoundObjectReference) (string, error) {
	exp := int64(kubeTokenTTL / time.Second)
	req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: &exp, BoundObjectRef: bound}}
	if audience != "" {
		req.Spec.Audiences = []string{audience}
	}
	tr, err := k.cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return tr.Status.Token, nil
}

// writeKubeconfig writes a kubeconfig for the service account ns/sa at path: a token of
// that account (the API server's audience) and the API server's certificate to verify.
func (l *Lab) writeKubeconfig(ctx context.Context, path, ns, sa string) error {
	tok, err := l.kube.token(ctx, ns, sa, "", nil)
	if err != nil {
		return fmt.Errorf("lab: token of %s/%s: %w", ns, sa, err)
	}
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: lab, cluster: {server: %q, certificate-authority: %q}}]
users: [{name: %q, user: {token: %q}}]
contexts: [{name: lab, context: {cluster: lab, user: %q}}]
current-context: lab
`, l.kube.srv.Config.Host, l.kube.srv.CACert(), sa, tok, sa)
	return os.WriteFile(path, []byte(cfg), 0o600)
}

// controllerKubeconfig is the controller's kubeconfig: the service account
// veil-system/veil-controller, which may do what deploy/manifests/veil.yaml's RBAC lets it.
func (l *Lab) controllerKubeconfig() string {
	return filepath.Join(l.kubeDir(), "controller.kubeconfig")
}

// decodeObjects reads the objects of a YAML (or JSON) stream: several documents, a
// kind List unpacked.
func decodeObjects(data []byte) ([]*unstructured.Unstructured, error) {
	dec := k8syaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var objs []*unstructured.Unstructured
	for i := 1; ; i++ {
		var m map[string]any
		if err := dec.Decode(&m); errors.Is(err, io.EOF) {
			return objs, nil
		} else if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if len(m) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: m}
		if !u.IsList() {
			objs = append(objs, u)
			continue
		}
		if err := u.EachListItem(func(o k8sruntime.Object) error {
			objs = append(objs, o.(*unstructured.Unstructured))
			return nil
		}); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
	}
}

// objectName is "Kind namespace/name" (or "Kind name"), as errors name an object.
func objectName(o *unstructured.Unstructured) string {
	if o.GetNamespace() == "" {
		return o.GetKind() + " " + o.GetName()
	}
	return o.GetKind() + " " + o.GetNamespace() + "/" + o.GetName()
}

// resource finds where an object lives; a namespaced object without a namespace is
// put in "default", as kubectl does.
func (k *kubeAPI) resource(o *unstructured.Unstructured) (dynamic.ResourceInterface, error) {
	gvk := o.GroupVersionKind()
	m, err := k.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return nil, fmt.Errorf("%s: apiVersion %q, kind %q: %w", objectName(o), o.GetAPIVersion(), o.GetKind(), err)
	}
	if m.Scope.Name() == meta.RESTScopeNameRoot {
		return k.dyn.Resource(m.Resource), nil
	}
	if o.GetNamespace() == "" {
		o.SetNamespace("default")
	}
	return k.dyn.Resource(m.Resource).Namespace(o.GetNamespace()), nil
}

// apply applies objects server-side, in order, as the lab's field manager; with dryRun
// the API server validates them and changes nothing. A Pod's status goes through its
// status subresource, as its kubelet would write it. It returns the objects as applied.
func (k *kubeAPI) apply(ctx context.Context, objs []*unstructured.Unstructured, dryRun bool) ([]*unstructured.Unstructured, error) {
	opts := metav1.ApplyOptions{FieldManager: fieldManager, Force: true}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	var out []*unstructured.Unstructured
	for _, o := range objs {
		o = o.DeepCopy()
		ri, err := k.resource(o)
		if err != nil {
			return out, err
		}
		status, hasStatus := o.Object["status"]
		delete(o.Object, "status")
		applied, err := ri.Apply(ctx, o.GetName(), o, opts)
		if err != nil {
			return out, fmt.Errorf("%s: %w", objectName(o), err)
		}
		if hasStatus && o.GetKind() == "Pod" && !dryRun {
			st := &unstructured.Unstructured{Object: map[string]any{"apiVersion": o.GetAPIVersion(), "kind": o.GetKind(),
				"metadata": map[string]any{"name": o.GetName(), "namespace": o.GetNamespace()}, "status": status}}
			if applied, err = ri.ApplyStatus(ctx, o.GetName(), st, opts); err != nil {
				return out, fmt.Errorf("%s: status: %w", objectName(o), err)
			}
		}
		out = append(out, applied)
	}
	return out, nil
}

// delete deletes objects; one already gone is no error.
func (k *kubeAPI) delete(ctx context.Context, objs []*unstructured.Unstructured) error {
	var errs []error
	for _, o := range objs {
		ri, err := k.resource(o)
		if err == nil {
			err = ri.Delete(ctx, o.GetName(), metav1.DeleteOptions{})
		}
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("%s: %w", objectName(o), err))
		}
	}
	return errors.Join(errs...)
}

// kubeApply applies a file's objects through the API server (after a dry run of them
// all, so a refusal changes nothing) and records the file under name, for Delete; the
// objects of an earlier file of that name that it no longer holds are deleted, as
// replacing the file in the config directory would.
func (l *Lab) kubeApply(name string, data []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	objs, err := decodeObjects(data)
	if err != nil {
		return fmt.Errorf("lab apply: %s: %w", name, err)
	}
	if _, err := l.kube.apply(ctx, objs, true); err != nil {
		return fmt.Errorf("lab apply: rejected by the API server, nothing changed:\n%w", err)
	}
	var stale []*unstructured.Unstructured
	record := l.path("applied", configName(name))
	if old, err := os.ReadFile(record); err == nil {
		prev, _ := decodeObjects(old)
		stale = without(prev, objs)
	}
	if _, err := l.kube.apply(ctx, objs, false); err != nil {
		return fmt.Errorf("lab apply: %w", err)
	}
	if err := l.kube.delete(ctx, stale); err != nil {
		return fmt.Errorf("lab apply: %w", err)
	}
	if err := os.MkdirAll(l.path("applied"), 0o700); err != nil {
		return err
	}
	return identity.WriteFileAtomic(record, data, 0o600)
}

// kubeDelete deletes the objects of the file applied under name.
func (l *Lab) kubeDelete(name string) error {
	record := l.path("applied", configName(name))
	data, err := os.ReadFile(record)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("lab delete: %s was not applied", name)
	}
	if err != nil {
		return err
	}
	objs, err := decodeObjects(data)
	if err != nil {
		return fmt.Errorf("lab delete: %s: %w", record, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := l.kube.delete(ctx, objs); err != nil {
		return fmt.Errorf("lab delete: %w", err)
	}
	return os.Remove(record)
}

// without returns the objects of a that b does not hold (by kind, namespace and name).
func without(a, b []*unstructured.Unstructured) []*unstructured.Unstructured {
	key := func(o *unstructured.Unstructured) string {
		ns := o.GetNamespace()
		if ns == "" {
			ns = "default"
		}
		return o.GroupVersionKind().GroupKind().String() + " " + ns + "/" + o.GetName()
	}
	have := map[string]bool{}
	for _, o := range b {
		have[key(o)] = true
	}
	var out []*unstructured.Unstructured
	for _, o := range a {
		if !have[key(o)] {
			out = append(out, o)
		}
	}
	return out
}

// kubeStatus describes a kube lab's API server and how to reach it with kubectl.
func (l *Lab) kubeStatus() string {
	srv := l.kube.srv
	var b strings.Builder
	for _, n := range []string{"etcd", "kube-apiserver"} {
		fmt.Fprintf(&b, "  %-32s %s\n", n, procState(filepath.Join(l.kubeDir(), n+".pid")))
	}
	fmt.Fprintf(&b, "kube-apiserver %s (data and logs in %s)\n  kubectl: %s get pods -A\n",
		srv.Config.Host, l.kubeDir(), strings.Join(srv.Command().Args, " "))
	return b.String()
}
