package lab

import (
	_ "embed"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"sort"
	"strings"

	"github.com/veilmesh/veil/internal/cluster"
	"sigs.k8s.io/yaml"
)

// Spec describes a lab: nodes, namespaces, pods and services. Addresses are assigned by
// the lab: node i is 10.99.0.(i+1) on the fabric, its pods 10.100.(i+1).(10+k), services
// 10.96.0.(10+n); with IPv6, fd00:99::(i+1), fd00:100:(i+1)::(10+k) and fd00:96::(10+n)
// (the same digits). Network chooses how pods are wired, after the common CNIs; Family
// which IP families they have.
type Spec struct {
	Name  string   `json:"name"`
	Nodes []string `json:"nodes"`
	// Family is the lab's IP families: "ipv4" (the default, also when empty), "ipv6"
	// (IPv6 only: nodes, pods, Services and the controller), or "dual" (each node, pod
	// and Service has an IPv4 and an IPv6 address, IPv4 first, as a dual-stack routed
	// CNI and kube-apiserver give them; the fabric carries both).
	Family string `json:"family,omitempty"`
	// Network is the pods' wiring:
	//   - "routed" (the default), as kindnet or Calico: each pod a /32 behind its own veth,
	//     a host route per pod, nodes routed to each other over the fabric;
	//   - "bridge", as flannel's cni0 or the bridge plugin: a node's pods share a /24 on a
	//     Linux bridge (cni0, the gateway), so frames between them are switched, not routed;
	//   - "overlay", as Calico or Cilium in VXLAN mode: routed pods, and other nodes' pods
	//     reached through a VXLAN device (vxlan0, also an uplink) instead of the fabric.
	Network    string          `json:"network,omitempty"`
	Namespaces []NamespaceSpec `json:"namespaces"`
	Pods       []PodSpec       `json:"pods"`
	Services   []ServiceSpec   `json:"services"`
}

// NamespaceSpec is a namespace and its labels (istio.io/dataplane-mode=ambient enrolls it).
type NamespaceSpec struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
}

// PodSpec is a pod running the lab's application on Ports (default [9080]).
type PodSpec struct {
	Name           string            `json:"name"`
	Namespace      string            `json:"namespace"`
	ServiceAccount string            `json:"serviceAccount,omitempty"`
	Node           string            `json:"node"`
	Labels         map[string]string `json:"labels,omitempty"`
	Ports          []uint16          `json:"ports,omitempty"`
	// Waypoint, when set, makes the pod a waypoint: it runs veil-waypoint for the
	// Gateway of that name (class istio-waypoint), which the lab also declares, with
	// istio.io/waypoint-for WaypointFor (default service).
	Waypoint    string `json:"waypoint,omitempty"`
	WaypointFor string `json:"waypointFor,omitempty"`
}

// ServiceSpec is a ClusterIP Service with one port.
type ServiceSpec struct {
	Name       string            `json:"name"`
	Namespace  string            `json:"namespace"`
	Port       uint16            `json:"port"`
	TargetPort uint16            `json:"targetPort,omitempty"`
	Selector   map[string]string `json:"selector"`
	// Labels are the Service's (istio.io/use-waypoint binds it to a waypoint).
	Labels map[string]string `json:"labels,omitempty"`
	// PortName and AppProtocol are the port's name and appProtocol: they tell a
	// waypoint which protocol to parse (http, http2, ...; default TCP).
	PortName    string `json:"portName,omitempty"`
	AppProtocol string `json:"appProtocol,omitempty"`
}

//go:embed default.yaml
var defaultSpec []byte

// DefaultSpec is the Bookinfo-shaped lab of `make demo`.
func DefaultSpec() *Spec {
	s, err := ParseSpec(defaultSpec)
	if err != nil {
		panic("lab: default spec: " + err.Error())
	}
	return s
}

