package cluster

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func load(t *testing.T, dir string) (*State, []error) {
	t.Helper()
	st, errs, err := LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return st, errs
}

func pod(t *testing.T, st *State, ns, name string) *Pod {
	t.Helper()
	for _, p := range st.Pods {
		if p.Namespace == ns && p.Name == name {
			return p
		}
	}
	t.Fatalf("no pod %s/%s", ns, name)
	return nil
}

func TestEnrollment(t *testing.T) {
	st, _ := load(t, "testdata/enrollment")
	for _, tc := range []struct {
		ns, name string
		want     bool
	}{
		{"bookinfo", "reviews-v1", true},    // namespace is ambient
		{"bookinfo", "opted-out", false},    // pod label none wins
		{"bookinfo", "with-sidecar", false}, // sidecar pods are never enrolled
		{"bookinfo", "host", false},         // host network
		{"legacy", "sleep", false},          // namespace not in the mesh
		{"legacy", "opted-in", true},        // pod label ambient
	} {
		if got := st.Enrolled(pod(t, st, tc.ns, tc.name)); got != tc.want {
			t.Errorf("Enrolled(%s/%s) = %v, want %v", tc.ns, tc.name, got, tc.want)
		}
	}
}

// Finished pods (Succeeded, Failed) are not workloads: their old address belongs to the
// live pod that has it now.
func TestTerminalPodsAreNotWorkloads(t *testing.T) {
	st, errs := load(t, "testdata/enrollment")
	for _, p := range st.Pods {
		if p.Name == "finished-job" || p.Name == "crashed" {
			t.Fatalf("terminal pod %s/%s is a workload", p.Namespace, p.Name)
		}
	}
	n := 0
	for _, p := range st.Pods {
		for _, ip := range p.IPs {
			if ip == netip.MustParseAddr("10.1.1.10") {
				n++
			}
		}
	}
	if n != 1 || len(errs) != 3 {
		t.Fatalf("%d pods claim 10.1.1.10 (want the live one only); errors %v", n, errs)
	}
}

func TestPodFields(t *testing.T) {
	st, _ := load(t, "testdata/enrollment")
	p := pod(t, st, "bookinfo", "reviews-v1")
	if p.ServiceAccount != "bookinfo-reviews" || p.Node != "node-1" || !p.Ready || p.Labels["app"] != "reviews" {
		t.Fatalf("pod %+v", p)
	}
	want := []netip.Addr{netip.MustParseAddr("10.1.1.10"), netip.MustParseAddr("fd00:1:1::10")}
	if len(p.IPs) != 2 || p.IPs[0] != want[0] || p.IPs[1] != want[1] {
		t.Fatalf("IPs %v, want %v (deduplicated, podIP first)", p.IPs, want)
	}
	if wantHost := []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")}; len(p.HostIPs) != 2 || p.HostIPs[0] != wantHost[0] || p.HostIPs[1] != wantHost[1] {
		t.Fatalf("HostIPs %v, want %v", p.HostIPs, wantHost)
	}
	if p := pod(t, st, "bookinfo", "opted-out"); p.ServiceAccount != "default" {
		t.Fatalf("default service account: %q", p.ServiceAccount)
	}
	if p := pod(t, st, "bookinfo", "reviews-v2"); p.Ready {
		t.Fatal("Ready=False pod counted ready")
	}
}

func TestServiceEndpointsAndPorts(t *testing.T) {
	st, _ := load(t, "testdata/enrollment")
	if len(st.Services) != 1 {
		t.Fatalf("%d services", len(st.Services))
	}
	svc := st.Services[0]
	if len(svc.ClusterIPs) != 1 || svc.ClusterIPs[0] != netip.MustParseAddr("10.96.0.10") {
		t.Fatalf("cluster IPs %v", svc.ClusterIPs)
	}
	eps := st.Endpoints(svc)
	if len(eps) != 1 || eps[0].Name != "reviews-v1" {
		t.Fatalf("endpoints %v, want only the ready reviews-v1", eps)
	}
	for _, tc := range []struct {
		port, want uint16
	}{{9080, 9080}, {80, 8080}, {7070, 7070}} {
		var sp *ServicePort
		for i := range svc.Ports {
			if svc.Ports[i].Port == tc.port {
				sp = &svc.Ports[i]
			}
		}
		if sp == nil {
			t.Fatalf("no port %d", tc.port)
		}
		if got, ok := sp.TargetPortOn(eps[0]); !ok || got != tc.want {
			t.Errorf("port %d targets %d (%v), want %d", tc.port, got, ok, tc.want)
		}
	}
}

