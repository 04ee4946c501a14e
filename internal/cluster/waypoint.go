package cluster

import (
	"fmt"
	"sort"
)

// Waypoint binding labels and values (ISTIO-SEMANTICS §5).
const (
	// WaypointForLabel on a Gateway (or its GatewayClass) says which traffic the
	// waypoint takes.
	WaypointForLabel = "istio.io/waypoint-for"
	// GatewayNameLabel marks the pods of a Gateway API gateway or waypoint.
	GatewayNameLabel = "gateway.networking.k8s.io/gateway-name"
	// PolicyPlacementAnnotation on a waypoint's pods says the waypoint runs veil's
	// policy placement ("veil"): it enforces the policies that select the workloads it
	// serves, so their agents may skip them for its connections. veil-controller sets
	// it on the waypoints it deploys; istiod's waypoints (Envoy) do not have it.
	PolicyPlacementAnnotation = "veilmesh.io/policy-placement"

	WaypointForService  = "service"
	WaypointForWorkload = "workload"
	WaypointForAll      = "all"
	WaypointForNone     = "none"
)

// Waypoint is a Gateway of class istio-waypoint with what routing needs of it.
type Waypoint struct {
	Gateway *Gateway
	// For is its istio.io/waypoint-for: service (the default), workload, all or none.
	For string
	// Pods are its ready pods with an address (labelled GatewayNameLabel in its
	// namespace), by name.
	Pods []*Pod
	// ServiceAccount is the one service account its pods run as: its identity.
	ServiceAccount string
	// EnforcesWorkloadPolicies reports whether every pod of the waypoint declares veil's
	// policy placement (PolicyPlacementAnnotation).
	EnforcesWorkloadPolicies bool
}

// TakesServices reports whether the waypoint takes traffic addressed to a Service.
func (w *Waypoint) TakesServices() bool {
	return w.For == WaypointForService || w.For == WaypointForAll
}

// TakesWorkloads reports whether the waypoint takes traffic addressed to a pod.
func (w *Waypoint) TakesWorkloads() bool {
	return w.For == WaypointForWorkload || w.For == WaypointForAll
}

// String is namespace/name.
func (w *Waypoint) String() string { return w.Gateway.Namespace + "/" + w.Gateway.Name }

// WaypointError says why an object bound to a waypoint cannot use it: connections to it
// fail rather than skip the waypoint.
type WaypointError struct {
	Namespace, Name string // the waypoint named by the binding
	Reason          string
}

func (e *WaypointError) Error() string {
	return fmt.Sprintf("waypoint %s/%s: %s", e.Namespace, e.Name, e.Reason)
}

// IsWaypointPod reports whether p runs a waypoint (a pod of a Gateway of class
// istio-waypoint): waypoints never get a waypoint themselves.
func (s *State) IsWaypointPod(p *Pod) bool {
	g := p.Labels[GatewayNameLabel]
	if g == "" {
		return false
	}
	gw := s.Gateway(p.Namespace, g)
	return gw != nil && gw.ClassName == WaypointClass
}

// Gateway returns the Gateway namespace/name, or nil.
func (s *State) Gateway(namespace, name string) *Gateway {
	for _, g := range s.Gateways {
		if g.Namespace == namespace && g.Name == name {
			return g
		}
	}
	return nil
}

// binding returns the waypoint an object's labels name, falling back on its namespace's:
// the name, the namespace to look in, and whether the namespace's label decided. name
// is "" when the object is not bound (no label, or "none").
func (s *State) binding(namespace string, labels map[string]string) (name, ns string, inherited bool) {
	name, ok := labels[UseWaypointLabel]
	src := labels
	if !ok {
		if n := s.Namespaces[namespace]; n != nil {
			name, ok = n.Labels[UseWaypointLabel]
			src = n.Labels
			inherited = true
		}
	}
	if !ok || name == "" || name == WaypointForNone {
		return "", "", false
	}
	ns = namespace
	if v := src[UseWaypointNamespaceLabel]; v != "" {
		ns = v
	}
	return name, ns, inherited
}

// Bindings resolves waypoint bindings against one State, resolving each waypoint once.
// Not safe for concurrent use.
type Bindings struct {
	st    *State
	cache map[[2]string]resolved
}

type resolved struct {
	w   *Waypoint
	err error
}

// Bindings returns a resolver of s's waypoint bindings.
func (s *State) Bindings() *Bindings { return &Bindings{st: s, cache: map[[2]string]resolved{}} }

// Resolve returns the waypoint ns/name, or why it cannot serve.
func (b *Bindings) Resolve(ns, name string) (*Waypoint, error) { return b.resolve(ns, name) }

func (b *Bindings) resolve(ns, name string) (*Waypoint, error) {
	k := [2]string{ns, name}
	r, ok := b.cache[k]
	if !ok {
		r.w, r.err = b.st.resolveWaypoint(ns, name)
		b.cache[k] = r
	}
	return r.w, r.err
}

