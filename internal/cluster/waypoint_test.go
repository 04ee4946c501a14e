package cluster

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// waypointState is a namespace "bookinfo" with a waypoint "waypoint" (taking for), its
// pod, an app pod "reviews" with a Service, and the namespace labelled nsLabels.
func waypointState(for_ string, nsLabels map[string]string) *State {
	gwLabels := map[string]string{}
	if for_ != "" {
		gwLabels[WaypointForLabel] = for_
	}
	return &State{
		Namespaces: map[string]*Namespace{"bookinfo": {Name: "bookinfo", Labels: nsLabels}},
		Gateways:   []*Gateway{{Namespace: "bookinfo", Name: "waypoint", ClassName: WaypointClass, Labels: gwLabels}},
		Pods: []*Pod{
			{Namespace: "bookinfo", Name: "waypoint-0", ServiceAccount: "waypoint", Ready: true,
				Labels: map[string]string{GatewayNameLabel: "waypoint"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.9")}},
			{Namespace: "bookinfo", Name: "reviews", ServiceAccount: "reviews", Ready: true,
				Labels: map[string]string{"app": "reviews"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
		},
		Services: []*Service{{Namespace: "bookinfo", Name: "reviews", Selector: map[string]string{"app": "reviews"},
			ClusterIPs: []netip.Addr{netip.MustParseAddr("10.96.0.2")}}},
	}
}

func TestWaypointBinding(t *testing.T) {
	ns := map[string]string{UseWaypointLabel: "waypoint"}
	for _, tc := range []struct {
		name           string
		for_           string
		nsLabels       map[string]string
		podLabel       string // use-waypoint on the pod, "" for none
		svcLabel       string
		wantSvc        string // "bound", "none" or an error fragment
		wantPod        string
		wantServingIDs int
	}{
		{name: "namespace, default service", nsLabels: ns, wantSvc: "bound", wantPod: "none", wantServingIDs: 1},
		{name: "namespace, all", for_: "all", nsLabels: ns, wantSvc: "bound", wantPod: "bound", wantServingIDs: 1},
		{name: "namespace, workload", for_: "workload", nsLabels: ns, wantSvc: "does not take service traffic", wantPod: "bound", wantServingIDs: 1},
		{name: "pod label on a service waypoint", podLabel: "waypoint", wantSvc: "none", wantPod: "does not take workload traffic"},
		{name: "object none wins over namespace", for_: "all", nsLabels: ns, podLabel: "none", svcLabel: "none", wantSvc: "none", wantPod: "none"},
		{name: "missing waypoint", svcLabel: "nope", wantSvc: "no such Gateway", wantPod: "none"},
		{name: "bad waypoint-for", for_: "sometimes", svcLabel: "waypoint", wantSvc: "is not service, workload, all or none", wantPod: "none"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := waypointState(tc.for_, tc.nsLabels)
			if tc.podLabel != "" {
				st.Pods[1].Labels[UseWaypointLabel] = tc.podLabel
			}
			if tc.svcLabel != "" {
				st.Services[0].Labels = map[string]string{UseWaypointLabel: tc.svcLabel}
			}
			b := st.Bindings()
			check := func(what string, w *Waypoint, err error, want string) {
				t.Helper()
				switch {
				case want == "bound" && (err != nil || w == nil || w.Gateway.Name != "waypoint"):
					t.Errorf("%s: got %v, %v; want bound to waypoint", what, w, err)
				case want == "none" && (err != nil || w != nil):
					t.Errorf("%s: got %v, %v; want not bound", what, w, err)
				case want != "bound" && want != "none" && (err == nil || !strings.Contains(err.Error(), want)):
					t.Errorf("%s: got %v, %v; want an error with %q", what, w, err, want)
				}
			}
			w, err := b.ServiceWaypoint(st.Services[0])
			check("service", w, err, tc.wantSvc)
			w, err = b.PodWaypoint(st.Pods[1])
			check("pod", w, err, tc.wantPod)
			if got := len(b.ServingWaypoints(st.Pods[1])); got != tc.wantServingIDs {
				t.Errorf("serving waypoints: got %d, want %d", got, tc.wantServingIDs)
			}
			if w, err := b.PodWaypoint(st.Pods[0]); w != nil || err != nil {
				t.Errorf("a waypoint's own pod got a waypoint: %v, %v", w, err)
			}
		})
	}
}

func TestWaypointRefusedWhenItsServiceAccountRunsOtherPods(t *testing.T) {
	st := waypointState("all", map[string]string{UseWaypointLabel: "waypoint"})
	st.Pods[1].ServiceAccount = "waypoint" // reviews runs as the waypoint's identity
	_, err := st.Bindings().ServiceWaypoint(st.Services[0])
	var we *WaypointError
	if !errors.As(err, &we) || !strings.Contains(err.Error(), `service account "waypoint" also runs pod reviews`) {
		t.Fatalf("got %v; want the waypoint refused", err)
	}
}

func TestWaypointNotReady(t *testing.T) {
	st := waypointState("", map[string]string{UseWaypointLabel: "waypoint"})
	st.Pods[0].Ready = false
	if _, err := st.Bindings().ServiceWaypoint(st.Services[0]); err == nil || !strings.Contains(err.Error(), "no ready waypoint pod") {
		t.Fatalf("got %v; want not ready", err)
	}
}

func TestWaypointNamespaceLabel(t *testing.T) {
	st := waypointState("", nil)
	st.Namespaces["other"] = &Namespace{Name: "other"}
	st.Services = append(st.Services, &Service{Namespace: "other", Name: "ratings",
		Labels: map[string]string{UseWaypointLabel: "waypoint", UseWaypointNamespaceLabel: "bookinfo"}})
	w, err := st.Bindings().ServiceWaypoint(st.Services[1])
	if err != nil || w == nil || w.Gateway.Namespace != "bookinfo" {
		t.Fatalf("got %v, %v; want bookinfo/waypoint", w, err)
	}
}

func TestWaypointRefusedWithTwoServiceAccounts(t *testing.T) {
	st := waypointState("all", map[string]string{UseWaypointLabel: "waypoint"})
	// A pod that labels itself as the waypoint's, under its own account.
	st.Pods = append(st.Pods, &Pod{Namespace: "bookinfo", Name: "impostor", ServiceAccount: "evil", Ready: true,
		Labels: map[string]string{GatewayNameLabel: "waypoint"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.66")}})
	_, err := st.Bindings().ServiceWaypoint(st.Services[0])
	if err == nil || !strings.Contains(err.Error(), "2 service accounts") {
		t.Fatalf("got %v; want the waypoint refused", err)
	}
}

func TestWaypointOwnServiceIsNotBound(t *testing.T) {
	st := waypointState("all", map[string]string{UseWaypointLabel: "waypoint"})
	own := &Service{Namespace: "bookinfo", Name: "waypoint", Labels: map[string]string{GatewayNameLabel: "waypoint"}}
	if w, err := st.Bindings().ServiceWaypoint(own); w != nil || err != nil {
		t.Fatalf("the waypoint's own Service got %v, %v", w, err)
	}
}

func TestWaypointPlacementAnnotation(t *testing.T) {
	st := waypointState("all", map[string]string{UseWaypointLabel: "waypoint"})
	w, _ := st.Bindings().ServiceWaypoint(st.Services[0])
	if w == nil || w.EnforcesWorkloadPolicies || w.ServiceAccount != "waypoint" {
		t.Fatalf("unannotated waypoint: %+v", w)
	}
	st.Pods[0].Annotations = map[string]string{PolicyPlacementAnnotation: "veil"}
	if w, _ := st.Bindings().ServiceWaypoint(st.Services[0]); w == nil || !w.EnforcesWorkloadPolicies {
		t.Fatalf("annotated waypoint: %+v", w)
	}
}
