package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"
)

const waypointUsage = `veilctl waypoint: waypoints, as istioctl waypoint makes them: a Gateway of class
istio-waypoint with Istio's listener {name: mesh, port: 15008, protocol: HBONE}, which
veil-controller (or istiod, where Istio owns the class) deploys a waypoint for.

  veilctl waypoint apply -n NS [--name waypoint] [--for service|workload|all|none]
                         [--enroll-namespace] [--overwrite] [--wait] [--timeout 90s]
                                  write the Gateway to the API server; --enroll-namespace labels
                                  the namespace istio.io/use-waypoint=NAME (--overwrite replaces
                                  another waypoint's), --wait waits until it is programmed
  veilctl waypoint apply -n NS --dir DIR [--address IP]... [...]
                                  write it as DIR/waypoint.NS.NAME.yaml for veil-controller
                                  --config-dir (and the lab); --address: the waypoint's address,
                                  as status.addresses (nothing deploys it from a directory)
  veilctl waypoint generate -n NS [--name waypoint] [--for ...]
                                  print the Gateway's YAML
  veilctl waypoint list [-n NS | -A] [--dir DIR]
                                  the waypoints, their traffic type, whether programmed, addresses
  veilctl waypoint delete -n NS [--dir DIR] NAME... | --all
                                  delete waypoints (only Gateways of class istio-waypoint)

The API server is the one of --kubeconfig, $KUBECONFIG or ~/.kube/config; -n defaults to
its context's namespace, else default. --for: the traffic the waypoint takes (default
service: traffic to Services, as Istio's default; the label is written only otherwise).
`

// gatewayGVR is the Gateway API's Gateway, as veilctl writes and reads it.
var gatewayGVR = schema.GroupVersionResource{Group: cluster.GatewayAPIGroup, Version: "v1", Resource: "gateways"}

const (
	defaultWaypointName = "waypoint"
	waypointPort        = 15008
	// waypointFieldManager owns the fields veilctl applies server-side.
	waypointFieldManager = "veilctl"
	// defaultWaypointWait is how long apply --wait waits, as istioctl's.
	defaultWaypointWait = 90 * time.Second
)

// errNoGatewayAPI is the API server not serving Gateways.
var errNoGatewayAPI = errors.New("the API server does not serve Gateways (gateway.networking.k8s.io/v1): install the Gateway API CRDs (veil's chart does, with crds.install=true)")

// waypointOpts are the flags of the waypoint commands.
type waypointOpts struct {
	namespace, name, forWhat, kubeconfig, dir string
	enroll, overwrite, wait, all              bool
	timeout                                   time.Duration
	addresses                                 multi
}

