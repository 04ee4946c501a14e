package api

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Key identifies a Resource: its kind, namespace (empty for a Namespace) and name. It is
// comparable, for use as a map key.
type Key struct {
	Kind      Kind
	Namespace string
	Name      string
}

// String returns "Kind namespace/name", or "Kind name" for a Namespace.
func (k Key) String() string {
	kind := strings.TrimPrefix(k.Kind.String(), "KIND_")
	if k.Namespace == "" {
		return kind + " " + k.Name
	}
	return kind + " " + k.Namespace + "/" + k.Name
}

// Proto returns k as a ResourceKey message.
func (k Key) Proto() *ResourceKey {
	return &ResourceKey{Kind: k.Kind, Namespace: k.Namespace, Name: k.Name}
}

// Kinds are the kinds this release decodes, sent in Subscribe.
func Kinds() []Kind {
	return []Kind{Kind_KIND_NAMESPACE, Kind_KIND_WORKLOAD, Kind_KIND_SERVICE, Kind_KIND_PEER_AUTHENTICATION,
		Kind_KIND_AUTHORIZATION_POLICY, Kind_KIND_REQUEST_AUTHENTICATION, Kind_KIND_ENDPOINT_SLICE, Kind_KIND_GATEWAY}
}

// LegacyKinds are what an agent decodes whose Subscribe lists no kinds (a release from
// before the field).
func LegacyKinds() []Kind {
	return []Kind{Kind_KIND_NAMESPACE, Kind_KIND_WORKLOAD, Kind_KIND_SERVICE, Kind_KIND_PEER_AUTHENTICATION,
		Kind_KIND_AUTHORIZATION_POLICY, Kind_KIND_REQUEST_AUTHENTICATION}
}

// PolicyKey returns the policy.Key of a policy's Key; ok is false for other kinds.
func (k Key) PolicyKey() (pk policy.Key, ok bool) {
	kind, ok := policyKinds[k.Kind]
	return policy.Key{Kind: kind, Namespace: k.Namespace, Name: k.Name}, ok
}

var policyKinds = map[Kind]policy.Kind{
	Kind_KIND_PEER_AUTHENTICATION:    policy.KindPeerAuthentication,
	Kind_KIND_AUTHORIZATION_POLICY:   policy.KindAuthorizationPolicy,
	Kind_KIND_REQUEST_AUTHENTICATION: policy.KindRequestAuthentication,
}

// ErrInvalid marks a message that does not convert: a missing name, a malformed
// address, a port out of range, a policy without a spec. Errors wrapping it name the
// resource and the field.
var ErrInvalid = errors.New("invalid")

type fieldError struct {
	what, field, msg string
}

func (e *fieldError) Error() string {
	if e.field == "" {
		return e.what + ": " + e.msg
	}
	return e.what + ": " + e.field + ": " + e.msg
}
func (e *fieldError) Is(target error) bool { return target == ErrInvalid }

func invalid(what, field, format string, args ...any) error {
	return &fieldError{what, field, fmt.Sprintf(format, args...)}
}

// KeyFromProto checks a ResourceKey and returns it as a Key.
func KeyFromProto(rk *ResourceKey) (Key, error) {
	k := Key{Kind: rk.GetKind(), Namespace: rk.GetNamespace(), Name: rk.GetName()}
	if _, known := Kind_name[int32(k.Kind)]; !known || k.Kind == Kind_KIND_UNSPECIFIED {
		return k, invalid("removed "+k.Namespace+"/"+k.Name, "kind", "%d is not a known kind", int32(k.Kind))
	}
	if k.Name == "" {
		return k, invalid("removed "+k.String(), "name", "required")
	}
	if (k.Kind == Kind_KIND_NAMESPACE) != (k.Namespace == "") {
		return k, invalid("removed "+k.String(), "namespace", "must be empty for a Namespace and set for other kinds")
	}
	return k, nil
}