// resolveWaypoint finds the waypoint ns/name and checks it can serve: a Gateway of class
// istio-waypoint, with at least one ready pod, whose pods' service accounts run no other
// pod (that identity would be trusted as the waypoint).
func (s *State) resolveWaypoint(ns, name string) (*Waypoint, error) {
	gw := s.Gateway(ns, name)
	if gw == nil {
		return nil, &WaypointError{ns, name, "no such Gateway"}
	}
	if gw.ClassName != WaypointClass {
		return nil, &WaypointError{ns, name, fmt.Sprintf("gatewayClassName is %q, not %s", gw.ClassName, WaypointClass)}
	}
	w := &Waypoint{Gateway: gw, For: gw.Labels[WaypointForLabel]}
	if w.For == "" {
		w.For = WaypointForService
	}
	switch w.For {
	case WaypointForService, WaypointForWorkload, WaypointForAll, WaypointForNone:
	default:
		return nil, &WaypointError{ns, name, fmt.Sprintf("label %s: %q is not service, workload, all or none", WaypointForLabel, w.For)}
	}
	sas := map[string]bool{}
	w.EnforcesWorkloadPolicies = true
	for _, p := range s.Pods {
		if p.Namespace == ns && p.Labels[GatewayNameLabel] == name && !p.HostNetwork {
			sas[p.ServiceAccount] = true
			w.ServiceAccount = p.ServiceAccount
			if p.Annotations[PolicyPlacementAnnotation] != "veil" {
				w.EnforcesWorkloadPolicies = false
			}
			if p.Ready && len(p.IPs) > 0 {
				w.Pods = append(w.Pods, p)
			}
		}
	}
	// One identity per waypoint: a pod that gives itself the Gateway's label under
	// another service account must not become trusted as the waypoint.
	if len(sas) > 1 {
		return nil, &WaypointError{ns, name, fmt.Sprintf("refused: its pods run as %d service accounts; a waypoint has one identity", len(sas))}
	}
	for _, p := range s.Pods {
		if p.Namespace == ns && sas[p.ServiceAccount] && p.Labels[GatewayNameLabel] != name {
			return nil, &WaypointError{ns, name, fmt.Sprintf("refused: its service account %q also runs pod %s, which is not this waypoint", p.ServiceAccount, p.Name)}
		}
	}
	if len(w.Pods) == 0 {
		return nil, &WaypointError{ns, name, "no ready waypoint pod"}
	}
	sort.Slice(w.Pods, func(i, j int) bool { return w.Pods[i].Name < w.Pods[j].Name })
	return w, nil
}

// ServiceWaypoint returns the waypoint that traffic to svc's addresses goes through:
// nil when svc is not bound, an error when the binding names a waypoint that cannot take
// it (absent, not ready, refused, or not taking service traffic).
func (b *Bindings) ServiceWaypoint(svc *Service) (*Waypoint, error) {
	if svc.Labels[GatewayNameLabel] != "" {
		return nil, nil // a gateway's or waypoint's own Service never gets a waypoint
	}
	name, ns, _ := b.st.binding(svc.Namespace, svc.Labels)
	if name == "" {
		return nil, nil
	}
	w, err := b.resolve(ns, name)
	if err != nil {
		return nil, err
	}
	if !w.TakesServices() {
		return nil, &WaypointError{ns, name, fmt.Sprintf("%s=%s does not take service traffic", WaypointForLabel, w.For)}
	}
	return w, nil
}

// PodWaypoint returns the waypoint that traffic addressed to p's own addresses goes
// through: nil when p is not bound, is a waypoint, or inherits from its namespace a
// waypoint that takes no workload traffic (ignored, as istiod does); an error when the
// binding names a waypoint that cannot take it.
func (b *Bindings) PodWaypoint(p *Pod) (*Waypoint, error) {
	if b.st.IsWaypointPod(p) {
		return nil, nil
	}
	name, ns, inherited := b.st.binding(p.Namespace, p.Labels)
	if name == "" {
		return nil, nil
	}
	w, err := b.resolve(ns, name)
	if err != nil {
		return nil, err
	}
	if !w.TakesWorkloads() {
		if inherited {
			return nil, nil
		}
		return nil, &WaypointError{ns, name, fmt.Sprintf("%s=%s does not take workload traffic", WaypointForLabel, w.For)}
	}
	return w, nil
}

// ServingWaypoints returns the waypoints that may carry traffic to p: its own (workload
// traffic) and those of the Services that select it (service traffic), each once. Errors
// of bindings are left out: those waypoints carry nothing.
func (b *Bindings) ServingWaypoints(p *Pod) []*Waypoint {
	var out []*Waypoint
	seen := map[*Gateway]bool{}
	add := func(w *Waypoint) {
		if w != nil && !seen[w.Gateway] {
			seen[w.Gateway] = true
			out = append(out, w)
		}
	}
	if w, err := b.PodWaypoint(p); err == nil {
		add(w)
	}
	for _, svc := range b.st.Services {
		if svc.Namespace != p.Namespace || len(svc.Selector) == 0 || !Selects(svc.Selector, p.Labels) {
			continue
		}
		if w, err := b.ServiceWaypoint(svc); err == nil {
			add(w)
		}
	}
	return out
}