// waypointCmd runs veilctl waypoint SUBCOMMAND.
func waypointCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, waypointUsage)
		if len(args) == 0 {
			return errors.New("waypoint: want a subcommand: apply, generate, list or delete")
		}
		return nil
	}
	sub := args[0]
	var o waypointOpts
	fs := flag.NewFlagSet("veilctl waypoint "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, waypointUsage) }
	fs.StringVar(&o.namespace, "n", "", "namespace (default the kubeconfig context's, else default)")
	fs.StringVar(&o.namespace, "namespace", "", "namespace (default the kubeconfig context's, else default)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file (default $KUBECONFIG, else ~/.kube/config)")
	fs.StringVar(&o.dir, "dir", "", "a directory of YAML (veil-controller --config-dir) instead of the API server")
	switch sub {
	case "apply", "generate":
		fs.StringVar(&o.name, "name", defaultWaypointName, "the waypoint's name")
		fs.StringVar(&o.forWhat, "for", cluster.WaypointForService, "traffic the waypoint takes: service, workload, all or none")
		if sub == "apply" {
			fs.BoolVar(&o.enroll, "enroll-namespace", false, "label the namespace istio.io/use-waypoint=NAME: its Services (and pods, with --for workload or all) use the waypoint")
			fs.BoolVar(&o.overwrite, "overwrite", false, "with --enroll-namespace: replace the waypoint the namespace already uses")
			fs.BoolVar(&o.wait, "wait", false, "wait until the waypoint is programmed (a waypoint pod is ready)")
			fs.DurationVar(&o.timeout, "timeout", defaultWaypointWait, "how long --wait waits")
			fs.Var(&o.addresses, "address", "with --dir: an address of the waypoint, written as status.addresses; repeatable")
		}
	case "list":
		fs.BoolVar(&o.all, "A", false, "every namespace")
		fs.BoolVar(&o.all, "all-namespaces", false, "every namespace")
	case "delete":
		fs.BoolVar(&o.all, "all", false, "every waypoint of the namespace")
	default:
		fmt.Fprint(stderr, waypointUsage)
		return fmt.Errorf("waypoint: unknown subcommand %q", sub)
	}
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if o.dir != "" && o.kubeconfig != "" {
		return errors.New("waypoint: give --dir or --kubeconfig, not both")
	}
	if sub != "delete" && fs.NArg() > 0 {
		return fmt.Errorf("waypoint %s: unexpected arguments %q", sub, fs.Args())
	}
	switch sub {
	case "generate":
		if o.namespace == "" {
			o.namespace = "default"
		}
		gw, err := o.gateway()
		if err != nil {
			return err
		}
		b, err := yaml.Marshal(gw)
		if err != nil {
			return err
		}
		_, err = stdout.Write(b)
		return err
	case "apply":
		if o.dir != "" {
			return o.applyDir(stdout, stderr)
		}
		if len(o.addresses) > 0 {
			return errors.New("waypoint apply: --address is for --dir: on a cluster the controller deploying the waypoint writes its addresses")
		}
		k, err := o.connect()
		if err != nil {
			return err
		}
		return o.apply(ctx, k, stdout, stderr)
	case "list":
		if o.dir != "" {
			return o.listDir(stdout)
		}
		k, err := o.connect()
		if err != nil {
			return err
		}
		return o.list(ctx, k, stdout)
	default: // delete
		if o.all == (fs.NArg() > 0) {
			return errors.New("waypoint delete: name the waypoints, or give --all")
		}
		if o.dir != "" {
			return o.deleteDir(fs.Args(), stdout)
		}
		k, err := o.connect()
		if err != nil {
			return err
		}
		return o.delete(ctx, k, fs.Args(), stdout, stderr)
	}
}

// checkName refuses what cannot name a waypoint.
func checkName(name string) error {
	if name == "none" {
		return errors.New(`--name none: "none" cannot name a waypoint: istio.io/use-waypoint=none opts out of waypoints`)
	}
	if errs := validation.IsDNS1035Label(name); len(errs) > 0 {
		return fmt.Errorf("--name %q: cannot name a waypoint (it names the waypoint's Service): %s", name, strings.Join(errs, "; "))
	}
	return nil
}

// gateway is the waypoint's Gateway, as o's flags say.
func (o *waypointOpts) gateway() (*unstructured.Unstructured, error) {
	if err := checkName(o.name); err != nil {
		return nil, err
	}
	if errs := validation.IsDNS1123Label(o.namespace); len(errs) > 0 {
		return nil, fmt.Errorf("-n %q: not a namespace name: %s", o.namespace, strings.Join(errs, "; "))
	}
	meta := map[string]any{"name": o.name, "namespace": o.namespace}
	switch o.forWhat {
	case cluster.WaypointForService:
		// Istio's default: no label, so that a GatewayClass default can apply.
	case cluster.WaypointForWorkload, cluster.WaypointForAll, cluster.WaypointForNone:
		meta["labels"] = map[string]any{cluster.WaypointForLabel: o.forWhat}
	default:
		return nil, fmt.Errorf("--for %q: want service, workload, all or none", o.forWhat)
	}
	gw := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": gatewayGVR.GroupVersion().String(),
		"kind":       "Gateway",
		"metadata":   meta,
		"spec": map[string]any{
			"gatewayClassName": cluster.WaypointClass,
			"listeners":        []any{map[string]any{"name": "mesh", "port": int64(waypointPort), "protocol": "HBONE"}},
		},
	}}
	if len(o.addresses) > 0 {
		var addrs []any
		for _, a := range o.addresses {
			ip, err := netip.ParseAddr(a)
			if err != nil || ip.IsUnspecified() {
				return nil, fmt.Errorf("--address %q: not a usable IP address", a)
			}
			addrs = append(addrs, map[string]any{"type": "IPAddress", "value": ip.Unmap().String()})
		}
		gw.Object["status"] = map[string]any{"addresses": addrs}
	}
	return gw, nil
}

