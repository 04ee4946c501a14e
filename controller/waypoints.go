package controller

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// The GatewayClass of waypoints and who deploys them.
const (
	// WaypointControllerName is the controllerName of GatewayClass istio-waypoint when
	// veil deploys its waypoints.
	WaypointControllerName = "veilmesh.io/waypoint-controller"
	// IstioWaypointControllerName is Istio's controllerName for that class: istiod
	// deploys the waypoints, and veil only reads the Gateways.
	IstioWaypointControllerName = "istio.io/mesh-controller"
)

// The ports of a waypoint pod, as Istio's.
const (
	WaypointHBONEPort   = 15008
	WaypointMetricsPort = 15020
	WaypointStatusPort  = 15021
)

// GatewayClassGVR is the Gateway API's GatewayClass kind.
var GatewayClassGVR = schema.GroupVersionResource{Group: cluster.GatewayAPIGroup, Version: "v1", Resource: "gatewayclasses"}

const (
	// managedByLabel marks every object the controller makes (the CA Secret too); with
	// cluster.GatewayNameLabel it selects what the waypoint informers hold.
	managedByLabel = "app.kubernetes.io/managed-by"
	managedBy      = "veil-controller"
	// waypointHashAnnotation holds a digest of what the controller last wrote into an
	// object: an object whose digest matches is left alone.
	waypointHashAnnotation = "veilmesh.io/waypoint-hash"
	// waypointRootAnnotation holds a waypoint pod's trust bundle (PEM).
	waypointRootAnnotation = "veilmesh.io/ca-root"
	// Where a waypoint pod finds its trust bundle and its token.
	waypointRootDir  = "/etc/veil/ca"
	waypointTokenDir = "/var/run/secrets/tokens"
	waypointToken    = "istio-token"
	// waypointUser is the waypoint's uid and gid: it needs no privilege (15008 > 1024).
	waypointUser = 65532
)

// Waypoints deploys the waypoints of Gateways of class istio-waypoint, as istiod does,
// while veil owns that class: GatewayClass istio-waypoint is absent (Waypoints creates it
// with controllerName WaypointControllerName once a Gateway of the class exists) or names
// that controller. When it names Istio's (IstioWaypointControllerName), istiod deploys
// them and Waypoints deploys nothing (and removes what it had deployed).
//
// For each such Gateway it keeps, in the Gateway's namespace and owned by it (an
// ownerReference: the garbage collector removes them with it): a ServiceAccount named
// after the Gateway, whose identity is the waypoint's; a Deployment of veil-waypoint
// (one replica at creation; a scale is kept) with the trust bundle (Roots) in its pod
// template, so a new bundle rolls the waypoint; and a Service named after the Gateway,
// with ports 15008 (mesh) and 15021 (status). It writes the Gateway's status: Accepted, and once a waypoint pod is
// ready Programmed and status.addresses (the Service's ClusterIP and its DNS name), which
// is what makes the Gateway a waypoint for the agents; with no ready pod it clears both.
// A Gateway it cannot serve (listeners other than HBONE on 15008, the name none, a name
// that cannot name a Service) is not Accepted, with a message naming the field.
//
// It never touches an object it did not make: one of the same name that is not owned by
// the Gateway (a ServiceAccount of an application, say) stops the waypoint, and the
// Gateway's Programmed condition names it. What it made for a Gateway that is gone, or no
// longer a waypoint of veil's, it deletes itself, so nothing is left behind where no
// garbage collector runs. It reconciles on every change of a Gateway or of what it made,
// and every Interval. Several controller replicas may run it at once: every write is
// idempotent and conditional.
//
// An object it made that is edited by hand keeps the edit until the Gateway or the
// controller's settings change (then it is rewritten); delete it to have it remade.
//
// Run blocks; Resync is safe for concurrent use.
type Waypoints struct {
	// Config reaches the API server. Required.
	Config *rest.Config
	// Image is veil-waypoint's image. Required.
	Image string
	// PullPolicy of Image. Default IfNotPresent.
	PullPolicy corev1.PullPolicy
	// CAAddr is where waypoints reach the controller's CA (host:port, as the agents'
	// --ca-addr). Required.
	CAAddr string
	// CAServerName is the CA's TLS server name. Default the host of CAAddr.
	CAServerName string
	// Roots returns the trust bundle (PEM) the waypoints check the CA with. Required.
	Roots func() []byte
	// TrustDomain of the mesh. Default cluster.local.
	TrustDomain string
	// RootNamespace is meshConfig.rootNamespace. Default istio-system.
	RootNamespace string
	// PolicyPlacement is the waypoints' --policy-placement: "veil" (the default) or
	// "istio".
	PolicyPlacement string
	// ClusterDomain is the DNS suffix of Services: the Gateway's Hostname address is
	// <name>.<namespace>.svc.<ClusterDomain>. Default cluster.local.
	ClusterDomain string
	// Interval is how often everything is reconciled without a change. Default 30s.
	Interval time.Duration
	// Settle is how long a burst of changes is let settle. Default 100ms.
	Settle time.Duration
	// GatewayRecheck is how often Run asks again whether the API server serves Gateways,
	// while it does not. Default 30s.
	GatewayRecheck time.Duration
	Log            *slog.Logger

	kickOnce sync.Once
	kickCh   chan struct{}
}

