// Package removal tells a stopping agent whether the agents are being removed from
// the cluster (their DaemonSet deleted: helm uninstall, kubectl delete) or merely
// restarted. Only a removal takes veil-cni and the capture off the node.
package removal

import (
	"context"
	"slices"
	"sync/atomic"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Watch follows one DaemonSet while the agent runs, so its deletion is seen when it
// happens: an uninstall deletes the RBAC that lets the agent read the DaemonSet right
// after, before the agent is stopped. It needs get, list and watch on that DaemonSet
// alone (resourceNames).
type Watch struct {
	client    kubernetes.Interface
	namespace string
	name      string
	gone      atomic.Bool // deleted, its pods with it
	orphaning atomic.Bool // being deleted with its pods kept (--cascade=orphan)
}

// Start follows namespace/name until ctx ends.
func Start(ctx context.Context, client kubernetes.Interface, namespace, name string) *Watch {
	w := &Watch{client: client, namespace: namespace, name: name}
	only := fields.OneTermEqualSelector("metadata.name", name).String()
	dss := client.AppsV1().DaemonSets(namespace)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = only
			return dss.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = only
			return dss.Watch(ctx, o)
		},
	}
	inf := cache.NewSharedIndexInformer(lw, &appsv1.DaemonSet{}, 0, cache.Indexers{})
	deleting := func(obj any) {
		ds, ok := obj.(*appsv1.DaemonSet)
		if !ok {
			return
		}
		switch {
		case ds.DeletionTimestamp == nil:
			// Present (again: a DaemonSet re-created after an orphaning delete).
			w.gone.Store(false)
			w.orphaning.Store(false)
		case slices.Contains(ds.Finalizers, metav1.FinalizerOrphanDependents):
			w.orphaning.Store(true) // replaced with its pods kept: not an uninstall
		default:
			w.gone.Store(true)
		}
	}
	inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    deleting,
		UpdateFunc: func(_, obj any) { deleting(obj) },
		DeleteFunc: func(any) {
			if !w.orphaning.Load() {
				w.gone.Store(true)
			}
		},
	})
	go inf.Run(ctx.Done())
	return w
}

// Removing reports whether the DaemonSet is being deleted with its pods. The API
// server's answer now decides when there is one (a DaemonSet present and not being
// deleted, or being deleted with its pods orphaned, is no removal); when it cannot
// answer (the uninstall deleted this agent's Role already), what the watch saw decides.
// An error means neither can tell; the caller keeps what it has (a restarted agent's
// node must stay in the mesh).
func (w *Watch) Removing(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ds, err := w.client.AppsV1().DaemonSets(w.namespace).Get(ctx, w.name, metav1.GetOptions{})
	switch {
	case err == nil && ds.DeletionTimestamp == nil:
		return false, nil
	case err == nil:
		return !slices.Contains(ds.Finalizers, metav1.FinalizerOrphanDependents), nil
	case apierrors.IsNotFound(err):
		return !w.orphaning.Load(), nil
	case w.gone.Load():
		return true, nil
	}
	return false, err
}