func TestBadObjectsAreReportedAlone(t *testing.T) {
	st, errs := load(t, "testdata/enrollment")
	if len(errs) != 3 {
		t.Fatalf("errors %v, want 3", errs)
	}
	for i, want := range []string{`bad.yaml#1: pod bookinfo/bad-ip: status.podIP: "not-an-ip"`, `bad.yaml#2: service bookinfo/bad-port: spec.ports[0].port: 70000`,
		`bad.yaml#3: pod bookinfo/bad-host-ip: status.hostIPs[1].ip: "node-1"`} {
		if !strings.Contains(errs[i].Error(), want) {
			t.Errorf("error %q lacks %q", errs[i], want)
		}
	}
	pod(t, st, "bookinfo", "fine-after-bad")
}

func TestLoadKubectlOutput(t *testing.T) {
	st, errs := load(t, "testdata/pods")
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "broken.yaml") {
		t.Fatalf("errors %v, want one naming broken.yaml", errs)
	}
	if len(st.Pods) != 5 {
		t.Fatalf("%d pods, want 5 (List items unpacked, other kinds skipped)", len(st.Pods))
	}
	if p := pod(t, st, "default", "sleep"); p.ServiceAccount != "default" {
		t.Fatalf("pod without namespace: %+v", p)
	}
	if p := pod(t, st, "bookinfo", "ratings-v1-5c9b"); p.ServiceAccount != "bookinfo-ratings" {
		t.Fatalf("deprecated spec.serviceAccount not honoured: %+v", p)
	}
}

// A Service without a selector takes its endpoints from its EndpointSlices: ready ones
// only (no condition means ready), ports by name.
func TestSliceEndpoints(t *testing.T) {
	st, errs := load(t, "testdata/slices")
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), `endpointslice default/bad: endpoints[0].addresses[0]: "api-server" is not an IP address`) {
		t.Fatalf("errors %v", errs)
	}
	if len(st.Services) != 1 {
		t.Fatalf("services %v", st.Services)
	}
	eps := st.SliceEndpoints(st.Services[0])
	if len(eps) != 2 || eps[0].Addr != netip.MustParseAddr("10.99.0.250") || eps[1].Addr != netip.MustParseAddr("10.99.0.252") || eps[0].Ports["https"] != 6443 {
		t.Fatalf("endpoints %+v", eps)
	}
}

func findGateway(t *testing.T, st *State, ns, name string) *Gateway {
	t.Helper()
	for _, g := range st.Gateways {
		if g.Namespace == ns && g.Name == name {
			return g
		}
	}
	t.Fatalf("no gateway %s/%s", ns, name)
	return nil
}