// Validate reports what is missing or wrong in w's settings, naming the field.
func (w *Waypoints) Validate() error {
	var errs []error
	if w.Config == nil {
		errs = append(errs, errors.New("Config: required"))
	}
	if w.Image == "" {
		errs = append(errs, errors.New("Image: required (the veil-waypoint image)"))
	}
	switch w.PullPolicy {
	case "", corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		errs = append(errs, fmt.Errorf("PullPolicy %q: want Always, IfNotPresent or Never", w.PullPolicy))
	}
	if host, port, err := net.SplitHostPort(w.CAAddr); err != nil || host == "" || port == "" {
		errs = append(errs, fmt.Errorf("CAAddr %q: want host:port", w.CAAddr))
	}
	if w.Roots == nil {
		errs = append(errs, errors.New("Roots: required"))
	}
	switch w.PolicyPlacement {
	case "", "veil", "istio":
	default:
		errs = append(errs, fmt.Errorf("PolicyPlacement %q: want veil or istio", w.PolicyPlacement))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("controller: waypoints: %w", err)
	}
	return nil
}

// Resync asks Run to reconcile now (after the trust bundle changed, say). It never
// blocks.
func (w *Waypoints) Resync() {
	select {
	case w.kick() <- struct{}{}:
	default:
	}
}

func (w *Waypoints) kick() chan struct{} {
	w.kickOnce.Do(func() { w.kickCh = make(chan struct{}, 1) })
	return w.kickCh
}

// Run reconciles until ctx ends. It waits for the API server to serve Gateways (their
// CRD installed), asking every GatewayRecheck, and for its informers' first lists.
// Failures of single writes are logged and retried; Run returns an error only for bad
// settings.
func (w *Waypoints) Run(ctx context.Context) error {
	if err := w.Validate(); err != nil {
		return err
	}
	r := &waypointReconciler{w: w, log: w.Log, lastClass: classUnknown, foreign: map[string]bool{}, said: map[string]string{}}
	if r.log == nil {
		r.log = slog.Default()
	}
	r.caServerName = w.CAServerName
	if r.caServerName == "" {
		r.caServerName, _, _ = net.SplitHostPort(w.CAAddr)
	}
	r.pullPolicy = cmpOr(w.PullPolicy, corev1.PullIfNotPresent)
	r.trustDomain = cmpOr(w.TrustDomain, policy.DefaultTrustDomain)
	r.rootNamespace = cmpOr(w.RootNamespace, policy.DefaultRootNamespace)
	r.placement = cmpOr(w.PolicyPlacement, "veil")
	r.clusterDomain = cmpOr(w.ClusterDomain, "cluster.local")
	resync := cmpOr(w.Interval, 30*time.Second)
	settle := cmpOr(w.Settle, 100*time.Millisecond)
	recheck := cmpOr(w.GatewayRecheck, 30*time.Second)

	var err error
	if r.cs, err = kubernetes.NewForConfig(w.Config); err != nil {
		return fmt.Errorf("controller: waypoints: kubernetes client: %w", err)
	}
	if r.dyn, err = dynamic.NewForConfig(w.Config); err != nil {
		return fmt.Errorf("controller: waypoints: kubernetes client: %w", err)
	}
	dcfg := rest.CopyConfig(w.Config)
	dcfg.Timeout = 10 * time.Second
	disc, err := discovery.NewDiscoveryClientForConfig(dcfg)
	if err != nil {
		return fmt.Errorf("controller: waypoints: kubernetes client: %w", err)
	}
	if !waitGatewaysServed(ctx, disc, recheck, r.log) {
		return nil
	}

	// Only what the controller made (and its pods): a cluster's other objects are never
	// held in memory.
	selector := informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.LabelSelector = managedByLabel + "=" + managedBy + "," + cluster.GatewayNameLabel
	})
	factory := informers.NewSharedInformerFactoryWithOptions(r.cs, 0, selector)
	dfactory := dynamicinformer.NewDynamicSharedInformerFactory(r.dyn, 0)
	r.gateways = dfactory.ForResource(GatewayGVR).Informer()
	r.pods = factory.Core().V1().Pods().Informer()
	r.kinds = r.ownedKinds(factory)
	infs := []cache.SharedIndexInformer{r.gateways, r.pods}
	for _, k := range r.kinds {
		infs = append(infs, k.inf)
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { w.Resync() },
		UpdateFunc: func(_, _ any) { w.Resync() },
		DeleteFunc: func(any) { w.Resync() },
	}
	var synced []cache.InformerSynced
	for _, inf := range infs {
		if _, err := inf.AddEventHandler(handler); err != nil {
			return fmt.Errorf("controller: waypoints: %w", err)
		}
		synced = append(synced, inf.HasSynced)
	}
	factory.Start(ctx.Done())
	dfactory.Start(ctx.Done())
	defer factory.Shutdown()
	defer dfactory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil
	}
	r.log.Info("waypoints: deploying the waypoints of Gateways of class "+cluster.WaypointClass+" while veil owns the class",
		"image", w.Image, "ca", w.CAAddr)
	tick := time.NewTicker(resync)
	defer tick.Stop()
	for {
		r.pass(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-w.kick():
		case <-tick.C:
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(settle):
		}
		select {
		case <-w.kick():
		default:
		}
	}
}

