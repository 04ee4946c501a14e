package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/veilmesh/veil/policy"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
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

// KubeSource is a Source that watches a Kubernetes API server with client-go informers:
// Namespaces, Pods, Services, EndpointSlices and the security.istio.io kinds. Every
// object goes through the same parsing, validation and last-good bookkeeping as a file
// of DirSource (each object is its own document), so a policy that stops validating keeps
// its last good version and a bad object never loosens what is enforced. Finished pods
// (Succeeded, Failed) are not workloads.
//
// Informers relist after a watch breaks (an API server restart); while the API server is
// unreachable the last config stays served. Run waits for the first full list before the
// first update, so a controller never serves a partial cluster.
type KubeSource struct {
	// Config reaches the API server. Required.
	Config *rest.Config
	// Policy are the options policies are validated with.
	Policy policy.Options
	// Settle is how long a burst of changes is let settle before the config is rebuilt.
	// Default 100ms.
	Settle time.Duration
	Log    *slog.Logger
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
	factory.Start(ctx.Done())
	dfactory.Start(ctx.Done())
	defer factory.Shutdown()
	defer dfactory.Shutdown()

	var synced []cache.InformerSynced
	for _, t := range typed {
		synced = append(synced, t.inf.HasSynced)
	}
	for _, inf := range dynamicInfs {
		synced = append(synced, inf.HasSynced)
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
		for _, inf := range dynamicInfs {
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
			"services", len(cfg.Cluster.Services), "endpointslices", len(cfg.Cluster.EndpointSlices), "policies", len(cfg.Policies))
		update(cfg)
	}
	rebuild()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
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

// unstructuredDoc renders a security.istio.io object as a JSON document.
func unstructuredDoc(u *unstructured.Unstructured) doc {
	d := doc{name: "kube:" + u.GetKind() + "/" + u.GetNamespace() + "/" + u.GetName()}
	u = u.DeepCopy()
	// Server-side fields the policy parser has no use for.
	unstructured.RemoveNestedField(u.Object, "metadata", "managedFields")
	unstructured.RemoveNestedField(u.Object, "status")
	d.data, d.err = json.Marshal(u.Object)
	if d.err != nil {
		d.err = errors.Join(fmt.Errorf("%s", d.name), d.err)
	}
	return d
}
