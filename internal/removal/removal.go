// Package removal tells a stopping agent whether the agents are being removed from
// the cluster (their DaemonSet deleted: helm uninstall, kubectl delete) or merely
// restarted. Only a removal takes veil-cni and the capture off the node.
package removal

import (
	"context"
	"sync/atomic"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
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
	gone      atomic.Bool
}

// Start follows namespace/name until ctx ends.
func Start(ctx context.Context, client kubernetes.Interface, namespace, name string) *Watch {
	w := &Watch{client: client, namespace: namespace, name: name}
	lw := cache.NewListWatchFromClient(client.AppsV1().RESTClient(), "daemonsets", namespace, fields.OneTermEqualSelector("metadata.name", name))
	inf := cache.NewSharedIndexInformer(lw, &appsv1.DaemonSet{}, 0, cache.Indexers{})
	deleting := func(obj any) {
		if ds, ok := obj.(*appsv1.DaemonSet); ok && ds.DeletionTimestamp != nil {
			w.gone.Store(true)
		}
	}
	inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    deleting,
		UpdateFunc: func(_, obj any) { deleting(obj) },
		DeleteFunc: func(any) { w.gone.Store(true) },
	})
	go inf.Run(ctx.Done())
	return w
}

// Removing reports whether the DaemonSet is deleted or being deleted: as the watch saw
// it, else as the API server answers now. An error means it cannot tell; the caller
// keeps what it has (a restarted agent's node must stay in the mesh).
func (w *Watch) Removing(ctx context.Context) (bool, error) {
	if w.gone.Load() {
		return true, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ds, err := w.client.AppsV1().DaemonSets(w.namespace).Get(ctx, w.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return ds.DeletionTimestamp != nil, nil
}