// waitGatewaysServed waits until the API server serves Gateways; false when ctx ended.
func waitGatewaysServed(ctx context.Context, disc discovery.DiscoveryInterface, recheck time.Duration, log *slog.Logger) bool {
	said := false
	for {
		served, err := gatewaysServed(ctx, disc, log)
		if err != nil {
			return false
		}
		if served {
			return true
		}
		if !said {
			log.Info("waypoints: none deployed while the API server does not serve Gateways (gateway.networking.k8s.io/v1: their CRD is not installed); asking again periodically",
				"every", recheck)
			said = true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(recheck):
		}
	}
}

func cmpOr[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// classOwner is who deploys the waypoints of GatewayClass istio-waypoint.
type classOwner int

const (
	classUnknown classOwner = iota // not asked yet, or the API server did not answer
	classOurs
	classIstio
	classOther
)

// waypointReconciler is Run's state; used from Run's goroutine only.
type waypointReconciler struct {
	w   *Waypoints
	log *slog.Logger
	cs  kubernetes.Interface
	dyn dynamic.Interface

	caServerName, trustDomain, rootNamespace, placement, clusterDomain string
	pullPolicy                                                         corev1.PullPolicy

	gateways, pods cache.SharedIndexInformer
	kinds          []*ownedKind
	lastClass      classOwner
	// foreign are the objects (kind/namespace/name) found to exist and not to be the
	// controller's: a create that fails for them again is a conflict at once, without
	// waiting for them to reach the cache.
	foreign map[string]bool
	// said is the problem last logged for each Gateway (namespace/name): a problem is
	// logged when it appears or changes, not at every pass.
	said map[string]string
}

// problem logs msg for the Gateway key unless it was the last said of it; "" clears.
func (r *waypointReconciler) problem(key, msg string) {
	if r.said[key] == msg {
		return
	}
	if msg != "" {
		r.log.Warn("waypoints: "+msg, "gateway", key)
		r.said[key] = msg
	} else {
		delete(r.said, key)
	}
}

// ownedKind is one kind of object a waypoint is made of, and how to write it.
type ownedKind struct {
	kind   string
	inf    cache.SharedIndexInformer
	create func(ctx context.Context, o metav1.Object) (metav1.Object, error)
	update func(ctx context.Context, o metav1.Object) (metav1.Object, error)
	delete func(ctx context.Context, ns, name string, opts metav1.DeleteOptions) error
	// merge returns cur changed to want, keeping what the API server or an operator set
	// that the controller does not (a Service's ClusterIP, a Deployment's scale).
	merge func(cur, want metav1.Object) metav1.Object
}

func (r *waypointReconciler) ownedKinds(f informers.SharedInformerFactory) []*ownedKind {
	core, apps := r.cs.CoreV1(), r.cs.AppsV1()
	opts := metav1.CreateOptions{FieldManager: managedBy}
	uopts := metav1.UpdateOptions{FieldManager: managedBy}
	return []*ownedKind{{
		kind: "ServiceAccount",
		inf:  f.Core().V1().ServiceAccounts().Informer(),
		create: func(ctx context.Context, o metav1.Object) (metav1.Object, error) {
			return core.ServiceAccounts(o.GetNamespace()).Create(ctx, o.(*corev1.ServiceAccount), opts)
		},
		update: func(ctx context.Context, o metav1.Object) (metav1.Object, error) {
			return core.ServiceAccounts(o.GetNamespace()).Update(ctx, o.(*corev1.ServiceAccount), uopts)
		},
		delete: func(ctx context.Context, ns, name string, o metav1.DeleteOptions) error {
			return core.ServiceAccounts(ns).Delete(ctx, name, o)
		},
		merge: func(cur, want metav1.Object) metav1.Object {
			c := cur.(*corev1.ServiceAccount).DeepCopy()
			mergeMeta(c, want)
			return c
		},
	}, {
		kind: "Deployment",
		inf:  f.Apps().V1().Deployments().Informer(),
		create: func(ctx context.Context, o metav1.Object) (metav1.Object, error) {
			return apps.Deployments(o.GetNamespace()).Create(ctx, o.(*appsv1.Deployment), opts)
		},
		update: func(ctx context.Context, o metav1.Object) (metav1.Object, error) {
			return apps.Deployments(o.GetNamespace()).Update(ctx, o.(*appsv1.Deployment), uopts)
		},
		delete: func(ctx context.Context, ns, name string, o metav1.DeleteOptions) error {
			return apps.Deployments(ns).Delete(ctx, name, o)
		},
		merge: func(cur, want metav1.Object) metav1.Object {
			c := cur.(*appsv1.Deployment).DeepCopy()
			mergeMeta(c, want)
			replicas := c.Spec.Replicas
			c.Spec = *want.(*appsv1.Deployment).Spec.DeepCopy()
			if replicas != nil {
				c.Spec.Replicas = replicas // kubectl scale, an autoscaler
			}
			return c
		},
	}, {
		kind: "Service",
		inf:  f.Core().V1().Services().Informer(),
		create: func(ctx context.Context, o metav1.Object) (metav1.Object, error) {
			return core.Services(o.GetNamespace()).Create(ctx, o.(*corev1.Service), opts)
		},
		update: func(ctx context.Context, o metav1.Object) (metav1.Object, error) {
			return core.Services(o.GetNamespace()).Update(ctx, o.(*corev1.Service), uopts)
		},
		delete: func(ctx context.Context, ns, name string, o metav1.DeleteOptions) error {
			return core.Services(ns).Delete(ctx, name, o)
		},
		merge: func(cur, want metav1.Object) metav1.Object {
			c := cur.(*corev1.Service).DeepCopy()
			mergeMeta(c, want)
			old := c.Spec
			c.Spec = *want.(*corev1.Service).Spec.DeepCopy()
			// Allocated by the API server, immutable.
			c.Spec.ClusterIP, c.Spec.ClusterIPs = old.ClusterIP, old.ClusterIPs
			c.Spec.IPFamilies, c.Spec.IPFamilyPolicy = old.IPFamilies, old.IPFamilyPolicy
			return c
		},
	}}
}

// mergeMeta sets the labels, the digest and the owner of want on c; c's other labels
// and annotations stay.
func mergeMeta(c, want metav1.Object) {
	labels := c.GetLabels()
	if labels == nil {
		labels = map[string]string{}
	}
	for k, v := range want.GetLabels() {
		labels[k] = v
	}
	c.SetLabels(labels)
	ann := c.GetAnnotations()
	if ann == nil {
		ann = map[string]string{}
	}
	ann[waypointHashAnnotation] = want.GetAnnotations()[waypointHashAnnotation]
	c.SetAnnotations(ann)
	c.SetOwnerReferences(want.GetOwnerReferences())
}

// pass reconciles every waypoint Gateway once, then removes what belongs to none.
func (r *waypointReconciler) pass(ctx context.Context) {
	var gws []*unstructured.Unstructured
	for _, o := range r.gateways.GetStore().List() {
		if u, ok := o.(*unstructured.Unstructured); ok && gatewayClassName(u) == cluster.WaypointClass {
			gws = append(gws, u)
		}
	}
	class := classUnknown
	if len(gws) > 0 {
		var err error
		if class, err = r.gatewayClass(ctx); err != nil {
			r.log.Warn("waypoints: cannot tell who owns GatewayClass "+cluster.WaypointClass+"; trying again", "err", err)
		}
	}
	if class != classUnknown && class != r.lastClass {
		switch class {
		case classOurs:
			r.log.Info("waypoints: GatewayClass " + cluster.WaypointClass + " is veil's (" + WaypointControllerName + "): deploying its waypoints")
		case classIstio:
			r.log.Info("waypoints: GatewayClass " + cluster.WaypointClass + " is Istio's (" + IstioWaypointControllerName + "): istiod deploys its waypoints, veil only reads them")
		default:
			r.log.Warn("waypoints: GatewayClass " + cluster.WaypointClass + " belongs to another controller: veil deploys no waypoint")
		}
		r.lastClass = class
	}
	wanted := map[string]bool{}
	present := map[string]bool{}
	for _, gw := range gws {
		present[gw.GetNamespace()+"/"+gw.GetName()] = true
		switch {
		case gw.GetDeletionTimestamp() != nil:
		case class == classUnknown:
			// Who owns the class is not known: what exists stays as it is.
			wanted[gw.GetNamespace()+"/"+gw.GetName()] = true
		case class == classOurs && r.reconcile(ctx, gw):
			wanted[gw.GetNamespace()+"/"+gw.GetName()] = true
		}
	}
	for key := range r.said {
		if !present[key] {
			delete(r.said, key)
		}
	}
	r.cleanup(ctx, wanted)
}

func gatewayClassName(u *unstructured.Unstructured) string {
	s, _, _ := unstructured.NestedString(u.Object, "spec", "gatewayClassName")
	return s
}

// gatewayClass returns who owns GatewayClass istio-waypoint, creating it as veil's when
// it does not exist, and marking it Accepted when it is veil's.
func (r *waypointReconciler) gatewayClass(ctx context.Context) (classOwner, error) {
	classes := r.dyn.Resource(GatewayClassGVR)
	gc, err := classes.Get(ctx, cluster.WaypointClass, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		gc = &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": GatewayClassGVR.GroupVersion().String(),
			"kind":       "GatewayClass",
			"metadata": map[string]any{
				"name":   cluster.WaypointClass,
				"labels": map[string]any{managedByLabel: managedBy},
			},
			"spec": map[string]any{
				"controllerName": WaypointControllerName,
				"description":    "veil waypoints, deployed by veil-controller",
			},
		}}
		gc, err = classes.Create(ctx, gc, metav1.CreateOptions{FieldManager: managedBy})
		if apierrors.IsAlreadyExists(err) {
			gc, err = classes.Get(ctx, cluster.WaypointClass, metav1.GetOptions{})
		} else if err == nil {
			r.log.Info("waypoints: created GatewayClass " + cluster.WaypointClass + " for " + WaypointControllerName)
		}
	}
	if err != nil {
		return classUnknown, fmt.Errorf("GatewayClass %s: %w", cluster.WaypointClass, err)
	}
	ctrl, _, _ := unstructured.NestedString(gc.Object, "spec", "controllerName")
	switch ctrl {
	case WaypointControllerName:
	case IstioWaypointControllerName:
		return classIstio, nil
	default:
		return classOther, nil
	}
	cond := condition{typ: "Accepted", status: metav1.ConditionTrue, reason: "Accepted", message: "Handled by veil's waypoint controller"}
	conds, changed := setConditions(gc, cond)
	if changed {
		gc = gc.DeepCopy()
		if err := unstructured.SetNestedSlice(gc.Object, conds, "status", "conditions"); err != nil {
			return classOurs, err
		}
		if _, err := classes.UpdateStatus(ctx, gc, metav1.UpdateOptions{FieldManager: managedBy}); err != nil && !apierrors.IsConflict(err) {
			r.log.Warn("waypoints: GatewayClass "+cluster.WaypointClass+": status not written; trying again", "err", err)
		}
	}
	return classOurs, nil
}