// LoadSpec reads a spec file.
func LoadSpec(path string) (*Spec, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	s, err := ParseSpec(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

var (
	dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	// labName has no '-', so "veil-NAME-" prefixes the namespaces of one lab only.
	labName = regexp.MustCompile(`^[a-z0-9]{1,12}$`)
)

// CheckName refuses a lab name that is not 1 to 12 lowercase letters and digits.
func CheckName(name string) error {
	if !labName.MatchString(name) {
		return fmt.Errorf("lab name %q: want 1 to 12 lowercase letters and digits", name)
	}
	return nil
}

// ParseSpec decodes and checks a spec; unknown fields are errors.
func ParseSpec(b []byte) (*Spec, error) {
	var s Spec
	if err := yaml.UnmarshalStrict(b, &s); err != nil {
		return nil, fmt.Errorf("lab spec: %w", err)
	}
	return &s, s.validate()
}

func (s *Spec) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf("lab spec: "+format, args...)) }
	if err := CheckName(s.Name); err != nil {
		errs = append(errs, fmt.Errorf("lab spec: %w", err))
	}
	switch s.Family {
	case "", FamilyIPv4, FamilyIPv6, FamilyDual:
	default:
		bad("family: %q must be %s, %s or %s", s.Family, FamilyIPv4, FamilyIPv6, FamilyDual)
	}
	switch s.Network {
	case "":
		s.Network = NetworkRouted
	case NetworkRouted, NetworkBridge, NetworkOverlay:
	default:
		bad("network: %q must be %s, %s or %s", s.Network, NetworkRouted, NetworkBridge, NetworkOverlay)
	}
	if len(s.Nodes) == 0 || len(s.Nodes) > 200 {
		bad("nodes: want 1 to 200 nodes, got %d", len(s.Nodes))
	}
	nodes := map[string]bool{}
	for i, n := range s.Nodes {
		if !dnsLabel.MatchString(n) || nodes[n] {
			bad("nodes[%d]: %q is not a DNS label or is repeated", i, n)
		}
		nodes[n] = true
	}
	nss := map[string]bool{}
	for i, ns := range s.Namespaces {
		if !dnsLabel.MatchString(ns.Name) || nss[ns.Name] {
			bad("namespaces[%d].name: %q is not a DNS label or is repeated", i, ns.Name)
		}
		nss[ns.Name] = true
	}
	pods := map[string]bool{}
	perNode := map[string]int{}
	for i := range s.Pods {
		p := &s.Pods[i]
		key := p.Namespace + "/" + p.Name
		switch {
		case !dnsLabel.MatchString(p.Name) || pods[key]:
			bad("pods[%d].name: %q is not a DNS label or is repeated", i, p.Name)
		case !nss[p.Namespace]:
			bad("pods[%d].namespace: %q is not in namespaces", i, p.Namespace)
		case !nodes[p.Node]:
			bad("pods[%d].node: %q is not in nodes", i, p.Node)
		}
		pods[key] = true
		if perNode[p.Node]++; perNode[p.Node] > 200 {
			bad("pods[%d]: more than 200 pods on node %s", i, p.Node)
		}
		if p.ServiceAccount == "" {
			p.ServiceAccount = "default"
		}
		if len(p.Ports) == 0 {
			p.Ports = []uint16{9080}
		}
		if p.Waypoint != "" {
			if !dnsLabel.MatchString(p.Waypoint) || p.Waypoint == cluster.WaypointForNone {
				bad("pods[%d].waypoint: %q is not a DNS label, or is none", i, p.Waypoint)
			}
			switch p.WaypointFor {
			case "", cluster.WaypointForService, cluster.WaypointForWorkload, cluster.WaypointForAll, cluster.WaypointForNone:
			default:
				bad("pods[%d].waypointFor: %q must be service, workload, all or none", i, p.WaypointFor)
			}
			waypointLabels(p)
		} else if p.WaypointFor != "" {
			bad("pods[%d].waypointFor: only a waypoint pod (waypoint: NAME) takes it", i)
		}
		for j, port := range p.Ports {
			if port == 0 || port == 15001 || port == 15006 || port == 15008 {
				bad("pods[%d].ports[%d]: %d is not usable (0 or an agent port)", i, j, port)
			}
		}
	}
	for i := range s.Services {
		svc := &s.Services[i]
		switch {
		case !dnsLabel.MatchString(svc.Name):
			bad("services[%d].name: %q is not a DNS label", i, svc.Name)
		case !nss[svc.Namespace]:
			bad("services[%d].namespace: %q is not in namespaces", i, svc.Namespace)
		case svc.Port == 0:
			bad("services[%d].port: required", i)
		case len(svc.Selector) == 0:
			bad("services[%d].selector: required", i)
		}
		if svc.TargetPort == 0 {
			svc.TargetPort = svc.Port
		}
	}
	if len(s.Services) > 200 {
		bad("services: at most 200")
	}
	return errors.Join(errs...)
}

