package api

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
	"google.golang.org/protobuf/proto"
)

func TestConvertRoundTrip(t *testing.T) {
	st := &cluster.State{Namespaces: map[string]*cluster.Namespace{"bookinfo": {Name: "bookinfo", Labels: map[string]string{cluster.DataplaneModeLabel: "ambient"}}}}
	pod := &cluster.Pod{Namespace: "bookinfo", Name: "reviews-v1", UID: "0f8e2c1a-uid", ServiceAccount: "reviews", Node: "node-1",
		Labels: map[string]string{"app": "reviews"}, Annotations: map[string]string{cluster.SidecarStatusAnnotation: "{}"},
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")}, Ready: true,
		Ports: []uint16{9080, 15090}, NamedPorts: map[string]uint16{"http": 9080}, Source: "pods.yaml#1"}
	svc := &cluster.Service{Namespace: "bookinfo", Name: "reviews", ClusterIPs: []netip.Addr{netip.MustParseAddr("10.96.0.1")},
		Selector: map[string]string{"app": "reviews"}, Ports: []cluster.ServicePort{{Name: "http", Protocol: "TCP", AppProtocol: "http", Port: 9080, TargetName: "http"}}, Source: "svc.yaml#1"}
	gw := &cluster.Gateway{Namespace: "bookinfo", Name: "waypoint", ClassName: cluster.WaypointClass,
		Listeners: []cluster.GatewayListener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}, {Name: "http", Port: 80, Protocol: "HTTP"}},
		Addresses: []netip.Addr{netip.MustParseAddr("10.96.0.20"), netip.MustParseAddr("fd00::20")},
		Hostnames: []string{"waypoint.bookinfo.svc.cluster.local"}, Labels: map[string]string{"istio.io/waypoint-for": "service"}, Source: "gw.yaml#1"}
	objs := policy.Parse("p.yaml", []byte(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: bookinfo, labels: {a: b}, creationTimestamp: "2024-05-01T10:00:00Z"}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/frontend"]}}]}]
`)).Objects
	pr, err := PolicyResource(objs[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []*Resource{NamespaceResource(st.Namespaces["bookinfo"]), WorkloadResource(st, pod), ServiceResource(svc), GatewayResource(gw), pr} {
		// Through the wire, as an agent gets it.
		b, err := proto.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		var wire Resource
		if err := proto.Unmarshal(b, &wire); err != nil {
			t.Fatal(err)
		}
		k, d, err := wire.Decode()
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case d.Namespace != nil:
			if !reflect.DeepEqual(d.Namespace, st.Namespaces["bookinfo"]) || k.String() != "NAMESPACE bookinfo" {
				t.Errorf("namespace %s: %+v", k, d.Namespace)
			}
		case d.Pod != nil:
			if !reflect.DeepEqual(d.Pod, pod) || wire.GetWorkload().GetEnrolled() != st.Enrolled(pod) {
				t.Errorf("pod %s:\n got %+v\nwant %+v", k, d.Pod, pod)
			}
		case d.Service != nil:
			if !reflect.DeepEqual(d.Service, svc) {
				t.Errorf("service %s:\n got %+v\nwant %+v", k, d.Service, svc)
			}
		case d.Gateway != nil:
			if !reflect.DeepEqual(d.Gateway, gw) || k.String() != "GATEWAY bookinfo/waypoint" {
				t.Errorf("gateway %s:\n got %+v\nwant %+v", k, d.Gateway, gw)
			}
		case d.Policy != nil:
			o := d.Policy
			if o.Key() != objs[0].Key() || !o.Created.Equal(time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC)) || o.Labels["a"] != "b" ||
				!proto.Equal(o.AuthorizationPolicy, objs[0].AuthorizationPolicy) || o.Source != "p.yaml:1" {
				t.Errorf("policy %s: %+v", k, o)
			}
			if pk, ok := k.PolicyKey(); !ok || pk != objs[0].Key() {
				t.Errorf("PolicyKey = %v", pk)
			}
		}
	}
}

func TestDecodeNamesResourceAndField(t *testing.T) {
	w := func(mod func(*Workload)) *Resource {
		x := &Workload{Namespace: "ns", Name: "w", ServiceAccount: "sa", Ips: [][]byte{{10, 0, 0, 1}}}
		mod(x)
		return &Resource{Resource: &Resource_Workload{Workload: x}}
	}
	s := func(mod func(*Service)) *Resource {
		x := &Service{Namespace: "ns", Name: "s", Ports: []*ServicePort{{Protocol: "TCP", Port: 80, TargetPort: 8080}}}
		mod(x)
		return &Resource{Resource: &Resource_Service{Service: x}}
	}
	g := func(mod func(*Gateway)) *Resource {
		x := &Gateway{Namespace: "ns", Name: "g", ClassName: "istio-waypoint", Listeners: []*GatewayListener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}}
		mod(x)
		return &Resource{Resource: &Resource_Gateway{Gateway: x}}
	}
	for _, tc := range []struct {
		name string
		r    *Resource
		want string
	}{
		{"empty", &Resource{}, "resource: empty"},
		{"namespace without name", &Resource{Resource: &Resource_Namespace{Namespace: &Namespace{}}}, "namespace: name: required"},
		{"workload without namespace", w(func(x *Workload) { x.Namespace = "" }), "workload /w: namespace: required"},
		{"workload without service account", w(func(x *Workload) { x.ServiceAccount = "" }), "workload ns/w: service_account: required"},
		{"short address", w(func(x *Workload) { x.Ips = append(x.Ips, []byte{1, 2, 3}) }), "workload ns/w: ips[1]: 3 bytes is not an IPv4 or IPv6 address"},
		{"unspecified address", w(func(x *Workload) { x.Ips = [][]byte{make([]byte, 16)} }), "workload ns/w: ips[0]: :: is not a usable address"},
		{"duplicate address", w(func(x *Workload) { x.Ips = append(x.Ips, []byte{10, 0, 0, 1}) }), "workload ns/w: ips[1]: 10.0.0.1 is listed twice"},
		{"port out of range", w(func(x *Workload) { x.Ports = []uint32{80, 0} }), "workload ns/w: ports[1]: 0 is not a port"},
		{"named port out of range", w(func(x *Workload) { x.NamedPorts = map[string]uint32{"http": 70000} }), "workload ns/w: named_ports[http]: 70000 is not a port"},
		{"service protocol", s(func(x *Service) { x.Ports[0].Protocol = "tcp" }), `service ns/s: ports[0].protocol: "tcp" is not TCP, UDP or SCTP`},
		{"service port zero", s(func(x *Service) { x.Ports[0].Port = 0 }), "service ns/s: ports[0].port: 0 is not a port"},
		{"service both targets", s(func(x *Service) { x.Ports[0].TargetName = "http" }), "service ns/s: ports[0]: exactly one of target_port and target_name must be set"},
		{"gateway without class", g(func(x *Gateway) { x.ClassName = "" }), "gateway ns/g: class_name: required"},
		{"gateway without namespace", g(func(x *Gateway) { x.Namespace = "" }), "gateway /g: namespace: required"},
		{"gateway listener port", g(func(x *Gateway) { x.Listeners[0].Port = 70000 }), "gateway ns/g: listeners[0].port: 70000 is not a port"},
		{"gateway listener name", g(func(x *Gateway) { x.Listeners[0].Name = "" }), "gateway ns/g: listeners[0].name: required"},
		{"gateway listener protocol", g(func(x *Gateway) { x.Listeners[0].Protocol = "" }), "gateway ns/g: listeners[0].protocol: required"},
		{"gateway listener twice", g(func(x *Gateway) { x.Listeners = append(x.Listeners, x.Listeners[0]) }), `gateway ns/g: listeners[1].name: "mesh" is listed twice`},
		{"gateway address", g(func(x *Gateway) { x.Addresses = [][]byte{{10, 0, 0}} }), "gateway ns/g: addresses[0]: 3 bytes is not an IPv4 or IPv6 address"},
		{"gateway hostname", g(func(x *Gateway) { x.Hostnames = []string{"w.ns.svc", ""} }), "gateway ns/g: hostnames[1]: empty"},
		{"gateway hostname twice", g(func(x *Gateway) { x.Hostnames = []string{"w.ns.svc", "w.ns.svc"} }), `gateway ns/g: hostnames[1]: "w.ns.svc" is listed twice`},
		{"policy without spec", &Resource{Resource: &Resource_Policy{Policy: &Policy{ApiVersion: "security.istio.io/v1", Metadata: &ObjectMeta{Namespace: "ns", Name: "p"}}}}, "policy ns/p: spec: required"},
		{"policy with nil spec", &Resource{Resource: &Resource_Policy{Policy: &Policy{ApiVersion: "security.istio.io/v1", Metadata: &ObjectMeta{Namespace: "ns", Name: "p"}, Spec: &Policy_AuthorizationPolicy{}}}}, "AUTHORIZATION_POLICY ns/p: spec: set but empty"},
		{"policy api version", &Resource{Resource: &Resource_Policy{Policy: &Policy{ApiVersion: "v1", Metadata: &ObjectMeta{Namespace: "ns", Name: "p"}}}}, `policy ns/p: api_version: "v1" is not`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := tc.r.Decode()
			if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Decode: %v; want ErrInvalid containing %q", err, tc.want)
			}
		})
	}
	for _, rk := range []*ResourceKey{{}, {Kind: 99, Namespace: "a", Name: "b"}, {Kind: Kind_KIND_WORKLOAD, Name: "b"}, {Kind: Kind_KIND_NAMESPACE, Namespace: "a", Name: "b"}} {
		if _, err := KeyFromProto(rk); err == nil {
			t.Errorf("KeyFromProto(%v) accepted", rk)
		}
	}
}

func FuzzDecodeResource(f *testing.F) {
	b, _ := proto.Marshal(WorkloadResource(&cluster.State{}, &cluster.Pod{Namespace: "a", Name: "b", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, NamedPorts: map[string]uint16{"x": 1}}))
	f.Add(b)
	b, _ = proto.Marshal(GatewayResource(&cluster.Gateway{Namespace: "a", Name: "w", ClassName: cluster.WaypointClass,
		Listeners: []cluster.GatewayListener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}, Addresses: []netip.Addr{netip.MustParseAddr("10.0.0.2")}, Hostnames: []string{"w.a.svc"}}))
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		var r Resource
		if proto.Unmarshal(data, &r) != nil {
			return
		}
		k, d, err := r.Decode()
		if err != nil {
			return
		}
		if d.Pod != nil {
			// What decodes re-encodes to the same resource key and decodes again.
			again := WorkloadResource(&cluster.State{}, d.Pod)
			if again.Key() != k {
				t.Fatalf("key %v -> %v", k, again.Key())
			}
			if _, _, err := again.Decode(); err != nil {
				t.Fatalf("re-encoded pod does not decode: %v", err)
			}
		}
		if d.Gateway != nil {
			again := GatewayResource(d.Gateway)
			if _, d2, err := again.Decode(); err != nil || again.Key() != k || !reflect.DeepEqual(d2.Gateway, d.Gateway) {
				t.Fatalf("re-encoded gateway: key %v -> %v, %v", k, again.Key(), err)
			}
		}
	})
}

// TestWorkloadCarriesEveryPodField fails when cluster.Pod, cluster.Service, cluster.State
// or another type the stream carries gains a field: agents fed by the controller would
// not get it. Add it to config.proto and the
// conversions, then here.
func TestWorkloadCarriesEveryPodField(t *testing.T) {
	for _, tc := range []struct {
		typ  reflect.Type
		want string
	}{
		{reflect.TypeFor[cluster.Pod](), "Namespace Name UID ServiceAccount Node Labels Annotations IPs HostIPs HostNetwork Ports NamedPorts Ready Source"},
		{reflect.TypeFor[cluster.Service](), "Namespace Name Labels ClusterIPs Selector Ports Source"},
		{reflect.TypeFor[cluster.ServicePort](), "Name Protocol AppProtocol Port TargetPort TargetName"},
		{reflect.TypeFor[cluster.Namespace](), "Name Labels"},
		{reflect.TypeFor[cluster.EndpointSlice](), "Namespace Name Service Ports Endpoints Source"},
		{reflect.TypeFor[cluster.EndpointPort](), "Name Protocol Port"},
		{reflect.TypeFor[cluster.Endpoint](), "Addresses Ready"},
		{reflect.TypeFor[cluster.Gateway](), "Namespace Name ClassName Listeners Addresses Hostnames Labels Source"},
		{reflect.TypeFor[cluster.GatewayListener](), "Name Port Protocol"},
		{reflect.TypeFor[cluster.State](), "Namespaces Pods Services EndpointSlices Gateways"},
	} {
		var got []string
		for i := range tc.typ.NumField() {
			got = append(got, tc.typ.Field(i).Name)
		}
		if strings.Join(got, " ") != tc.want {
			t.Errorf("%v has fields %q; the config stream carries %q: add the new ones to api/config.proto and api/convert.go", tc.typ, strings.Join(got, " "), tc.want)
		}
	}
}