// cleanup deletes what the controller made for a Gateway that is not wanted: gone, or no
// longer a waypoint of veil's.
func (r *waypointReconciler) cleanup(ctx context.Context, wanted map[string]bool) {
	for _, k := range r.kinds {
		for _, o := range k.inf.GetStore().List() {
			m, ok := o.(metav1.Object)
			if !ok {
				continue
			}
			gw := m.GetLabels()[cluster.GatewayNameLabel]
			ref := metav1.GetControllerOfNoCopy(m)
			if ref == nil || !isGatewayRef(ref) || ref.Name != gw {
				continue // not made for a Gateway: not the controller's to delete
			}
			key := m.GetNamespace() + "/" + gw
			if wanted[key] {
				continue
			}
			uid := m.GetUID()
			err := k.delete(ctx, m.GetNamespace(), m.GetName(), metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
			switch {
			case err == nil:
				r.log.Info("waypoints: deleted what was made for a Gateway that is no longer a waypoint of veil's", "kind", k.kind, "object", m.GetNamespace()+"/"+m.GetName(), "gateway", key)
			case apierrors.IsNotFound(err), apierrors.IsConflict(err):
			default:
				r.log.Warn("waypoints: cannot delete; trying again", "kind", k.kind, "object", m.GetNamespace()+"/"+m.GetName(), "err", err)
			}
		}
	}
}

func isGatewayRef(ref *metav1.OwnerReference) bool {
	gv, err := schema.ParseGroupVersion(ref.APIVersion)
	return err == nil && gv.Group == cluster.GatewayAPIGroup && ref.Kind == "Gateway"
}

// conflictError is an object of a waypoint's name the controller did not make.
type conflictError struct{ kind, ns, name string }

func (e *conflictError) Error() string {
	return fmt.Sprintf("%s %s/%s exists and was not made for this Gateway: veil leaves it alone; rename the Gateway, or delete that %s", e.kind, e.ns, e.name, e.kind)
}

// reconcile makes gw's objects what they should be and writes its status. It reports
// whether gw is a waypoint veil deploys (false: invalid, and its objects go).
func (r *waypointReconciler) reconcile(ctx context.Context, gw *unstructured.Unstructured) bool {
	ns, name := gw.GetNamespace(), gw.GetName()
	key := ns + "/" + name
	log := r.log.With("gateway", key)
	if reason, msg := validWaypoint(gw); reason != "" {
		r.problem(key, "Gateway not accepted ("+reason+"): "+msg)
		r.writeStatus(ctx, gw, nil,
			condition{typ: "Accepted", status: metav1.ConditionFalse, reason: reason, message: msg},
			condition{typ: "Programmed", status: metav1.ConditionFalse, reason: "Invalid", message: "Not accepted: " + msg})
		return false
	}
	accepted := condition{typ: "Accepted", status: metav1.ConditionTrue, reason: "Accepted",
		message: fmt.Sprintf("Deployed by veil: ServiceAccount, Deployment and Service %s/%s", ns, name)}
	wants, err := r.desired(gw)
	if err != nil {
		r.problem(key, "not deployed: "+err.Error())
		return true
	}
	var svc *corev1.Service
	for i, k := range r.kinds {
		o, err := r.ensure(ctx, k, gw, wants[i])
		var ce *conflictError
		switch {
		case errors.As(err, &ce):
			r.problem(key, "not deployed: "+err.Error())
			r.writeStatus(ctx, gw, nil, accepted,
				condition{typ: "Programmed", status: metav1.ConditionFalse, reason: "Invalid", message: err.Error()})
			return true
		case apierrors.IsConflict(err):
			// Changed meanwhile (another replica): the change brings another pass.
			log.Debug("waypoints: changed meanwhile; trying again", "kind", k.kind, "err", err)
			return true
		case err != nil:
			log.Warn("waypoints: cannot write; trying again", "kind", k.kind, "err", err)
			return true
		}
		if s, ok := o.(*corev1.Service); ok {
			svc = s
		}
	}
	r.problem(key, "")
	ready := r.readyPods(ns, name)
	if ready == 0 {
		r.writeStatus(ctx, gw, nil, accepted, condition{typ: "Programmed", status: metav1.ConditionFalse, reason: "NoResources",
			message: fmt.Sprintf("No pod of Deployment %s/%s is ready yet", ns, name)})
		return true
	}
	host := fmt.Sprintf("%s.%s.svc.%s", name, ns, r.clusterDomain)
	var addrs []any
	for _, ip := range svc.Spec.ClusterIPs {
		if net.ParseIP(ip) != nil {
			addrs = append(addrs, map[string]any{"type": "IPAddress", "value": ip})
		}
	}
	addrs = append(addrs, map[string]any{"type": "Hostname", "value": host})
	r.writeStatus(ctx, gw, addrs, accepted, condition{typ: "Programmed", status: metav1.ConditionTrue, reason: "Programmed",
		message: fmt.Sprintf("Resource programmed: %d waypoint pod(s) ready, assigned to service %s:%d", ready, host, WaypointHBONEPort)})
	return true
}

// validWaypoint returns why gw cannot be served (a Gateway API reason and a message
// naming the field), or "" when it can.
func validWaypoint(gw *unstructured.Unstructured) (reason, msg string) {
	name := gw.GetName()
	if name == "none" {
		return "Invalid", "metadata.name: a waypoint cannot be called none (istio.io/use-waypoint=none opts out of waypoints)"
	}
	if errs := validation.IsDNS1035Label(name); len(errs) > 0 {
		return "Invalid", fmt.Sprintf("metadata.name: %q cannot name the waypoint's Service: %s", name, strings.Join(errs, "; "))
	}
	if v, ok := gw.GetLabels()[cluster.WaypointForLabel]; ok {
		switch v {
		case cluster.WaypointForService, cluster.WaypointForWorkload, cluster.WaypointForAll, cluster.WaypointForNone:
		default:
			return "Invalid", fmt.Sprintf("metadata.labels[%s]: %q: want service, workload, all or none", cluster.WaypointForLabel, v)
		}
	}
	if addrs, _, _ := unstructured.NestedSlice(gw.Object, "spec", "addresses"); len(addrs) > 0 {
		return "UnsupportedAddress", "spec.addresses: a veil waypoint takes the address of its Service; remove them"
	}
	listeners, _, _ := unstructured.NestedSlice(gw.Object, "spec", "listeners")
	if len(listeners) == 0 {
		return "ListenersNotValid", fmt.Sprintf("spec.listeners: want Istio's {name: mesh, port: %d, protocol: HBONE}", WaypointHBONEPort)
	}
	for i, l := range listeners {
		m, _ := l.(map[string]any)
		proto, _, _ := unstructured.NestedString(m, "protocol")
		port, _, _ := unstructured.NestedInt64(m, "port")
		if proto != "HBONE" || port != WaypointHBONEPort {
			return "ListenersNotValid", fmt.Sprintf("spec.listeners[%d]: protocol %s on port %d: a veil waypoint serves only HBONE on port %d (Istio's {name: mesh, port: %d, protocol: HBONE})",
				i, proto, port, WaypointHBONEPort, WaypointHBONEPort)
		}
	}
	return "", ""
}

// readyPods counts gw's waypoint pods that are ready: running as its service account,
// with an address, not being deleted.
func (r *waypointReconciler) readyPods(ns, name string) int {
	n := 0
	for _, o := range r.pods.GetStore().List() {
		p, ok := o.(*corev1.Pod)
		if !ok || p.Namespace != ns || p.Labels[cluster.GatewayNameLabel] != name || p.Spec.ServiceAccountName != name ||
			p.DeletionTimestamp != nil || p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
			continue
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				n++
			}
		}
	}
	return n
}