// Key returns the key of r: kind, namespace and name as its content says. It does not
// check the content; see Decode.
func (r *Resource) Key() Key {
	switch v := r.GetResource().(type) {
	case *Resource_Namespace:
		return Key{Kind: Kind_KIND_NAMESPACE, Name: v.Namespace.GetName()}
	case *Resource_Workload:
		return Key{Kind: Kind_KIND_WORKLOAD, Namespace: v.Workload.GetNamespace(), Name: v.Workload.GetName()}
	case *Resource_Service:
		return Key{Kind: Kind_KIND_SERVICE, Namespace: v.Service.GetNamespace(), Name: v.Service.GetName()}
	case *Resource_EndpointSlice:
		return Key{Kind: Kind_KIND_ENDPOINT_SLICE, Namespace: v.EndpointSlice.GetNamespace(), Name: v.EndpointSlice.GetName()}
	case *Resource_Gateway:
		return Key{Kind: Kind_KIND_GATEWAY, Namespace: v.Gateway.GetNamespace(), Name: v.Gateway.GetName()}
	case *Resource_Policy:
		k := Key{Namespace: v.Policy.GetMetadata().GetNamespace(), Name: v.Policy.GetMetadata().GetName()}
		switch v.Policy.GetSpec().(type) {
		case *Policy_PeerAuthentication:
			k.Kind = Kind_KIND_PEER_AUTHENTICATION
		case *Policy_AuthorizationPolicy:
			k.Kind = Kind_KIND_AUTHORIZATION_POLICY
		case *Policy_RequestAuthentication:
			k.Kind = Kind_KIND_REQUEST_AUTHENTICATION
		}
		return k
	}
	return Key{}
}

// Decoded is a Resource converted: exactly one field is set.
type Decoded struct {
	Namespace *cluster.Namespace
	Pod       *cluster.Pod
	Service   *cluster.Service
	Slice     *cluster.EndpointSlice
	Gateway   *cluster.Gateway
	Policy    *policy.Object
}

// Decode checks r and converts it to the type the agent works with. Errors wrap
// ErrInvalid and name the resource and field. It never panics and is safe for concurrent
// use.
func (r *Resource) Decode() (Key, Decoded, error) {
	k := r.Key()
	var d Decoded
	var err error
	switch v := r.GetResource().(type) {
	case *Resource_Namespace:
		d.Namespace, err = decodeNamespace(v.Namespace)
	case *Resource_Workload:
		d.Pod, err = decodeWorkload(v.Workload)
	case *Resource_Service:
		d.Service, err = decodeService(v.Service)
	case *Resource_EndpointSlice:
		d.Slice, err = decodeEndpointSlice(v.EndpointSlice)
	case *Resource_Gateway:
		d.Gateway, err = decodeGateway(v.Gateway)
	case *Resource_Policy:
		d.Policy, err = decodePolicy(k, v.Policy)
	default:
		err = invalid("resource", "", "empty (no namespace, workload, service, endpoint slice, gateway or policy set)")
	}
	return k, d, err
}

func checkName(what, namespace, name string, namespaced bool) error {
	if name == "" {
		return invalid(what, "name", "required")
	}
	if namespaced && namespace == "" {
		return invalid(what, "namespace", "required")
	}
	return nil
}

func decodeNamespace(n *Namespace) (*cluster.Namespace, error) {
	if err := checkName("namespace", "", n.GetName(), false); err != nil {
		return nil, err
	}
	return &cluster.Namespace{Name: n.GetName(), Labels: n.GetLabels()}, nil
}

func decodeAddrs(what, field string, raw [][]byte) ([]netip.Addr, error) {
	var out []netip.Addr
	for i, b := range raw {
		a, ok := netip.AddrFromSlice(b)
		if !ok {
			return nil, invalid(what, fmt.Sprintf("%s[%d]", field, i), "%d bytes is not an IPv4 or IPv6 address", len(b))
		}
		a = a.Unmap()
		if !a.IsValid() || a.IsUnspecified() {
			return nil, invalid(what, fmt.Sprintf("%s[%d]", field, i), "%v is not a usable address", a)
		}
		for _, x := range out {
			if x == a {
				return nil, invalid(what, fmt.Sprintf("%s[%d]", field, i), "%v is listed twice", a)
			}
		}
		out = append(out, a)
	}
	return out, nil
}