// kube reaches the API server.
type kube struct {
	dyn dynamic.Interface
	cs  kubernetes.Interface
}

// connect makes the clients of --kubeconfig (or $KUBECONFIG, ~/.kube/config) and sets
// the namespace from its context when -n was not given.
func (o *waypointOpts) connect() (*kube, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if o.kubeconfig != "" {
		rules.ExplicitPath = o.kubeconfig
	}
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{})
	rc, err := cc.ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("waypoint: no Kubernetes API server (give --kubeconfig or set $KUBECONFIG; --dir DIR for a directory of YAML): %w", err)
	}
	if o.namespace == "" {
		if o.namespace, _, err = cc.Namespace(); err != nil || o.namespace == "" {
			o.namespace = "default"
		}
	}
	k := &kube{}
	if k.dyn, err = dynamic.NewForConfig(rc); err != nil {
		return nil, fmt.Errorf("waypoint: %w", err)
	}
	if k.cs, err = kubernetes.NewForConfig(rc); err != nil {
		return nil, fmt.Errorf("waypoint: %w", err)
	}
	return k, nil
}

// gatewayErr turns the API server not serving Gateways into errNoGatewayAPI.
func gatewayErr(err error) error {
	var se apierrors.APIStatus
	if apierrors.IsNotFound(err) && errors.As(err, &se) && (se.Status().Details == nil || se.Status().Details.Name == "") {
		return errNoGatewayAPI // a 404 naming no object: the resource itself is not served
	}
	return err
}

// apply writes the waypoint's Gateway to the API server.
func (o *waypointOpts) apply(ctx context.Context, k *kube, stdout, stderr io.Writer) error {
	gw, err := o.gateway()
	if err != nil {
		return err
	}
	where := o.namespace + "/" + o.name
	if o.enroll {
		ns, err := k.cs.CoreV1().Namespaces().Get(ctx, o.namespace, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("waypoint apply: namespace %s: %w", o.namespace, err)
		}
		if err := o.enrollable(ns.Name, ns.Labels, stderr); err != nil {
			return err
		}
	}
	gateways := k.dyn.Resource(gatewayGVR).Namespace(o.namespace)
	cur, err := gateways.Get(ctx, o.name, metav1.GetOptions{})
	switch {
	case err == nil:
		if c, _, _ := unstructured.NestedString(cur.Object, "spec", "gatewayClassName"); c != cluster.WaypointClass {
			return fmt.Errorf("waypoint apply: Gateway %s exists with gatewayClassName %q: it is not a waypoint; choose another --name", where, c)
		}
	case apierrors.IsNotFound(err):
		if err := gatewayErr(err); errors.Is(err, errNoGatewayAPI) {
			return fmt.Errorf("waypoint apply: %w", err)
		}
	default:
		return fmt.Errorf("waypoint apply: Gateway %s: %w", where, err)
	}
	data, err := json.Marshal(gw.Object)
	if err != nil {
		return err
	}
	force := true
	if _, err := gateways.Patch(ctx, o.name, types.ApplyPatchType, data, metav1.PatchOptions{FieldManager: waypointFieldManager, Force: &force}); err != nil {
		return fmt.Errorf("waypoint apply: Gateway %s: %w", where, gatewayErr(err))
	}
	fmt.Fprintf(stdout, "waypoint %s applied\n", where)
	if o.wait {
		if err := o.waitProgrammed(ctx, gateways, stdout); err != nil {
			return err
		}
	}
	if o.enroll {
		patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{cluster.UseWaypointLabel: o.name}}})
		if _, err := k.cs.CoreV1().Namespaces().Patch(ctx, o.namespace, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: waypointFieldManager}); err != nil {
			return fmt.Errorf("waypoint apply: labelling namespace %s: %w", o.namespace, err)
		}
		fmt.Fprintf(stdout, "namespace %s labelled %s=%s\n", o.namespace, cluster.UseWaypointLabel, o.name)
	}
	return nil
}

