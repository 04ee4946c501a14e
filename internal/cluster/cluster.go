package cluster

import (
	"net/netip"
	"sort"
)

// The ambient enrollment label and its values (ISTIO-SEMANTICS §5).
const (
	DataplaneModeLabel = "istio.io/dataplane-mode"
	DataplaneAmbient   = "ambient"
	DataplaneNone      = "none"
	// SidecarStatusAnnotation marks a pod with an Istio sidecar: never enrolled.
	SidecarStatusAnnotation = "sidecar.istio.io/status"
)

// Namespace is a core/v1 Namespace.
type Namespace struct {
	Name   string
	Labels map[string]string
}

// Pod is what the data plane needs of a core/v1 Pod.
type Pod struct {
	Namespace string
	Name      string
	// UID is metadata.uid: it tells a pod from an earlier one of the same name (the CNI
	// plugin enrolls pods by it). Empty in hand-written manifests.
	UID            string
	ServiceAccount string // "default" when the manifest names none
	Node           string // spec.nodeName; empty while unscheduled
	Labels         map[string]string
	Annotations    map[string]string
	IPs            []netip.Addr // status.podIPs (status.podIP first)
	// HostIPs are the addresses of the pod's node (status.hostIPs, status.hostIP first).
	HostIPs     []netip.Addr
	HostNetwork bool
	// Ports are the containers' declared ports; NamedPorts maps the named ones, for
	// Services' named targetPorts.
	Ports      []uint16
	NamedPorts map[string]uint16
	// Ready is the Ready condition; a pod with no conditions counts as ready (a
	// hand-written manifest), one with Ready=False does not.
	Ready bool
	// Source names the file and document the pod came from.
	Source string
}

// Service is a core/v1 Service.
type Service struct {
	Namespace  string
	Name       string
	Labels     map[string]string
	ClusterIPs []netip.Addr // none for a headless Service
	Selector   map[string]string
	Ports      []ServicePort
	Source     string
}

// ServicePort maps a Service port to the pods' port. Only TCP ports matter to veil.
type ServicePort struct {
	Name     string
	Protocol string // TCP, UDP or SCTP
	// AppProtocol is spec.ports[].appProtocol: with the name's prefix, it says which
	// protocol a waypoint parses (HTTP, HTTP/2, else TCP).
	AppProtocol string
	Port        uint16
	TargetPort  uint16 // 0 when the target port is named: resolved per pod
	TargetName  string // the named target port, if any
}

// EndpointSlice is a discovery.k8s.io/v1 EndpointSlice: the endpoints of a Service
// without a selector (default/kubernetes, endpoints managed by hand or by another
// controller) come from these.
type EndpointSlice struct {
	Namespace string
	Name      string
	Service   string // the kubernetes.io/service-name label
	Ports     []EndpointPort
	Endpoints []Endpoint
	Source    string
}

// EndpointPort is a port of an EndpointSlice: Name matches the Service port's name.
type EndpointPort struct {
	Name     string
	Protocol string // TCP, UDP or SCTP
	Port     uint16
}

// Endpoint is one endpoint of a slice: Ready is its ready condition (absent means ready).
type Endpoint struct {
	Addresses []netip.Addr
	Ready     bool
}

// The Gateway API as Istio ambient uses it for waypoints: a Gateway of class
// istio-waypoint is a waypoint, and a namespace, Service or pod labelled use-waypoint
// (naming the Gateway, in the namespace use-waypoint-namespace names, else its own)
// sends its traffic through it.
const (
	WaypointClass             = "istio-waypoint"
	UseWaypointLabel          = "istio.io/use-waypoint"
	UseWaypointNamespaceLabel = "istio.io/use-waypoint-namespace"
)