func decodeWorkload(w *Workload) (*cluster.Pod, error) {
	what := "workload " + w.GetNamespace() + "/" + w.GetName()
	if err := checkName(what, w.GetNamespace(), w.GetName(), true); err != nil {
		return nil, err
	}
	if w.GetServiceAccount() == "" {
		return nil, invalid(what, "service_account", "required")
	}
	ips, err := decodeAddrs(what, "ips", w.GetIps())
	if err != nil {
		return nil, err
	}
	hostIPs, err := decodeAddrs(what, "host_ips", w.GetHostIps())
	if err != nil {
		return nil, err
	}
	p := &cluster.Pod{
		Namespace:      w.GetNamespace(),
		Name:           w.GetName(),
		UID:            w.GetUid(),
		ServiceAccount: w.GetServiceAccount(),
		Node:           w.GetNode(),
		Labels:         w.GetLabels(),
		Annotations:    w.GetAnnotations(),
		IPs:            ips,
		HostIPs:        hostIPs,
		HostNetwork:    w.GetHostNetwork(),
		Ready:          w.GetReady(),
		Source:         w.GetSource(),
	}
	for i, port := range w.GetPorts() {
		if port < 1 || port > 65535 {
			return nil, invalid(what, fmt.Sprintf("ports[%d]", i), "%d is not a port", port)
		}
		p.Ports = append(p.Ports, uint16(port))
	}
	for _, name := range sortedKeys(w.GetNamedPorts()) {
		port := w.GetNamedPorts()[name]
		if name == "" || port < 1 || port > 65535 {
			return nil, invalid(what, "named_ports["+name+"]", "%d is not a port", port)
		}
		if p.NamedPorts == nil {
			p.NamedPorts = make(map[string]uint16, len(w.GetNamedPorts()))
		}
		p.NamedPorts[name] = uint16(port)
	}
	return p, nil
}

func decodeService(s *Service) (*cluster.Service, error) {
	what := "service " + s.GetNamespace() + "/" + s.GetName()
	if err := checkName(what, s.GetNamespace(), s.GetName(), true); err != nil {
		return nil, err
	}
	vips, err := decodeAddrs(what, "cluster_ips", s.GetClusterIps())
	if err != nil {
		return nil, err
	}
	svc := &cluster.Service{
		Namespace:  s.GetNamespace(),
		Name:       s.GetName(),
		Labels:     s.GetLabels(),
		ClusterIPs: vips,
		Selector:   s.GetSelector(),
		Source:     s.GetSource(),
	}
	for i, p := range s.GetPorts() {
		field := fmt.Sprintf("ports[%d]", i)
		if err := checkPort(what, field, p.GetProtocol(), p.GetPort()); err != nil {
			return nil, err
		}
		if (p.GetTargetPort() == 0) == (p.GetTargetName() == "") {
			return nil, invalid(what, field, "exactly one of target_port and target_name must be set")
		}
		if p.GetTargetPort() > 65535 {
			return nil, invalid(what, field+".target_port", "%d is not a port", p.GetTargetPort())
		}
		svc.Ports = append(svc.Ports, cluster.ServicePort{
			Name:        p.GetName(),
			Protocol:    p.GetProtocol(),
			Port:        uint16(p.GetPort()),
			TargetPort:  uint16(p.GetTargetPort()),
			TargetName:  p.GetTargetName(),
			AppProtocol: p.GetAppProtocol(),
		})
	}
	return svc, nil
}

