package identity

import "github.com/spiffe/go-spiffe/v2/spiffeid"

// Placement is a fixed WorkloadIndex: node name -> identities of the pods scheduled on
// it. Build it, then share it read-only; it is not safe for concurrent modification.
type Placement map[string]map[spiffeid.ID]struct{}

// Add records that a pod with identity id runs on node.
func (p Placement) Add(node string, id spiffeid.ID) {
	ids := p[node]
	if ids == nil {
		ids = make(map[spiffeid.ID]struct{})
		p[node] = ids
	}
	ids[id] = struct{}{}
}

// IdentityOnNode implements WorkloadIndex.
func (p Placement) IdentityOnNode(node string, id spiffeid.ID) bool {
	_, ok := p[node][id]
	return ok
}