// Gateways of gateway.networking.k8s.io v1 and v1beta1 are read; other Gateway API kinds,
// and Istio's own networking.istio.io Gateway, are not veil's.
func TestGateways(t *testing.T) {
	st, errs := Parse("gw.yaml", []byte(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: bookinfo
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
status:
  addresses:
  - {type: IPAddress, value: 10.96.0.20}
  - {value: "fd00::20"}
  - {type: IPAddress, value: 10.96.0.20}
  - {type: Hostname, value: waypoint.bookinfo.svc.cluster.local}
  - {type: NamedAddress, value: some-pool}
  conditions: [{type: Programmed, status: "True"}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata: {name: ingress}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: https, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: cert}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio-waypoint}
spec: {controllerName: istio.io/mesh-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec: {parentRefs: [{name: waypoint}], rules: [{backendRefs: [{name: reviews, port: 9080}]}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: istio-gateway, namespace: bookinfo}
spec: {selector: {istio: ingressgateway}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: gateway.networking.k8s.io/v1
  kind: Gateway
  metadata: {name: from-list, namespace: other}
  spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
`))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	if len(st.Gateways) != 3 {
		t.Fatalf("%d gateways, want 3 (waypoint, ingress, from-list)", len(st.Gateways))
	}
	g := findGateway(t, st, "bookinfo", "waypoint")
	want := &Gateway{Namespace: "bookinfo", Name: "waypoint", ClassName: WaypointClass,
		Listeners: []GatewayListener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
		Addresses: []netip.Addr{netip.MustParseAddr("10.96.0.20"), netip.MustParseAddr("fd00::20")},
		Hostnames: []string{"waypoint.bookinfo.svc.cluster.local"},
		Labels:    map[string]string{"istio.io/waypoint-for": "service"}, Source: "gw.yaml#1"}
	if !reflect.DeepEqual(g, want) {
		t.Fatalf("gateway\n got %+v\nwant %+v", g, want)
	}
	in := findGateway(t, st, "default", "ingress")
	if in.ClassName != "istio" || len(in.Listeners) != 2 || in.Listeners[1] != (GatewayListener{Name: "https", Port: 443, Protocol: "HTTPS"}) || in.Addresses != nil {
		t.Fatalf("v1beta1 gateway without a namespace: %+v", in)
	}
	findGateway(t, st, "other", "from-list")
}

// A Gateway that does not decode is reported, naming the file, the object and the field,
// and left out; the documents after it still load.
func TestGatewayErrors(t *testing.T) {
	for _, tc := range []struct{ name, doc, want string }{
		{"port", `{name: w, namespace: ns}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 70000, protocol: HBONE}]}`,
			"gw.yaml#1: gateway ns/w: spec.listeners[0].port: 70000 is not a port"},
		{"no port", `{name: w}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: a, port: 80, protocol: HTTP}, {name: mesh, protocol: HBONE}]}`,
			"gw.yaml#1: gateway default/w: spec.listeners[1].port: 0 is not a port"},
		{"port type", `{name: w, namespace: ns}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: "15008", protocol: HBONE}]}`,
			"gw.yaml#1: gateway ns/w: json: cannot unmarshal string into Go struct field"},
		{"listener name", `{name: w, namespace: ns}
spec: {gatewayClassName: istio-waypoint, listeners: [{port: 15008, protocol: HBONE}]}`,
			"gw.yaml#1: gateway ns/w: spec.listeners[0].name: required"},
		{"listener twice", `{name: w, namespace: ns}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}, {name: mesh, port: 15009, protocol: HBONE}]}`,
			`gw.yaml#1: gateway ns/w: spec.listeners[1].name: "mesh" is listed twice`},
		{"protocol", `{name: w, namespace: ns}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008}]}`,
			"gw.yaml#1: gateway ns/w: spec.listeners[0].protocol: required"},
		{"class", `{name: w, namespace: ns}
spec: {listeners: [{name: mesh, port: 15008, protocol: HBONE}]}`,
			"gw.yaml#1: gateway ns/w: spec.gatewayClassName: required"},
		{"name", `{namespace: ns}
spec: {gatewayClassName: istio-waypoint}`,
			"gw.yaml#1: Gateway: metadata.name: required"},
		{"address", `{name: w, namespace: ns}
spec: {gatewayClassName: istio-waypoint}
status: {addresses: [{type: Hostname, value: w.ns.svc}, {type: IPAddress, value: w.ns.svc}]}`,
			`gw.yaml#1: gateway ns/w: status.addresses[1].value: "w.ns.svc" is not an IP address`},
		{"untyped address", `{name: w, namespace: ns}
spec: {gatewayClassName: istio-waypoint}
status: {addresses: [{value: "10.0.0.300"}]}`,
			`gw.yaml#1: gateway ns/w: status.addresses[0].value: "10.0.0.300" is not an IP address`},
		{"unspecified address", `{name: w, namespace: ns}
spec: {gatewayClassName: istio-waypoint}
status: {addresses: [{type: IPAddress, value: "::"}]}`,
			`gw.yaml#1: gateway ns/w: status.addresses[0].value: "::" is not a usable address`},
		{"empty address", `{name: w, namespace: ns}
spec: {gatewayClassName: istio-waypoint}
status: {addresses: [{type: Hostname}]}`,
			`gw.yaml#1: gateway ns/w: status.addresses[0].value: required`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, errs := Parse("gw.yaml", []byte("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: "+tc.doc+`
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: fine-after-bad, namespace: ns}
spec: {gatewayClassName: istio-waypoint}
`))
			if len(errs) != 1 || !strings.Contains(errs[0].Error(), tc.want) {
				t.Fatalf("errors %v, want one containing %q", errs, tc.want)
			}
			if len(st.Gateways) != 1 || st.Gateways[0].Name != "fine-after-bad" {
				t.Fatalf("gateways %+v, want only fine-after-bad", st.Gateways)
			}
		})
	}
}