func decodePolicy(k Key, p *Policy) (*policy.Object, error) {
	md := p.GetMetadata()
	what := "policy " + md.GetNamespace() + "/" + md.GetName()
	if k.Kind != Kind_KIND_UNSPECIFIED {
		what = k.String()
	}
	if err := checkName(what, md.GetNamespace(), md.GetName(), true); err != nil {
		return nil, err
	}
	switch p.GetApiVersion() {
	case "security.istio.io/v1", "security.istio.io/v1beta1":
	default:
		return nil, invalid(what, "api_version", "%q is not security.istio.io/v1 or security.istio.io/v1beta1", p.GetApiVersion())
	}
	o := &policy.Object{
		APIVersion: p.GetApiVersion(),
		Meta: policy.Meta{
			Name:        md.GetName(),
			Namespace:   md.GetNamespace(),
			Labels:      md.GetLabels(),
			Annotations: md.GetAnnotations(),
			Source:      md.GetSource(),
		},
	}
	if ts := md.GetCreationTimestamp(); ts != nil {
		if err := ts.CheckValid(); err != nil {
			return nil, invalid(what, "metadata.creation_timestamp", "%v", err)
		}
		o.Created = ts.AsTime()
	}
	switch s := p.GetSpec().(type) {
	case *Policy_PeerAuthentication:
		o.Kind, o.PeerAuthentication = policy.KindPeerAuthentication, s.PeerAuthentication
	case *Policy_AuthorizationPolicy:
		o.Kind, o.AuthorizationPolicy = policy.KindAuthorizationPolicy, s.AuthorizationPolicy
	case *Policy_RequestAuthentication:
		o.Kind, o.RequestAuthentication = policy.KindRequestAuthentication, s.RequestAuthentication
	}
	// A oneof member that is set but nil decodes as an empty spec; an empty
	// AuthorizationPolicy denies all, an empty PeerAuthentication inherits: never looser
	// than what was meant by "a spec".
	switch {
	case o.Kind == 0:
		return nil, invalid(what, "spec", "required (peer_authentication, authorization_policy or request_authentication)")
	case o.Kind == policy.KindPeerAuthentication && o.PeerAuthentication == nil,
		o.Kind == policy.KindAuthorizationPolicy && o.AuthorizationPolicy == nil,
		o.Kind == policy.KindRequestAuthentication && o.RequestAuthentication == nil:
		return nil, invalid(what, "spec", "set but empty")
	}
	return o, nil
}

// NamespaceResource converts a Namespace.
func NamespaceResource(n *cluster.Namespace) *Resource {
	return &Resource{Resource: &Resource_Namespace{Namespace: &Namespace{Name: n.Name, Labels: n.Labels}}}
}

// dataPathAnnotations are the pod annotations the data path reads: the enrollment rule's,
// and a waypoint's policy placement.
var dataPathAnnotations = []string{cluster.SidecarStatusAnnotation, cluster.PolicyPlacementAnnotation}

// WorkloadResource converts a Pod of st (st decides enrollment from its namespace).
func WorkloadResource(st *cluster.State, p *cluster.Pod) *Resource {
	w := &Workload{
		Namespace:      p.Namespace,
		Name:           p.Name,
		Uid:            p.UID,
		ServiceAccount: p.ServiceAccount,
		Node:           p.Node,
		Labels:         p.Labels,
		Ready:          p.Ready,
		HostNetwork:    p.HostNetwork,
		Enrolled:       st.Enrolled(p),
		Source:         p.Source,
	}
	if w.ServiceAccount == "" {
		w.ServiceAccount = "default"
	}
	for _, a := range dataPathAnnotations {
		if v, ok := p.Annotations[a]; ok {
			if w.Annotations == nil {
				w.Annotations = map[string]string{}
			}
			w.Annotations[a] = v
		}
	}
	for _, ip := range p.IPs {
		w.Ips = append(w.Ips, ip.Unmap().AsSlice())
	}
	for _, ip := range p.HostIPs {
		w.HostIps = append(w.HostIps, ip.Unmap().AsSlice())
	}
	for _, port := range p.Ports {
		w.Ports = append(w.Ports, uint32(port))
	}
	if len(p.NamedPorts) > 0 {
		w.NamedPorts = make(map[string]uint32, len(p.NamedPorts))
		for n, port := range p.NamedPorts {
			w.NamedPorts[n] = uint32(port)
		}
	}
	return &Resource{Resource: &Resource_Workload{Workload: w}}
}

