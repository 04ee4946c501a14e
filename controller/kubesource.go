package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// SecurityGVRs are the security.istio.io kinds the Kubernetes source watches.
var SecurityGVRs = []schema.GroupVersionResource{
	{Group: "security.istio.io", Version: "v1", Resource: "peerauthentications"},
	{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"},
	{Group: "security.istio.io", Version: "v1", Resource: "requestauthentications"},
}

// GatewayGVR is the Gateway API kind the Kubernetes source watches when the API server
// serves it: ambient's waypoints are Gateways. Its CRD may be absent from a cluster.
var GatewayGVR = schema.GroupVersionResource{Group: cluster.GatewayAPIGroup, Version: "v1", Resource: "gateways"}

// KubeSource is a Source that watches a Kubernetes API server with client-go informers:
// Namespaces, Pods, Services, EndpointSlices, the security.istio.io kinds and, when their
// CRD is installed, Gateway API Gateways. Every object goes through the same parsing,
// validation and last-good bookkeeping as a file of DirSource (each object is its own
// document), so a policy that stops validating keeps its last good version and a bad
// object never loosens what is enforced. Finished pods (Succeeded, Failed) are not
// workloads.
//
// Informers relist after a watch breaks (an API server restart); while the API server is
// unreachable the last config stays served. Run waits for the first full list before the
// first update, so a controller never serves a partial cluster.
//
// An informer for a resource the API server does not serve never syncs, so Run asks
// (discovery) whether Gateways are served before it starts: when they are not, it serves
// the rest without them, and asks again every GatewayRecheck; once they are, it watches
// them and rebuilds the config when their first list is in. Once watched they stay
// watched: a CRD deleted takes its Gateways with it (deletes the informer sees), and the
// informer retries until the CRD is back.
type KubeSource struct {
	// Config reaches the API server. Required.
	Config *rest.Config
	// Policy are the options policies are validated with.
	Policy policy.Options
	// Settle is how long a burst of changes is let settle before the config is rebuilt.
	// Default 100ms.
	Settle time.Duration
	// GatewayRecheck is how often Run asks again whether the API server serves Gateways,
	// while it does not. Default 30s.
	GatewayRecheck time.Duration
	Log            *slog.Logger
}

// Run implements Source. It blocks until ctx ends.
func (k *KubeSource) Run(ctx context.Context, update func(*Config)) error {
	log := k.Log
	if log == nil {
		log = slog.Default()
	}
	settle := k.Settle
	if settle <= 0 {
		settle = 100 * time.Millisecond
	}
	recheck := k.GatewayRecheck
	if recheck <= 0 {
		recheck = 30 * time.Second
	}
	cs, err := kubernetes.NewForConfig(k.Config)
	if err != nil {
		return fmt.Errorf("controller: kubernetes client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(k.Config)
	if err != nil {
		return fmt.Errorf("controller: kubernetes client: %w", err)
	}
	changed := make(chan struct{}, 1)
	// generation is the newest API server revision seen in any event: adds, updates and
	// deletes (a delete event carries the revision of the deletion). Revisions are global
	// and grow, so a replica that has seen a change another has not is ahead of it.
	var generation atomic.Uint64
	seen := func(o any) {
		if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
			o = d.Obj
		}
		if m, ok := o.(metav1.Object); ok {
			if rv, err := strconv.ParseUint(m.GetResourceVersion(), 10, 64); err == nil {
				for cur := generation.Load(); rv > cur && !generation.CompareAndSwap(cur, rv); cur = generation.Load() {
				}
			}
		}
	}
	kick := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { seen(o); kick() },
		UpdateFunc: func(_, o any) { seen(o); kick() },
		DeleteFunc: func(o any) { seen(o); kick() },
	}
	factory := informers.NewSharedInformerFactory(cs, 0)
	typed := []struct {
		kind, apiVersion string
		inf              cache.SharedIndexInformer
	}{
		{"Namespace", "v1", factory.Core().V1().Namespaces().Informer()},
		{"Pod", "v1", factory.Core().V1().Pods().Informer()},
		{"Service", "v1", factory.Core().V1().Services().Informer()},
		{"EndpointSlice", "discovery.k8s.io/v1", factory.Discovery().V1().EndpointSlices().Informer()},
	}
	dfactory := dynamicinformer.NewDynamicSharedInformerFactory(dyn, 0)
	var dynamicInfs []cache.SharedIndexInformer
	for _, gvr := range SecurityGVRs {
		dynamicInfs = append(dynamicInfs, dfactory.ForResource(gvr).Informer())
	}
	for _, t := range typed {
		t.inf.AddEventHandler(handler)
	}
	for _, inf := range dynamicInfs {
		inf.AddEventHandler(handler)
	}
	// Gateways, when served: nil while they are not watched. Only this goroutine uses it.
	var gateways cache.SharedIndexInformer
	watchGateways := func() {
		gateways = dfactory.ForResource(GatewayGVR).Informer()
		gateways.AddEventHandler(handler)
	}
	// Discovery on a deadline: the main loop below asks it too, and must not hang.
	dcfg := rest.CopyConfig(k.Config)
	dcfg.Timeout = 10 * time.Second
	disc, err := discovery.NewDiscoveryClientForConfig(dcfg)
	if err != nil {
		return fmt.Errorf("controller: kubernetes client: %w", err)
	}
	served, err := gatewaysServed(ctx, disc, log)
	if err != nil {
		return err
	}
	if served {
		watchGateways()
	} else {
		log.Info("config: Gateways (gateway.networking.k8s.io/v1) are not watched: the API server does not serve them (their CRD is not installed); asking again periodically",
			"every", recheck)
	}
	factory.Start(ctx.Done())
	dfactory.Start(ctx.Done())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer factory.Shutdown()
	defer dfactory.Shutdown()

	var synced []cache.InformerSynced
	for _, t := range typed {
		synced = append(synced, t.inf.HasSynced)
	}
	for _, inf := range dynamicInfs {
		synced = append(synced, inf.HasSynced)
	}
	if gateways != nil {
		synced = append(synced, gateways.HasSynced)
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return ctx.Err()
	}
	loader := &DirSource{Policy: k.Policy} // used from this goroutine only
	rebuild := func() {
		var docs []doc
		for _, t := range typed {
			for _, o := range t.inf.GetStore().List() {
				docs = append(docs, typedDoc(t.kind, t.apiVersion, o))
			}
		}
		unstructuredInfs := dynamicInfs
		if gateways != nil && gateways.HasSynced() {
			unstructuredInfs = append(slices.Clip(unstructuredInfs), gateways)
		}
		for _, inf := range unstructuredInfs {
			for _, o := range inf.GetStore().List() {
				if u, ok := o.(*unstructured.Unstructured); ok {
					docs = append(docs, unstructuredDoc(u))
				}
			}
		}
		sort.Slice(docs, func(i, j int) bool { return docs[i].name < docs[j].name })
		cfg, err := loader.loadDocs(docs)
		cfg.Generation = generation.Load()
		if err != nil {
			log.Warn("config: objects left out or kept at their last good version", "errors", len(unjoin(err)), "err", err)
		}
		log.Info("config: loaded from the API server", "namespaces", len(cfg.Cluster.Namespaces), "pods", len(cfg.Cluster.Pods),
			"services", len(cfg.Cluster.Services), "endpointslices", len(cfg.Cluster.EndpointSlices), "gateways", len(cfg.Cluster.Gateways), "policies", len(cfg.Policies))
		update(cfg)
	}
	rebuild()
	var recheckTick <-chan time.Time
	if gateways == nil {
		t := time.NewTicker(recheck)
		defer t.Stop()
		recheckTick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-recheckTick:
			served, err := gatewaysServedNow(ctx, disc)
			if err != nil {
				log.Debug("config: cannot ask the API server whether it serves Gateways; asking again later", "err", err)
			}
			if !served {
				continue
			}
			log.Info("config: the API server serves Gateways now: watching them")
			recheckTick = nil
			watchGateways()
			dfactory.Start(ctx.Done())
			// Rebuild once their first list is in (a cluster may have no Gateway: no event).
			wg.Add(1)
			go func(inf cache.SharedIndexInformer) {
				defer wg.Done()
				if cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
					kick()
				}
			}(gateways)
			continue
		}
		// Let a burst settle: a Deployment rollout is many events.
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(settle):
		}
		select {
		case <-changed:
		default:
		}
		rebuild()
	}
}

