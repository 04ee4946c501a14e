package controller

import (
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
)

// Placement maps each node to the identities of the pods scheduled on it: what the CA
// lets that node's agent obtain. Pods without a node (not yet scheduled) and
// host-network pods (never in the mesh) obtain nothing.
func Placement(td spiffeid.TrustDomain, pods []*cluster.Pod) (identity.Placement, error) {
	pl := identity.Placement{}
	for _, p := range pods {
		if p.Node == "" || p.HostNetwork {
			continue
		}
		id, err := identity.NewID(td, p.Namespace, p.ServiceAccount)
		if err != nil {
			return nil, fmt.Errorf("controller: pod %s/%s: %w", p.Namespace, p.Name, err)
		}
		pl.Add(p.Node, id)
	}
	return pl, nil
}