// ServiceResource converts a Service.
func ServiceResource(s *cluster.Service) *Resource {
	svc := &Service{
		Namespace: s.Namespace,
		Name:      s.Name,
		Labels:    s.Labels,
		Selector:  s.Selector,
		Source:    s.Source,
	}
	for _, ip := range s.ClusterIPs {
		svc.ClusterIps = append(svc.ClusterIps, ip.Unmap().AsSlice())
	}
	for _, p := range s.Ports {
		svc.Ports = append(svc.Ports, &ServicePort{
			Name:        p.Name,
			Protocol:    p.Protocol,
			Port:        uint32(p.Port),
			TargetPort:  uint32(p.TargetPort),
			TargetName:  p.TargetName,
			AppProtocol: p.AppProtocol,
		})
	}
	return &Resource{Resource: &Resource_Service{Service: svc}}
}

// EndpointSliceResource converts an EndpointSlice.
func EndpointSliceResource(s *cluster.EndpointSlice) *Resource {
	out := &EndpointSlice{Namespace: s.Namespace, Name: s.Name, Service: s.Service, Source: s.Source}
	for _, p := range s.Ports {
		out.Ports = append(out.Ports, &EndpointPort{Name: p.Name, Protocol: p.Protocol, Port: uint32(p.Port)})
	}
	for _, e := range s.Endpoints {
		ep := &Endpoint{Ready: e.Ready}
		for _, a := range e.Addresses {
			ep.Addresses = append(ep.Addresses, a.Unmap().AsSlice())
		}
		out.Endpoints = append(out.Endpoints, ep)
	}
	return &Resource{Resource: &Resource_EndpointSlice{EndpointSlice: out}}
}

// checkPort checks a port's protocol and number.
func checkPort(what, field, protocol string, port uint32) error {
	switch protocol {
	case "TCP", "UDP", "SCTP":
	default:
		return invalid(what, field+".protocol", "%q is not TCP, UDP or SCTP", protocol)
	}
	if port < 1 || port > 65535 {
		return invalid(what, field+".port", "%d is not a port", port)
	}
	return nil
}

func decodeEndpointSlice(s *EndpointSlice) (*cluster.EndpointSlice, error) {
	what := "endpointslice " + s.GetNamespace() + "/" + s.GetName()
	if err := checkName(what, s.GetNamespace(), s.GetName(), true); err != nil {
		return nil, err
	}
	if s.GetService() == "" {
		return nil, invalid(what, "service", "required")
	}
	out := &cluster.EndpointSlice{Namespace: s.GetNamespace(), Name: s.GetName(), Service: s.GetService(), Source: s.GetSource()}
	for i, p := range s.GetPorts() {
		if err := checkPort(what, fmt.Sprintf("ports[%d]", i), p.GetProtocol(), p.GetPort()); err != nil {
			return nil, err
		}
		out.Ports = append(out.Ports, cluster.EndpointPort{Name: p.GetName(), Protocol: p.GetProtocol(), Port: uint16(p.GetPort())})
	}
	for i, e := range s.GetEndpoints() {
		addrs, err := decodeAddrs(what, fmt.Sprintf("endpoints[%d].addresses", i), e.GetAddresses())
		if err != nil {
			return nil, err
		}
		out.Endpoints = append(out.Endpoints, cluster.Endpoint{Addresses: addrs, Ready: e.GetReady()})
	}
	return out, nil
}