// The pod networks a Spec can have.
const (
	NetworkRouted  = "routed"
	NetworkBridge  = "bridge"
	NetworkOverlay = "overlay"
)

// overlayIP is a node's IPv4 address on the overlay (vxlan0); overlayIPs has all.
func (s *Spec) overlayIP(node string) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 98, 0, byte(s.nodeIndex(node) + 1)})
}

// overlayIPs are a node's addresses on the overlay, one per family.
func (s *Spec) overlayIPs(node string) []netip.Addr { return s.addrsOf(s.overlayIP(node)) }

// nodeIndex is a node's position, from 0.
func (s *Spec) nodeIndex(node string) int {
	for i, n := range s.Nodes {
		if n == node {
			return i
		}
	}
	return -1
}

// NodeIP is a node's fabric address (its primary one; NodeIPs has all).
func (s *Spec) NodeIP(node string) netip.Addr { return s.NodeIPs(node)[0] }

func (s *Spec) nodeIP4(node string) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 99, 0, byte(s.nodeIndex(node) + 1)})
}

// ControllerIP is the controller's IPv4 address on the fabric. An IPv6-only lab has
// the controller at its IPv6 twin, fd00:99::254, instead.
func ControllerIP() netip.Addr { return netip.MustParseAddr("10.99.0.254") }

// PodIP is a pod's address (its primary one, status.podIP; PodIPs has all).
func (s *Spec) PodIP(p *PodSpec) netip.Addr { return s.PodIPs(p)[0] }

func (s *Spec) podIP4(p *PodSpec) netip.Addr {
	k := 0
	for i := range s.Pods {
		if &s.Pods[i] == p {
			break
		}
		if s.Pods[i].Node == p.Node {
			k++
		}
	}
	return netip.AddrFrom4([4]byte{10, 100, byte(s.nodeIndex(p.Node) + 1), byte(10 + k)})
}

// gateway is the node-side IPv4 address pods on node use as their next hop (gateway6
// is the IPv6 one).
func (s *Spec) gateway(node string) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 100, byte(s.nodeIndex(node) + 1), 1})
}

// ServiceIP is a Service's ClusterIP (its primary one, spec.clusterIP; ServiceIPs has
// all).
func (s *Spec) ServiceIP(i int) netip.Addr { return s.ServiceIPs(i)[0] }

func (s *Spec) serviceIP4(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 96, 0, byte(10 + i)})
}

