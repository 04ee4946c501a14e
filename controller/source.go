package controller

import (
	"context"
	"errors"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
)

// Config is everything the controller serves: the cluster's Namespaces, Pods, Services,
// EndpointSlices and Gateways, and the valid security.istio.io policies.
type Config struct {
	Cluster  *cluster.State
	Policies []*policy.Object
	// Generation orders configs across controller replicas (api.Push.generation): the
	// newest API server revision the config reflects; 0 for an unordered source.
	Generation uint64
}

// A Source produces the config. Run calls update with the whole config once it has read
// it, then again after every change, until ctx ends; calls are sequential. Each Config
// passed is new and is not modified afterwards. A Source keeps the last good version of
// an object while its new version is invalid. DirSource reads a directory of YAML;
// Kubernetes informers come next behind the same interface.
type Source interface {
	Run(ctx context.Context, update func(*Config)) error
}

// LivePlacement is the CA's WorkloadIndex following the config: node -> identities of
// the pods scheduled on it, replaced as a whole on every Update. Until the first Update
// it places nothing, so the CA issues nothing. Safe for concurrent use.
type LivePlacement struct {
	p atomic.Pointer[identity.Placement]
}

// Update replaces the placement with the pods of st. A pod whose identity cannot be
// formed (an invalid service account name) is left out and reported.
func (l *LivePlacement) Update(td spiffeid.TrustDomain, pods []*cluster.Pod) error {
	pl := identity.Placement{}
	var errs []error
	for _, p := range pods {
		one, err := Placement(td, []*cluster.Pod{p})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for node, ids := range one {
			for id := range ids {
				pl.Add(node, id)
			}
		}
	}
	l.p.Store(&pl)
	return errors.Join(errs...)
}

// IdentityOnNode implements identity.WorkloadIndex.
func (l *LivePlacement) IdentityOnNode(node string, id spiffeid.ID) bool {
	p := l.p.Load()
	return p != nil && p.IdentityOnNode(node, id)
}