// enrollable checks that namespace ns (its labels) may be labelled to use the waypoint:
// it uses no other waypoint, or --overwrite. A namespace outside the mesh is a warning.
func (o *waypointOpts) enrollable(ns string, labels map[string]string, stderr io.Writer) error {
	if cur, ok := labels[cluster.UseWaypointLabel]; ok && cur != o.name && !o.overwrite {
		return fmt.Errorf("waypoint apply: namespace %s already uses waypoint %q (%s=%s): add --overwrite to switch it to %q",
			ns, cur, cluster.UseWaypointLabel, cur, o.name)
	}
	if labels[cluster.DataplaneModeLabel] != cluster.DataplaneAmbient {
		fmt.Fprintf(stderr, "warning: namespace %s is not in the mesh (%s=%s): the waypoint serves only its enrolled pods; kubectl label namespace %s %s=%s\n",
			ns, cluster.DataplaneModeLabel, cluster.DataplaneAmbient, ns, cluster.DataplaneModeLabel, cluster.DataplaneAmbient)
	}
	return nil
}

// programmed returns whether gw's Programmed condition is True, and the condition as
// text.
func programmed(gw *unstructured.Unstructured) (bool, string) {
	conds, _, _ := unstructured.NestedSlice(gw.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == "Programmed" {
			return m["status"] == "True", fmt.Sprintf("Programmed=%v (%v): %v", m["status"], m["reason"], m["message"])
		}
	}
	return false, "no Programmed condition: no controller has taken the Gateway (is veil-controller running, with --waypoint-deploy?)"
}