// ensure makes the object want of kind k exist as want says, and returns it.
func (r *waypointReconciler) ensure(ctx context.Context, k *ownedKind, gw *unstructured.Unstructured, want metav1.Object) (metav1.Object, error) {
	key := want.GetNamespace() + "/" + want.GetName()
	store := k.inf.GetStore()
	o, exists, _ := store.GetByKey(key)
	if exists {
		delete(r.foreign, k.kind+"/"+key)
	} else {
		created, err := k.create(ctx, want)
		if err == nil {
			delete(r.foreign, k.kind+"/"+key)
			r.log.Info("waypoints: created", "kind", k.kind, "object", key, "gateway", gw.GetNamespace()+"/"+gw.GetName())
			awaitCached(ctx, store, key, created.GetResourceVersion(), 10*time.Second)
			return created, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return nil, err
		}
		// Made by another replica (it reaches the cache, which holds only what the
		// controller makes), or by someone else (it never does).
		if r.foreign[k.kind+"/"+key] {
			return nil, &conflictError{kind: k.kind, ns: want.GetNamespace(), name: want.GetName()}
		}
		if o = awaitCached(ctx, store, key, "", 3*time.Second); o == nil {
			r.foreign[k.kind+"/"+key] = true
			return nil, &conflictError{kind: k.kind, ns: want.GetNamespace(), name: want.GetName()}
		}
	}
	cur, ok := o.(metav1.Object)
	if !ok {
		return nil, fmt.Errorf("%s %s: unexpected %T in the cache", k.kind, key, o)
	}
	ref := metav1.GetControllerOfNoCopy(cur)
	switch {
	case ref != nil && ref.UID == gw.GetUID():
		if cur.GetAnnotations()[waypointHashAnnotation] == want.GetAnnotations()[waypointHashAnnotation] {
			return cur, nil
		}
	case ref != nil && isGatewayRef(ref) && ref.Name == gw.GetName() && cur.GetLabels()[managedByLabel] == managedBy:
		// Made for an earlier Gateway of this name, deleted while no controller ran (and
		// no garbage collector took them): taken over.
	default:
		return nil, &conflictError{kind: k.kind, ns: want.GetNamespace(), name: want.GetName()}
	}
	updated, err := k.update(ctx, k.merge(cur, want))
	if err != nil {
		return nil, err
	}
	r.log.Info("waypoints: updated", "kind", k.kind, "object", key, "gateway", gw.GetNamespace()+"/"+gw.GetName())
	awaitCached(ctx, store, key, updated.GetResourceVersion(), 10*time.Second)
	return updated, nil
}