// GatewayResource converts a Gateway.
func GatewayResource(g *cluster.Gateway) *Resource {
	out := &Gateway{
		Namespace: g.Namespace,
		Name:      g.Name,
		ClassName: g.ClassName,
		Hostnames: g.Hostnames,
		Labels:    g.Labels,
		Source:    g.Source,
	}
	for _, l := range g.Listeners {
		out.Listeners = append(out.Listeners, &GatewayListener{Name: l.Name, Port: uint32(l.Port), Protocol: l.Protocol})
	}
	for _, a := range g.Addresses {
		out.Addresses = append(out.Addresses, a.Unmap().AsSlice())
	}
	return &Resource{Resource: &Resource_Gateway{Gateway: out}}
}

func decodeGateway(g *Gateway) (*cluster.Gateway, error) {
	what := "gateway " + g.GetNamespace() + "/" + g.GetName()
	if err := checkName(what, g.GetNamespace(), g.GetName(), true); err != nil {
		return nil, err
	}
	if g.GetClassName() == "" {
		return nil, invalid(what, "class_name", "required")
	}
	addrs, err := decodeAddrs(what, "addresses", g.GetAddresses())
	if err != nil {
		return nil, err
	}
	out := &cluster.Gateway{
		Namespace: g.GetNamespace(),
		Name:      g.GetName(),
		ClassName: g.GetClassName(),
		Addresses: addrs,
		Labels:    g.GetLabels(),
		Source:    g.GetSource(),
	}
	for i, l := range g.GetListeners() {
		field := fmt.Sprintf("listeners[%d]", i)
		switch {
		case l.GetName() == "":
			return nil, invalid(what, field+".name", "required")
		case l.GetPort() < 1 || l.GetPort() > 65535:
			return nil, invalid(what, field+".port", "%d is not a port", l.GetPort())
		case l.GetProtocol() == "":
			return nil, invalid(what, field+".protocol", "required")
		}
		for _, prev := range out.Listeners {
			if prev.Name == l.GetName() {
				return nil, invalid(what, field+".name", "%q is listed twice", l.GetName())
			}
		}
		out.Listeners = append(out.Listeners, cluster.GatewayListener{Name: l.GetName(), Port: uint16(l.GetPort()), Protocol: l.GetProtocol()})
	}
	for i, h := range g.GetHostnames() {
		field := fmt.Sprintf("hostnames[%d]", i)
		if h == "" {
			return nil, invalid(what, field, "empty")
		}
		if slices.Contains(out.Hostnames, h) {
			return nil, invalid(what, field, "%q is listed twice", h)
		}
		out.Hostnames = append(out.Hostnames, h)
	}
	return out, nil
}

// PolicyResource converts a policy object. The spec message is shared, not copied: o
// must not be modified afterwards (as for a policy.Store).
func PolicyResource(o *policy.Object) (*Resource, error) {
	p := &Policy{
		ApiVersion: o.APIVersion,
		Metadata: &ObjectMeta{
			Namespace:   o.Namespace,
			Name:        o.Name,
			Labels:      o.Labels,
			Annotations: o.Annotations,
			Source:      o.Source,
		},
	}
	if !o.Created.IsZero() {
		p.Metadata.CreationTimestamp = timestamppb.New(o.Created)
	}
	switch {
	case o.Kind == policy.KindPeerAuthentication && o.PeerAuthentication != nil:
		p.Spec = &Policy_PeerAuthentication{PeerAuthentication: o.PeerAuthentication}
	case o.Kind == policy.KindAuthorizationPolicy && o.AuthorizationPolicy != nil:
		p.Spec = &Policy_AuthorizationPolicy{AuthorizationPolicy: o.AuthorizationPolicy}
	case o.Kind == policy.KindRequestAuthentication && o.RequestAuthentication != nil:
		p.Spec = &Policy_RequestAuthentication{RequestAuthentication: o.RequestAuthentication}
	default:
		return nil, fmt.Errorf("api: %s: no spec for its kind", o.Key())
	}
	return &Resource{Resource: &Resource_Policy{Policy: p}}, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
