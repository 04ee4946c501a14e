package waypoint

import (
	"net/http"
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/tunnel"
)

// benchRoute is the Route of frontend -> Service reviews through a waypoint, with the
// Istio docs' zero-trust policies in force (enforced at the waypoint, veil placement).
func benchRoute(b *testing.B) *Route {
	ip := netip.MustParseAddr
	st := &cluster.State{
		Namespaces: map[string]*cluster.Namespace{"bookinfo": {Name: "bookinfo", Labels: map[string]string{
			cluster.DataplaneModeLabel: cluster.DataplaneAmbient, cluster.UseWaypointLabel: "waypoint"}}},
		Gateways: []*cluster.Gateway{{Namespace: "bookinfo", Name: "waypoint", ClassName: cluster.WaypointClass}},
		Pods: []*cluster.Pod{
			{Namespace: "bookinfo", Name: "waypoint", ServiceAccount: "waypoint", Ready: true, IPs: []netip.Addr{ip("10.0.0.3")},
				Labels: map[string]string{cluster.GatewayNameLabel: "waypoint", cluster.DataplaneModeLabel: cluster.DataplaneNone}},
			{Namespace: "bookinfo", Name: "reviews", ServiceAccount: "reviews", Ready: true, IPs: []netip.Addr{ip("10.0.0.2")}, Labels: map[string]string{"app": "reviews"}},
			{Namespace: "bookinfo", Name: "frontend", ServiceAccount: "frontend", Ready: true, IPs: []netip.Addr{ip("10.0.0.4")}, Labels: map[string]string{"app": "frontend"}},
		},
		Services: []*cluster.Service{{Namespace: "bookinfo", Name: "reviews", ClusterIPs: []netip.Addr{ip("10.96.0.2")},
			Selector: map[string]string{"app": "reviews"}, Ports: []cluster.ServicePort{{Name: "http", Protocol: "TCP", Port: 9080, TargetPort: 9080}}}},
	}
	r := &Router{Namespace: "bookinfo", Name: "waypoint", TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")}
	objs := policy.Parse("zero-trust.yaml", []byte(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: bookinfo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend-to-reviews, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/bookinfo/sa/frontend]}}]
    to: [{operation: {methods: [GET]}}]
`)).Objects
	if err := r.ApplyPolicies(objs, nil); err != nil {
		b.Fatal(err)
	}
	r.Update(st)
	rt, err := r.Route(&tunnel.Request{Peer: spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/frontend"),
		Source: netip.MustParseAddrPort("10.0.0.4:40000"), Destination: netip.MustParseAddrPort("10.96.0.2:9080")})
	if err != nil {
		b.Fatal(err)
	}
	return rt
}

// BenchmarkRouterDecide is the router's share of a request: endpoint choice, CUSTOM,
// RequestAuthentication (none here) and both decisions. Add it to the proxy's cost
// (BenchmarkProxyHTTP1, whose Decide is trivial) for the waypoint's whole cost.
func BenchmarkRouterDecide(b *testing.B) {
	rt := benchRoute(b)
	req, _ := http.NewRequest(http.MethodGet, "http://reviews:9080/reviews/1", nil)
	req.Header.Set("User-Agent", "bench")
	b.ReportAllocs()
	for b.Loop() {
		if _, resp := rt.Decide(req); resp != nil {
			b.Fatalf("denied: %d %s", resp.Status, resp.Body)
		}
	}
}