// typedDoc renders a typed object as the JSON document DirSource parses.
func typedDoc(kind, apiVersion string, o any) doc {
	var name string
	switch v := o.(type) {
	case *corev1.Namespace:
		name = v.Name
	case *corev1.Pod:
		name = v.Namespace + "/" + v.Name
	case *corev1.Service:
		name = v.Namespace + "/" + v.Name
	case *discoveryv1.EndpointSlice:
		name = v.Namespace + "/" + v.Name
	}
	d := doc{name: "kube:" + kind + "/" + name}
	obj, ok := o.(runtime.Object)
	if !ok {
		d.err = fmt.Errorf("%s: not a Kubernetes object", d.name)
		return d
	}
	// Informers' objects carry no apiVersion and kind: set them on a copy for the parser.
	obj = obj.DeepCopyObject()
	obj.GetObjectKind().SetGroupVersionKind(schema.FromAPIVersionAndKind(apiVersion, kind))
	d.data, d.err = json.Marshal(obj)
	return d
}

// unstructuredDoc renders a security.istio.io object or a Gateway as a JSON document.
func unstructuredDoc(u *unstructured.Unstructured) doc {
	d := doc{name: "kube:" + u.GetKind() + "/" + u.GetNamespace() + "/" + u.GetName()}
	u = u.DeepCopy()
	// Server-side fields the parsers have no use for. Of status, only a Gateway's
	// addresses are read (where the Gateway is reached); its conditions change often.
	unstructured.RemoveNestedField(u.Object, "metadata", "managedFields")
	addrs, hasAddrs, _ := unstructured.NestedFieldNoCopy(u.Object, "status", "addresses")
	unstructured.RemoveNestedField(u.Object, "status")
	if hasAddrs && u.GroupVersionKind().Group == GatewayGVR.Group && u.GetKind() == "Gateway" {
		u.Object["status"] = map[string]any{"addresses": addrs}
	}
	d.data, d.err = json.Marshal(u.Object)
	if d.err != nil {
		d.err = errors.Join(fmt.Errorf("%s", d.name), d.err)
	}
	return d
}

// gatewaysServed asks the API server whether it serves GatewayGVR, until it gets an
// answer: the first config must not leave the Gateways out of a cluster that has them.
// It fails only when ctx ends.
func gatewaysServed(ctx context.Context, disc discovery.DiscoveryInterface, log *slog.Logger) (bool, error) {
	wait := time.Second
	for {
		served, err := gatewaysServedNow(ctx, disc)
		if err == nil {
			return served, nil
		}
		log.Warn("config: cannot ask the API server whether it serves Gateways; retrying", "in", wait, "err", err)
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 30*time.Second)
	}
}

// gatewaysServedNow asks the API server once whether it serves GatewayGVR (its CRD is
// installed and established). A group version it does not know is an answer, not an error.
func gatewaysServedNow(ctx context.Context, disc discovery.DiscoveryInterface) (bool, error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	list, err := disc.ServerResourcesForGroupVersion(GatewayGVR.GroupVersion().String())
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	for _, r := range list.APIResources {
		if r.Name == GatewayGVR.Resource {
			return true, nil
		}
	}
	return false, nil
}