// Pod finds a pod by "namespace/name", or by name when it is unique.
func (s *Spec) Pod(ref string) (*PodSpec, error) {
	ns, name, qualified := strings.Cut(ref, "/")
	if !qualified {
		name = ns
	}
	var found []*PodSpec
	for i := range s.Pods {
		p := &s.Pods[i]
		if p.Name == name && (!qualified || p.Namespace == ns) {
			found = append(found, p)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("no pod %q in lab %s", ref, s.Name)
	case 1:
		return found[0], nil
	}
	return nil, fmt.Errorf("pod name %q is ambiguous: say namespace/name", ref)
}

// ClusterYAML renders the lab's Namespaces, ServiceAccounts, Pods and Services as
// Kubernetes manifests: the controller's and agents' view of the cluster, from the config
// directory or, in a kube lab, from the API server, where they are applied (a Pod's status
// through its status subresource, as its kubelet would write it).
func (s *Spec) ClusterYAML() []byte {
	var b strings.Builder
	doc := func(v any) {
		y, err := yaml.Marshal(v)
		if err != nil {
			panic(err)
		}
		b.WriteString("---\n")
		b.Write(y)
	}
	for _, ns := range s.Namespaces {
		doc(map[string]any{"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": ns.Name, "labels": ns.Labels}})
	}
	accounts := map[string]bool{}
	for _, p := range s.Pods {
		if key := p.Namespace + "/" + p.ServiceAccount; !accounts[key] {
			accounts[key] = true
			doc(map[string]any{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": map[string]any{"name": p.ServiceAccount, "namespace": p.Namespace}})
		}
	}
	for i := range s.Pods {
		p := &s.Pods[i]
		var ports []map[string]any
		for _, port := range p.Ports {
			ports = append(ports, map[string]any{"containerPort": port})
		}
		doc(map[string]any{
			"apiVersion": "v1", "kind": "Pod",
			"metadata": podMeta(p),
			"spec": map[string]any{"serviceAccountName": p.ServiceAccount, "nodeName": p.Node,
				"containers": []map[string]any{{"name": "app", "image": labAppImage, "ports": ports}}},
			"status": runningStatus(s.PodIPs(p), s.NodeIPs(p.Node), "app", labAppImage),
		})
		if p.Waypoint != "" {
			doc(waypointGateway(p, s.PodIPs(p)))
		}
	}
	for i, svc := range s.Services {
		port := map[string]any{"port": svc.Port, "targetPort": svc.TargetPort}
		if svc.PortName != "" {
			port["name"] = svc.PortName
		}
		if svc.AppProtocol != "" {
			port["appProtocol"] = svc.AppProtocol
		}
		spec := map[string]any{"clusterIP": s.ServiceIP(i).String(), "selector": svc.Selector,
			"ports": []map[string]any{port}}
		if s.has6() {
			// As kube-apiserver fills them in: a VIP per family, the primary first.
			var ips, fams []string
			for _, a := range s.ServiceIPs(i) {
				ips = append(ips, a.String())
				fams = append(fams, map[bool]string{true: "IPv4", false: "IPv6"}[a.Is4()])
			}
			policy := "SingleStack"
			if len(ips) > 1 {
				policy = "RequireDualStack"
			}
			spec["clusterIPs"], spec["ipFamilies"], spec["ipFamilyPolicy"] = ips, fams, policy
		}
		doc(map[string]any{
			"apiVersion": "v1", "kind": "Service",
			"metadata": map[string]any{"name": svc.Name, "namespace": svc.Namespace, "labels": svc.Labels},
			"spec":     spec,
		})
	}
	return []byte(b.String())
}

// labAppImage names what a lab pod runs (`veilctl lab app`); no image is pulled.
const labAppImage = "veilctl-lab-app"

// runningStatus is the status of a running, ready pod at ips on the node at hosts (the
// primary address first), whose one container runs image.
func runningStatus(ips, hosts []netip.Addr, container, image string) map[string]any {
	list := func(as []netip.Addr) []map[string]any {
		var l []map[string]any
		for _, a := range as {
			l = append(l, map[string]any{"ip": a.String()})
		}
		return l
	}
	return map[string]any{"phase": "Running",
		"podIP": ips[0].String(), "podIPs": list(ips), "hostIP": hosts[0].String(), "hostIPs": list(hosts),
		"conditions": []map[string]any{{"type": "Ready", "status": "True"}},
		"containerStatuses": []map[string]any{{"name": container, "image": image, "imageID": "", "ready": true,
			"restartCount": 0, "started": true, "state": map[string]any{"running": map[string]any{}}}}}
}

// sortedNodes returns node names in order, for stable output.
func (s *Spec) sortedNodes() []string {
	n := append([]string(nil), s.Nodes...)
	sort.Strings(n)
	return n
}
