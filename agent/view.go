package agent

import (
	"net/netip"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
)

// workload is a pod as the data path needs it.
type workload struct {
	pod      *cluster.Pod
	id       spiffeid.ID
	enrolled bool
	local    bool // scheduled on this node
	// waypoint is the waypoint that traffic addressed to the pod goes through, or
	// waypointErr why its binding cannot be used (connections to it then fail).
	waypoint    *cluster.Waypoint
	waypointErr error
	// isWaypoint marks a waypoint's pod.
	isWaypoint bool
	// servedBy, for this node's pods, are the identities of the waypoints that may carry
	// traffic to the pod (its own and those of the Services that select it, ready or
	// not), each true when that waypoint enforces the pod's own policies (it declares
	// veil's policy placement).
	servedBy map[spiffeid.ID]bool
}

func (w *workload) String() string { return w.pod.Namespace + "/" + w.pod.Name }

// service is a Service VIP with its endpoints: the pods its selector picks, or, for a
// Service without a selector, the addresses its EndpointSlices list (pods or not).
type service struct {
	svc       *cluster.Service
	endpoints []*workload
	slices    []cluster.SliceEndpoint
	next      atomic.Uint32 // round robin over endpoints
	// waypoint is the waypoint that traffic to the Service's addresses goes through, or
	// waypointErr why its binding cannot be used (connections to it then fail).
	waypoint    *cluster.Waypoint
	waypointErr error
}

// view is the agent's immutable picture of the cluster, swapped whole on every change.
type view struct {
	state *cluster.State
	byIP  map[netip.Addr]*workload
	vips  map[netip.Addr]*service
	local []*workload // enrolled pods on this node
	// pods are all the pods of this node (enrolled or not, host network excluded),
	// including any whose address is in conflicts: the capture follows these, so an
	// address conflict never takes a pod out of the capture.
	pods []*workload
	// nodeIDs maps each node address (status.hostIPs) to the identities of the pods
	// that node runs: who may open a tunnel from that address without Forwarded.
	nodeIDs map[netip.Addr]map[spiffeid.ID]bool
	// startingIDs maps each node address to the identities of that node's pods that have
	// no address yet (just started: their CNI enrolled them before the controller
	// published their address): who may name a source address no workload owns yet.
	startingIDs map[netip.Addr]map[spiffeid.ID]bool
	// conflicts are addresses claimed by more than one pod, left out of byIP.
	conflicts []netip.Addr
}

// newView builds the view of st for node; the pods in cniEnrolled are enrolled whatever
// their labels say (the CNI plugin decided from the API server's labels, newer than st).
func newView(st *cluster.State, node string, td spiffeid.TrustDomain, cniEnrolled map[podKey]bool) *view {
	v := &view{state: st, byIP: map[netip.Addr]*workload{}, vips: map[netip.Addr]*service{},
		nodeIDs: map[netip.Addr]map[spiffeid.ID]bool{}, startingIDs: map[netip.Addr]map[spiffeid.ID]bool{}}
	conflicts := map[netip.Addr]bool{}
	bind := st.Bindings()
	// A node's addresses, from any of its pods that reports them: a pod that has just
	// started (no address yet, or no status at all) still counts for its node.
	nodeAddrs := map[string][]netip.Addr{}
	for _, p := range st.Pods {
		if p.Node != "" && len(p.HostIPs) > 0 && len(nodeAddrs[p.Node]) == 0 {
			nodeAddrs[p.Node] = p.HostIPs
		}
	}
	for _, p := range st.Pods {
		if p.HostNetwork {
			continue
		}
		id, err := identity.NewID(td, p.Namespace, p.ServiceAccount)
		if err != nil {
			continue // a name that cannot be an identity cannot be in the mesh
		}
		hosts := p.HostIPs
		if len(hosts) == 0 {
			hosts = nodeAddrs[p.Node]
		}
		ids := v.nodeIDs
		if len(p.IPs) == 0 {
			ids = v.startingIDs
		}
		for _, h := range hosts {
			if ids[h] == nil {
				ids[h] = map[spiffeid.ID]bool{}
			}
			ids[h][id] = true
		}
		if len(p.IPs) == 0 {
			continue
		}
		w := &workload{pod: p, id: id, enrolled: st.Enrolled(p) || cniEnrolled[podKey{p.Namespace, p.Name}], local: p.Node == node,
			isWaypoint: st.IsWaypointPod(p)}
		w.waypoint, w.waypointErr = bind.PodWaypoint(p)
		if w.local {
			// Only this node's pods are ever a destination the agent decides for.
			for _, wp := range bind.ServingWaypoints(p) {
				w.servedBy = waypointIDs(td, w.servedBy, wp)
			}
		}
		for _, ip := range p.IPs {
			if other := v.byIP[ip]; other != nil && other != w {
				conflicts[ip] = true
			}
			v.byIP[ip] = w
		}
		if w.local && w.enrolled {
			v.local = append(v.local, w)
		}
		if w.local {
			v.pods = append(v.pods, w)
		}
	}
	// Two pods claiming one address would mix up identities: neither gets it (fail
	// closed) until the conflict is gone.
	for ip := range conflicts {
		delete(v.byIP, ip)
		v.conflicts = append(v.conflicts, ip)
	}
	for _, s := range st.Services {
		sv := &service{svc: s}
		for _, p := range st.Endpoints(s) {
			if w := v.byIP[p.IPs[0]]; w != nil {
				sv.endpoints = append(sv.endpoints, w)
			}
		}
		if len(s.Selector) == 0 {
			sv.slices = st.SliceEndpoints(s)
		}
		sv.waypoint, sv.waypointErr = bind.ServiceWaypoint(s)
		for _, ip := range s.ClusterIPs {
			v.vips[ip] = sv
		}
	}
	return v
}

// waypointIDs adds wp's identity to ids (allocated when nil), true when wp enforces the
// workloads' own policies, and returns it.
func waypointIDs(td spiffeid.TrustDomain, ids map[spiffeid.ID]bool, wp *cluster.Waypoint) map[spiffeid.ID]bool {
	if wp == nil {
		return ids
	}
	id, err := identity.NewID(td, wp.Gateway.Namespace, wp.ServiceAccount)
	if err != nil {
		return ids
	}
	if ids == nil {
		ids = map[spiffeid.ID]bool{}
	}
	ids[id] = ids[id] || wp.EnforcesWorkloadPolicies
	return ids
}

// policyWorkloads converts the cluster's pods into the policy engine's workloads.
func policyWorkloads(st *cluster.State) []*policy.Workload {
	out := make([]*policy.Workload, 0, len(st.Pods))
	for _, p := range st.Pods {
		if p.HostNetwork {
			continue
		}
		out = append(out, &policy.Workload{
			Namespace:      p.Namespace,
			Name:           p.Name,
			Labels:         p.Labels,
			ServiceAccount: p.ServiceAccount,
			IPs:            p.IPs,
			Source:         p.Source,
		})
	}
	return out
}

// localEnrolled returns the enrolled pod of this node that owns ip, or nil.
func (v *view) localEnrolled(ip netip.Addr) *workload {
	if w := v.byIP[ip.Unmap()]; w != nil && w.local && w.enrolled {
		return w
	}
	return nil
}