// waitProgrammed waits for the waypoint's Programmed condition to be True.
func (o *waypointOpts) waitProgrammed(ctx context.Context, gateways dynamic.ResourceInterface, stdout io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	last := ""
	for {
		gw, err := gateways.Get(ctx, o.name, metav1.GetOptions{})
		if err == nil {
			var ok bool
			if ok, last = programmed(gw); ok {
				fmt.Fprintf(stdout, "waypoint %s/%s is ready: %s\n", o.namespace, o.name, strings.Join(addresses(gw), ", "))
				return nil
			}
		} else if ctx.Err() == nil {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waypoint apply: %s/%s not programmed after %v: %s", o.namespace, o.name, o.timeout, last)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// addresses are the values of gw's status.addresses.
func addresses(gw *unstructured.Unstructured) []string {
	addrs, _, _ := unstructured.NestedSlice(gw.Object, "status", "addresses")
	var out []string
	for _, a := range addrs {
		if m, ok := a.(map[string]any); ok {
			if v, ok := m["value"].(string); ok {
				out = append(out, v)
			}
		}
	}
	return out
}

// printWaypoints prints the waypoints among gws, sorted, as a table.
func printWaypoints(stdout io.Writer, gws []*unstructured.Unstructured, withNamespace bool) error {
	var ws []*unstructured.Unstructured
	for _, gw := range gws {
		if c, _, _ := unstructured.NestedString(gw.Object, "spec", "gatewayClassName"); c == cluster.WaypointClass {
			ws = append(ws, gw)
		}
	}
	if len(ws) == 0 {
		fmt.Fprintln(stdout, "No waypoints found.")
		return nil
	}
	sort.Slice(ws, func(i, j int) bool {
		if ws[i].GetNamespace() != ws[j].GetNamespace() {
			return ws[i].GetNamespace() < ws[j].GetNamespace()
		}
		return ws[i].GetName() < ws[j].GetName()
	})
	tw := tabwriter.NewWriter(stdout, 0, 8, 3, ' ', 0)
	if withNamespace {
		fmt.Fprint(tw, "NAMESPACE\t")
	}
	fmt.Fprintln(tw, "NAME\tTRAFFIC TYPE\tPROGRAMMED\tADDRESSES")
	for _, gw := range ws {
		forWhat := gw.GetLabels()[cluster.WaypointForLabel]
		if forWhat == "" {
			forWhat = cluster.WaypointForService
		}
		state := "False"
		if conds, _, _ := unstructured.NestedSlice(gw.Object, "status", "conditions"); len(conds) == 0 {
			state = "-" // a file: no controller reports on it
		} else if ok, _ := programmed(gw); ok {
			state = "True"
		}
		addrs := strings.Join(addresses(gw), ",")
		if addrs == "" {
			addrs = "<none>"
		}
		if withNamespace {
			fmt.Fprintf(tw, "%s\t", gw.GetNamespace())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", gw.GetName(), forWhat, state, addrs)
	}
	return tw.Flush()
}

// list prints the waypoints of the namespace (all with -A) on the API server.
func (o *waypointOpts) list(ctx context.Context, k *kube, stdout io.Writer) error {
	ns := o.namespace
	if o.all {
		ns = metav1.NamespaceAll
	}
	l, err := k.dyn.Resource(gatewayGVR).Namespace(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("waypoint list: %w", gatewayErr(err))
	}
	gws := make([]*unstructured.Unstructured, len(l.Items))
	for i := range l.Items {
		gws[i] = &l.Items[i]
	}
	return printWaypoints(stdout, gws, o.all)
}

// delete deletes waypoints of the namespace on the API server: those named, or all.
func (o *waypointOpts) delete(ctx context.Context, k *kube, names []string, stdout, stderr io.Writer) error {
	gateways := k.dyn.Resource(gatewayGVR).Namespace(o.namespace)
	if o.all {
		l, err := gateways.List(ctx, metav1.ListOptions{})
		if err != nil {
			return fmt.Errorf("waypoint delete: %w", gatewayErr(err))
		}
		for _, gw := range l.Items {
			if c, _, _ := unstructured.NestedString(gw.Object, "spec", "gatewayClassName"); c == cluster.WaypointClass {
				names = append(names, gw.GetName())
			}
		}
		if len(names) == 0 {
			fmt.Fprintf(stdout, "no waypoint in namespace %s\n", o.namespace)
			return nil
		}
	}
	var errs []error
	for _, name := range names {
		where := o.namespace + "/" + name
		gw, err := gateways.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			errs = append(errs, fmt.Errorf("waypoint delete: %s: %w", where, gatewayErr(err)))
			continue
		}
		if c, _, _ := unstructured.NestedString(gw.Object, "spec", "gatewayClassName"); c != cluster.WaypointClass {
			errs = append(errs, fmt.Errorf("waypoint delete: Gateway %s has gatewayClassName %q: not a waypoint, left alone", where, c))
			continue
		}
		uid := gw.GetUID()
		if err := gateways.Delete(ctx, name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}}); err != nil {
			errs = append(errs, fmt.Errorf("waypoint delete: %s: %w", where, err))
			continue
		}
		fmt.Fprintf(stdout, "waypoint %s deleted\n", where)
		if ns, err := k.cs.CoreV1().Namespaces().Get(ctx, o.namespace, metav1.GetOptions{}); err == nil && ns.Labels[cluster.UseWaypointLabel] == name {
			warnStillUsed(stderr, o.namespace, name)
		}
	}
	return errors.Join(errs...)
}

func warnStillUsed(stderr io.Writer, ns, name string) {
	fmt.Fprintf(stderr, "warning: namespace %s still uses waypoint %s: its traffic to the waypoint fails until you remove the label (kubectl label namespace %s %s-)\n",
		ns, name, ns, cluster.UseWaypointLabel)
}

// The directory form: one file per waypoint, waypoint.NS.NAME.yaml (namespace names have
// no dots), written atomically (veil-controller polls the directory).

func waypointFile(dir, ns, name string) string {
	return filepath.Join(dir, "waypoint."+ns+"."+name+".yaml")
}

// dirFiles are the files of dir that veil-controller --config-dir reads.
func dirFiles(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("waypoint: --dir: %w", err)
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") || e.IsDir() {
			continue
		}
		switch strings.ToLower(filepath.Ext(e.Name())) {
		case ".yaml", ".yml", ".json":
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	sort.Strings(out)
	return out, nil
}

// dirState reads every file of the directory as veil-controller does, each on its own
// (a file that does not parse is skipped: the controller reports it).
func dirState(dir string) (map[string]*cluster.State, error) {
	files, err := dirFiles(dir)
	if err != nil {
		return nil, err
	}
	out := map[string]*cluster.State{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("waypoint: %w", err)
		}
		out[f], _ = cluster.Parse(f, data)
	}
	return out, nil
}