// Gateway is a gateway.networking.k8s.io Gateway (v1 or v1beta1). Ambient's waypoints
// are Gateways of class WaypointClass.
type Gateway struct {
	Namespace string
	Name      string
	ClassName string // spec.gatewayClassName
	Listeners []GatewayListener
	// Addresses are the IP addresses of status.addresses (type IPAddress, or no type),
	// each once; Hostnames the values of its Hostname addresses. Other address types
	// (NamedAddress, implementation-specific ones) are not kept.
	Addresses []netip.Addr
	Hostnames []string
	Labels    map[string]string
	Source    string
}

// GatewayListener is one of a Gateway's spec.listeners.
type GatewayListener struct {
	Name     string
	Port     uint16
	Protocol string // HTTP, HTTPS, TLS, TCP, UDP, HBONE (a waypoint's), ...
}

// State is a consistent view of the cluster's objects.
type State struct {
	Namespaces     map[string]*Namespace
	Pods           []*Pod
	Services       []*Service
	EndpointSlices []*EndpointSlice
	Gateways       []*Gateway
}

// SliceEndpoint is a ready endpoint of a Service from its EndpointSlices: an address and
// the port the Service port of that name reaches there.
type SliceEndpoint struct {
	Addr  netip.Addr
	Ports map[string]uint16 // by Service port name ("" for an unnamed port); TCP only
}

// SliceEndpoints returns the ready endpoints the EndpointSlices of svc list, in a stable
// order, each address once.
func (s *State) SliceEndpoints(svc *Service) []SliceEndpoint {
	var out []SliceEndpoint
	seen := map[netip.Addr]bool{}
	for _, sl := range s.EndpointSlices {
		if sl.Namespace != svc.Namespace || sl.Service != svc.Name {
			continue
		}
		ports := map[string]uint16{}
		for _, p := range sl.Ports {
			if p.Protocol == "TCP" {
				ports[p.Name] = p.Port
			}
		}
		for _, e := range sl.Endpoints {
			if !e.Ready {
				continue
			}
			for _, a := range e.Addresses {
				if !seen[a] {
					seen[a] = true
					out = append(out, SliceEndpoint{Addr: a, Ports: ports})
				}
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Addr.Less(out[j].Addr) })
	return out
}

// Enrolled reports whether p is in the mesh as istio-cni decides: the pod is labelled
// ambient, or its namespace is and the pod is not labelled none; never host-network
// pods or pods with a sidecar.
func (s *State) Enrolled(p *Pod) bool {
	if p.HostNetwork {
		return false
	}
	if _, sidecar := p.Annotations[SidecarStatusAnnotation]; sidecar {
		return false
	}
	switch p.Labels[DataplaneModeLabel] {
	case DataplaneAmbient:
		return true
	case DataplaneNone:
		return false
	}
	ns := s.Namespaces[p.Namespace]
	return ns != nil && ns.Labels[DataplaneModeLabel] == DataplaneAmbient
}

// Endpoints returns the ready pods with an IP that svc selects, in a stable order. A
// Service without a selector has no endpoints here (EndpointSlices are not modelled).
func (s *State) Endpoints(svc *Service) []*Pod {
	if len(svc.Selector) == 0 {
		return nil
	}
	var out []*Pod
	for _, p := range s.Pods {
		if p.Namespace == svc.Namespace && p.Ready && len(p.IPs) > 0 && !p.HostNetwork && Selects(svc.Selector, p.Labels) {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// TargetPortOn returns the pod port that Service port sp reaches on p: its number, or
// the pod's container port of that name. ok is false when p has no such named port.
func (sp ServicePort) TargetPortOn(p *Pod) (port uint16, ok bool) {
	if sp.TargetName == "" {
		return sp.TargetPort, true
	}
	port, ok = p.NamedPorts[sp.TargetName]
	return port, ok
}

// Selects reports whether every key/value of selector is in labels.
func Selects(selector, labels map[string]string) bool {
	for k, v := range selector {
		if lv, ok := labels[k]; !ok || lv != v {
			return false
		}
	}
	return true
}
