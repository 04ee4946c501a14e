package agent

import (
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
)

// placementState: bookinfo (ambient) with a waypoint taking for and declaring placement
// on its pod, reviews (bound through the namespace), frontend, and a second waypoint in
// namespace legacy that serves nothing here.
func placementState(for_, placement string) *cluster.State {
	ip := netip.MustParseAddr
	gw := func(ns string) *cluster.Gateway {
		return &cluster.Gateway{Namespace: ns, Name: "waypoint", ClassName: cluster.WaypointClass,
			Labels: map[string]string{cluster.WaypointForLabel: for_}}
	}
	return &cluster.State{
		Namespaces: map[string]*cluster.Namespace{
			"bookinfo": {Name: "bookinfo", Labels: map[string]string{cluster.DataplaneModeLabel: cluster.DataplaneAmbient, cluster.UseWaypointLabel: "waypoint"}},
			"legacy":   {Name: "legacy"},
		},
		Gateways: []*cluster.Gateway{gw("bookinfo"), gw("legacy")},
		Pods: []*cluster.Pod{
			{Namespace: "bookinfo", Name: "waypoint", ServiceAccount: "waypoint", Node: "n2", Ready: true,
				Labels:      map[string]string{cluster.GatewayNameLabel: "waypoint", cluster.DataplaneModeLabel: cluster.DataplaneNone},
				Annotations: map[string]string{cluster.PolicyPlacementAnnotation: placement}, IPs: []netip.Addr{ip("10.0.2.9")}},
			{Namespace: "legacy", Name: "waypoint", ServiceAccount: "waypoint", Node: "n2", Ready: true,
				Labels:      map[string]string{cluster.GatewayNameLabel: "waypoint"},
				Annotations: map[string]string{cluster.PolicyPlacementAnnotation: "veil"}, IPs: []netip.Addr{ip("10.0.2.8")}},
			{Namespace: "bookinfo", Name: "reviews", ServiceAccount: "reviews", Node: "n2", Ready: true,
				Labels: map[string]string{"app": "reviews"}, IPs: []netip.Addr{ip("10.0.2.2")}},
			{Namespace: "bookinfo", Name: "frontend", ServiceAccount: "frontend", Node: "n1", Ready: true,
				Labels: map[string]string{"app": "frontend"}, IPs: []netip.Addr{ip("10.0.1.2")}},
		},
		Services: []*cluster.Service{{Namespace: "bookinfo", Name: "reviews", Selector: map[string]string{"app": "reviews"},
			ClusterIPs: []netip.Addr{ip("10.96.0.2")}, Ports: []cluster.ServicePort{{Name: "http", Protocol: "TCP", Port: 9080, TargetPort: 9080}}}},
	}
}

// denyAllReviews allows nothing to reviews at L4 (an ALLOW whose only rule needs HTTP).
const denyAllReviews = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-get, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - to: [{operation: {methods: [GET]}}]
`

func TestPlacementDecisions(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id := func(ns, sa string) policy.Peer {
		return policy.ParsePeer("spiffe://cluster.local/ns/" + ns + "/sa/" + sa)
	}
	conn := func(peer policy.Peer, src string) *policy.Conn {
		return &policy.Conn{Peer: peer, SrcIP: netip.MustParseAddr(src), DstIP: netip.MustParseAddr("10.0.2.2"), DstPort: 9080}
	}
	for _, tc := range []struct {
		name      string
		for_      string
		placement string // the waypoint pod's annotation; "" means veil
		opts      policy.Options
		c         *policy.Conn
		reason    policy.Reason
	}{
		{"a serving waypoint that does not declare veil's placement (istiod's): L4 against its identity", "all", "none", policy.Options{}, conn(id("bookinfo", "waypoint"), "10.0.2.9"), policy.ReasonNotAllowed},
		{"serving waypoint: policies were enforced there", "all", "", policy.Options{}, conn(id("bookinfo", "waypoint"), "10.0.2.9"), policy.ReasonViaWaypoint},
		{"service-only waypoint still serves the Service's pods", "service", "", policy.Options{}, conn(id("bookinfo", "waypoint"), "10.0.2.9"), policy.ReasonViaWaypoint},
		{"bypass of a workload waypoint refused", "all", "", policy.Options{}, conn(id("bookinfo", "frontend"), "10.0.1.2"), policy.ReasonWaypointBypass},
		{"a waypoint that does not serve the pod is a bypass", "all", "", policy.Options{}, conn(id("legacy", "waypoint"), "10.0.2.8"), policy.ReasonWaypointBypass},
		{"waypoint identity from another address is not the waypoint", "all", "", policy.Options{}, conn(id("bookinfo", "waypoint"), "10.0.1.2"), policy.ReasonWaypointBypass},
		{"service-only binding: direct pod traffic judged at L4, fail closed", "service", "", policy.Options{}, conn(id("bookinfo", "frontend"), "10.0.1.2"), policy.ReasonNotAllowed},
		{"bypass allowed: judged at L4", "all", "", policy.Options{AllowWaypointBypass: true}, conn(id("bookinfo", "frontend"), "10.0.1.2"), policy.ReasonNotAllowed},
		{"istio placement: L4 policies apply to the waypoint's identity", "all", "", policy.Options{Placement: policy.PlacementIstio}, conn(id("bookinfo", "waypoint"), "10.0.2.9"), policy.ReasonNotAllowed},
		{"plaintext is never via a waypoint", "all", "", policy.Options{}, conn(policy.Peer{}, "10.0.2.9"), policy.ReasonNotAllowed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pl := tc.placement
			if pl == "" {
				pl = "veil"
			}
			st := placementState(tc.for_, pl)
			a := &Agent{opts: Options{Node: "n2", TrustDomain: td, Policy: tc.opts}}
			a.store.Options = tc.opts
			if _, err := a.store.Apply(policy.Parse("p.yaml", []byte(denyAllReviews)).Objects...); err != nil {
				t.Fatal(err)
			}
			a.store.SetWorkloads(policyWorkloads(st)...)
			v := newView(st, "n2", td, nil)
			if d := a.decide(v, a.store.Snapshot(), tc.c); d.Reason != tc.reason {
				t.Fatalf("got %v; want %v", d, tc.reason)
			}
		})
	}
}