// applyDir writes the waypoint's Gateway (and, with --enroll-namespace, its Namespace
// when no other file defines it) as a file of --dir.
func (o *waypointOpts) applyDir(stdout, stderr io.Writer) error {
	if o.wait {
		return errors.New("waypoint apply: --wait needs the API server: nothing reports on a waypoint in a directory")
	}
	if o.namespace == "" {
		o.namespace = "default"
	}
	gw, err := o.gateway()
	if err != nil {
		return err
	}
	files, err := dirState(o.dir)
	if err != nil {
		return err
	}
	file := waypointFile(o.dir, o.namespace, o.name)
	var nsObj map[string]any
	for f, st := range files {
		if f == file {
			continue
		}
		for _, g := range st.Gateways {
			if g.Namespace == o.namespace && g.Name == o.name {
				return fmt.Errorf("waypoint apply: Gateway %s/%s is already defined in %s", o.namespace, o.name, f)
			}
		}
	}
	if o.enroll {
		var labels map[string]string
		definedIn := ""
		for _, f := range sortedKeys(files) {
			if ns := files[f].Namespaces[o.namespace]; ns != nil {
				labels, definedIn = ns.Labels, f
			}
		}
		if err := o.enrollable(o.namespace, labels, stderr); err != nil {
			return err
		}
		if definedIn != "" && definedIn != file {
			if labels[cluster.UseWaypointLabel] != o.name {
				return fmt.Errorf("waypoint apply: --enroll-namespace: namespace %s is defined in %s: set its label %s: %s there",
					o.namespace, definedIn, cluster.UseWaypointLabel, o.name)
			}
		} else {
			nl := map[string]any{cluster.UseWaypointLabel: o.name}
			for k, v := range labels {
				if k != cluster.UseWaypointLabel {
					nl[k] = v
				}
			}
			nsObj = map[string]any{"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": o.namespace, "labels": nl}}
		}
	} else if st := files[file]; st != nil && st.Namespaces[o.namespace] != nil {
		// Enrolled by an earlier apply: the label stays until the waypoint is deleted.
		ns := st.Namespaces[o.namespace]
		nl := map[string]any{}
		for k, v := range ns.Labels {
			nl[k] = v
		}
		nsObj = map[string]any{"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": o.namespace, "labels": nl}}
	}
	if len(o.addresses) == 0 {
		fmt.Fprintf(stderr, "warning: the Gateway has no status.addresses: nothing deploys a waypoint from a directory, and it takes no traffic until one serves it (--address IP)\n")
	}
	var b bytes.Buffer
	b.WriteString("# Written by veilctl waypoint apply.\n")
	out, err := yaml.Marshal(gw.Object)
	if err != nil {
		return err
	}
	b.Write(out)
	if nsObj != nil {
		out, err := yaml.Marshal(nsObj)
		if err != nil {
			return err
		}
		b.WriteString("---\n")
		b.Write(out)
	}
	if _, errs := cluster.Parse(file, b.Bytes()); len(errs) > 0 {
		return fmt.Errorf("waypoint apply: %w", errors.Join(errs...)) // a bug, not a user's error
	}
	if err := identity.WriteFileAtomic(file, b.Bytes(), 0o644); err != nil {
		return fmt.Errorf("waypoint apply: %w", err)
	}
	fmt.Fprintf(stdout, "waypoint %s/%s applied: %s\n", o.namespace, o.name, file)
	if o.enroll {
		fmt.Fprintf(stdout, "namespace %s labelled %s=%s\n", o.namespace, cluster.UseWaypointLabel, o.name)
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// listDir prints the waypoints the directory defines.
func (o *waypointOpts) listDir(stdout io.Writer) error {
	files, err := dirState(o.dir)
	if err != nil {
		return err
	}
	var gws []*unstructured.Unstructured
	for _, f := range sortedKeys(files) {
		for _, g := range files[f].Gateways {
			if !o.all && o.namespace != "" && g.Namespace != o.namespace {
				continue
			}
			u := &unstructured.Unstructured{Object: map[string]any{"spec": map[string]any{"gatewayClassName": g.ClassName}}}
			u.SetNamespace(g.Namespace)
			u.SetName(g.Name)
			u.SetLabels(g.Labels)
			var addrs []any
			for _, a := range g.Addresses {
				addrs = append(addrs, map[string]any{"type": "IPAddress", "value": a.String()})
			}
			for _, h := range g.Hostnames {
				addrs = append(addrs, map[string]any{"type": "Hostname", "value": h})
			}
			if len(addrs) > 0 {
				u.Object["status"] = map[string]any{"addresses": addrs}
			}
			gws = append(gws, u)
		}
	}
	return printWaypoints(stdout, gws, o.all || o.namespace == "")
}

// deleteDir removes the files of waypoints that veilctl wrote in the directory.
func (o *waypointOpts) deleteDir(names []string, stdout io.Writer) error {
	if o.namespace == "" {
		o.namespace = "default"
	}
	files, err := dirState(o.dir)
	if err != nil {
		return err
	}
	if o.all {
		for _, f := range sortedKeys(files) {
			for _, g := range files[f].Gateways {
				if g.Namespace == o.namespace && g.ClassName == cluster.WaypointClass {
					names = append(names, g.Name)
				}
			}
		}
		if len(names) == 0 {
			fmt.Fprintf(stdout, "no waypoint in namespace %s\n", o.namespace)
			return nil
		}
	}
	var errs []error
	for _, name := range names {
		file := waypointFile(o.dir, o.namespace, name)
		if _, ok := files[file]; !ok {
			where := "is in no file"
			for _, f := range sortedKeys(files) {
				for _, g := range files[f].Gateways {
					if g.Namespace == o.namespace && g.Name == name {
						where = "is defined in " + f + ", which veilctl did not write: edit that file"
					}
				}
			}
			errs = append(errs, fmt.Errorf("waypoint delete: %s/%s %s", o.namespace, name, where))
			continue
		}
		if err := os.Remove(file); err != nil {
			errs = append(errs, fmt.Errorf("waypoint delete: %w", err))
			continue
		}
		fmt.Fprintf(stdout, "waypoint %s/%s deleted: %s removed\n", o.namespace, name, file)
	}
	return errors.Join(errs...)
}