// awaitCached waits (up to limit) for store to hold key, at resource version rv when rv
// is not "", so that the next pass does not act on what it wrote as if it had not. It
// returns the cached object, or nil.
func awaitCached(ctx context.Context, store cache.Store, key, rv string, limit time.Duration) any {
	deadline := time.Now().Add(limit)
	for {
		if o, ok, _ := store.GetByKey(key); ok {
			if m, isMeta := o.(metav1.Object); rv == "" || isMeta && m.GetResourceVersion() == rv {
				return o
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// desired returns gw's objects in the order of r.kinds: ServiceAccount, Deployment,
// Service.
func (r *waypointReconciler) desired(gw *unstructured.Unstructured) ([]metav1.Object, error) {
	ns, name := gw.GetNamespace(), gw.GetName()
	roots := r.w.Roots()
	if len(roots) == 0 {
		return nil, errors.New("no trust bundle to give the waypoint")
	}
	labels := func() map[string]string {
		return map[string]string{managedByLabel: managedBy, cluster.GatewayNameLabel: name}
	}
	meta := func(objName string) metav1.ObjectMeta {
		return metav1.ObjectMeta{Name: objName, Namespace: ns, Labels: labels()}
	}
	podLabels := labels()
	podLabels[cluster.DataplaneModeLabel] = cluster.DataplaneNone // a waypoint is never captured
	sa := &corev1.ServiceAccount{ObjectMeta: meta(name)}
	args := []string{
		"--ca-addr=" + r.w.CAAddr,
		"--ca-server-name=" + r.caServerName,
		"--ca-root=" + waypointRootDir + "/" + RootConfigMapKey,
		"--token-file=" + waypointTokenDir + "/" + waypointToken,
		"--trust-domain=" + r.trustDomain,
		"--root-namespace=" + r.rootNamespace,
		"--namespace=$(POD_NAMESPACE)",
		"--gateway=$(GATEWAY_NAME)",
		"--pod-ip=$(POD_IP)",
		fmt.Sprintf("--hbone-addr=[::]:%d", WaypointHBONEPort),
		fmt.Sprintf("--metrics-addr=:%d", WaypointMetricsPort),
		fmt.Sprintf("--ready-addr=:%d", WaypointStatusPort),
		"--policy-placement=" + r.placement,
	}
	user := int64(waypointUser)
	dep := &appsv1.Deployment{
		ObjectMeta: meta(name),
		Spec: appsv1.DeploymentSpec{
			Replicas: ptrTo(int32(1)),
			Selector: &metav1.LabelSelector{MatchLabels: labels()},
			Template: corev1.PodTemplateSpec{
				// The trust bundle, as a file (downward API): a ConfigMap in every namespace
				// with a waypoint would need the right to write every ConfigMap of the
				// cluster. A new bundle (a root rotation) rolls the waypoint.
				// The placement annotation tells the agents this waypoint enforces the
				// policies of the workloads it serves (cluster.PolicyPlacementAnnotation).
				ObjectMeta: metav1.ObjectMeta{Labels: podLabels, Annotations: map[string]string{waypointRootAnnotation: string(roots),
					cluster.PolicyPlacementAnnotation: r.placement}},
				Spec: corev1.PodSpec{
					ServiceAccountName: name,
					// The waypoint reads nothing from the API server: its only token is the
					// projected one the CA reviews.
					AutomountServiceAccountToken: ptrTo(false),
					SecurityContext: &corev1.PodSecurityContext{
						RunAsNonRoot: ptrTo(true), RunAsUser: &user, RunAsGroup: &user,
						SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
					},
					Containers: []corev1.Container{{
						Name:            "waypoint",
						Image:           r.w.Image,
						ImagePullPolicy: r.pullPolicy,
						Args:            args,
						Env: []corev1.EnvVar{
							{Name: "POD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
							{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
							{Name: "GATEWAY_NAME", Value: name},
						},
						Ports: []corev1.ContainerPort{
							{Name: "mesh", ContainerPort: WaypointHBONEPort, Protocol: corev1.ProtocolTCP},
							{Name: "metrics", ContainerPort: WaypointMetricsPort, Protocol: corev1.ProtocolTCP},
							{Name: "status-port", ContainerPort: WaypointStatusPort, Protocol: corev1.ProtocolTCP},
						},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz/ready", Port: intstr.FromInt32(WaypointStatusPort)}},
							PeriodSeconds: 2,
						},
						SecurityContext: &corev1.SecurityContext{
							AllowPrivilegeEscalation: ptrTo(false),
							ReadOnlyRootFilesystem:   ptrTo(true),
							Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
						},
						VolumeMounts: []corev1.VolumeMount{
							{Name: "ca-root", MountPath: waypointRootDir, ReadOnly: true},
							{Name: "token", MountPath: waypointTokenDir, ReadOnly: true},
						},
					}},
					Volumes: []corev1.Volume{
						{Name: "ca-root", VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{
							Items: []corev1.DownwardAPIVolumeFile{{Path: RootConfigMapKey,
								FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.annotations['" + waypointRootAnnotation + "']"}}}}}},
						{Name: "token", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
							Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
								Audience: "istio-ca", ExpirationSeconds: ptrTo(int64(43200)), Path: waypointToken}}}}}},
					},
				},
			},
		},
	}
	svc := &corev1.Service{
		ObjectMeta: meta(name),
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeClusterIP,
			Selector: labels(),
			Ports: []corev1.ServicePort{
				{Name: "mesh", Port: WaypointHBONEPort, TargetPort: intstr.FromInt32(WaypointHBONEPort), Protocol: corev1.ProtocolTCP},
				{Name: "status-port", Port: WaypointStatusPort, TargetPort: intstr.FromInt32(WaypointStatusPort), Protocol: corev1.ProtocolTCP},
			},
		},
	}
	owner := []metav1.OwnerReference{{APIVersion: GatewayGVR.GroupVersion().String(), Kind: "Gateway",
		Name: name, UID: gw.GetUID(), Controller: ptrTo(true)}}
	objs := []metav1.Object{sa, dep, svc}
	for _, o := range objs {
		b, err := json.Marshal(o)
		if err != nil {
			return nil, err
		}
		sum := sha256.Sum256(b)
		o.SetAnnotations(map[string]string{waypointHashAnnotation: hex.EncodeToString(sum[:12])})
		o.SetOwnerReferences(owner)
	}
	return objs, nil
}

func ptrTo[T any](v T) *T { return &v }

// condition is a status condition the controller sets.
type condition struct {
	typ     string
	status  metav1.ConditionStatus
	reason  string
	message string
}

// setConditions returns o's status.conditions with each of set in place (its
// lastTransitionTime kept while its status does not change), and whether that changed
// anything. Conditions of other types stay.
func setConditions(o *unstructured.Unstructured, set ...condition) ([]any, bool) {
	cur, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
	out := slices.Clone(cur)
	changed := false
	gen := o.GetGeneration()
	now := time.Now().UTC().Format(time.RFC3339)
	for _, c := range set {
		want := map[string]any{"type": c.typ, "status": string(c.status), "reason": c.reason, "message": c.message,
			"observedGeneration": gen, "lastTransitionTime": now}
		i := slices.IndexFunc(out, func(x any) bool { m, _ := x.(map[string]any); return m["type"] == c.typ })
		if i < 0 {
			out, changed = append(out, want), true
			continue
		}
		old, _ := out[i].(map[string]any)
		if old["status"] == want["status"] {
			want["lastTransitionTime"] = old["lastTransitionTime"]
		}
		if !equality.Semantic.DeepEqual(old, want) {
			out[i], changed = want, true
		}
	}
	return out, changed
}

// writeStatus sets gw's status.addresses (none: removed) and conditions, when they
// differ from what the cache holds.
func (r *waypointReconciler) writeStatus(ctx context.Context, gw *unstructured.Unstructured, addrs []any, conds ...condition) {
	cur, _, _ := unstructured.NestedSlice(gw.Object, "status", "addresses")
	newConds, changed := setConditions(gw, conds...)
	if !changed && equality.Semantic.DeepEqual(cur, addrs) { // nil and empty are equal here
		return
	}
	u := gw.DeepCopy()
	if len(addrs) > 0 {
		_ = unstructured.SetNestedSlice(u.Object, addrs, "status", "addresses")
	} else {
		unstructured.RemoveNestedField(u.Object, "status", "addresses")
	}
	_ = unstructured.SetNestedSlice(u.Object, newConds, "status", "conditions")
	updated, err := r.dyn.Resource(GatewayGVR).Namespace(gw.GetNamespace()).UpdateStatus(ctx, u, metav1.UpdateOptions{FieldManager: managedBy})
	switch {
	case apierrors.IsConflict(err), apierrors.IsNotFound(err):
		return // changed or deleted meanwhile: that event brings another pass
	case err != nil:
		r.log.Warn("waypoints: Gateway status not written; trying again", "gateway", gw.GetNamespace()+"/"+gw.GetName(), "err", err)
		return
	}
	awaitCached(ctx, r.gateways.GetStore(), gw.GetNamespace()+"/"+gw.GetName(), updated.GetResourceVersion(), 10*time.Second)
}
