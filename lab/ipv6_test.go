package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// withFamily gives the lab's nodes, pods and Services the IP families of f
// (Spec.Family).
func withFamily(f string) func(*Spec, *Options) {
	return func(s *Spec, _ *Options) { s.Family = f }
}

func TestFamilyAddresses(t *testing.T) {
	s := DefaultSpec()
	p, err := s.Pod("bookinfo/reviews")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		family                     string
		pod, node, svc, controller []string
	}{
		{"", []string{"10.100.2.10"}, []string{"10.99.0.2"}, []string{"10.96.0.11"}, []string{"10.99.0.254"}},
		{FamilyIPv4, []string{"10.100.2.10"}, []string{"10.99.0.2"}, []string{"10.96.0.11"}, []string{"10.99.0.254"}},
		{FamilyIPv6, []string{"fd00:100:2::10"}, []string{"fd00:99::2"}, []string{"fd00:96::11"}, []string{"fd00:99::254"}},
		{FamilyDual, []string{"10.100.2.10", "fd00:100:2::10"}, []string{"10.99.0.2", "fd00:99::2"}, []string{"10.96.0.11", "fd00:96::11"}, []string{"10.99.0.254"}},
	} {
		s.Family = tc.family
		str := func(as ...netip.Addr) []string {
			var out []string
			for _, a := range as {
				out = append(out, a.String())
			}
			return out
		}
		if got := str(s.PodIPs(p)...); !slices.Equal(got, tc.pod) {
			t.Errorf("family %q: reviews at %v, want %v", tc.family, got, tc.pod)
		}
		if got := str(s.NodeIPs("node-2")...); !slices.Equal(got, tc.node) {
			t.Errorf("family %q: node-2 at %v, want %v", tc.family, got, tc.node)
		}
		if got := str(s.ServiceIPs(1)...); !slices.Equal(got, tc.svc) {
			t.Errorf("family %q: Service reviews at %v, want %v", tc.family, got, tc.svc)
		}
		if got := str(s.controllerIP()); !slices.Equal(got, tc.controller) {
			t.Errorf("family %q: controller at %v, want %v", tc.family, got, tc.controller)
		}
		if s.PodIP(p).String() != tc.pod[0] || s.ServiceIP(1).String() != tc.svc[0] || s.NodeIP("node-2").String() != tc.node[0] {
			t.Errorf("family %q: the primary addresses are not the first", tc.family)
		}
	}
	// The digits of a two- or three-digit octet are kept: 10.100.200.210.
	if got := sixOf(netip.MustParseAddr("10.100.200.210")).String(); got != "fd00:100:200::210" {
		t.Errorf("sixOf(10.100.200.210) = %s", got)
	}
	// Every pod of a big lab gets distinct addresses in both families.
	big := &Spec{Name: "big", Family: FamilyDual}
	for n := 0; n < 200; n++ {
		big.Nodes = append(big.Nodes, fmt.Sprintf("n%d", n))
	}
	seen := map[netip.Addr]bool{}
	for _, node := range big.Nodes {
		for _, a := range big.NodeIPs(node) {
			if seen[a] {
				t.Fatalf("%s given twice", a)
			}
			seen[a] = true
		}
	}

	s.Family = "ipv5"
	if err := s.validate(); err == nil || !strings.Contains(err.Error(), `family: "ipv5"`) {
		t.Fatalf("family ipv5: %v, want an error naming the field", err)
	}
	s.Family = FamilyDual
	if err := checkFamilies(s, Options{Kube: true}); err == nil || !strings.Contains(err.Error(), "kube lab is IPv4 only") {
		t.Fatalf("a dual-stack kube lab: %v, want a refusal", err)
	}
}

// The cluster a dual-stack lab describes: both addresses of every pod (podIPs) and node
// (hostIPs), primary first, and a ClusterIP per family, as kube-apiserver has them.
func TestDualStackClusterYAML(t *testing.T) {
	s := DefaultSpec()
	s.Family = FamilyDual
	y := string(s.ClusterYAML())
	for _, want := range []string{
		"podIP: 10.100.2.10\n  podIPs:\n  - ip: 10.100.2.10\n  - ip: fd00:100:2::10\n",
		"hostIP: 10.99.0.2\n  hostIPs:\n  - ip: 10.99.0.2\n  - ip: fd00:99::2\n",
		"clusterIP: 10.96.0.11\n  clusterIPs:\n  - 10.96.0.11\n  - fd00:96::11\n  ipFamilies:\n  - IPv4\n  - IPv6\n  ipFamilyPolicy: RequireDualStack\n",
	} {
		if !strings.Contains(y, want) {
			t.Errorf("cluster YAML lacks\n%s\nin\n%s", want, y)
		}
	}
}

// sourcesPreserved checks, in each family of the lab, that the application sees the
// client pod's own address on every path: HBONE across nodes, same node, passthrough to
// a pod outside the mesh (across nodes), and a Service VIP load-balanced to a pod in
// the VIP's family.
func sourcesPreserved(t *testing.T, l *Lab) {
	t.Helper()
	for _, c := range []struct{ from, to, answer, path string }{
		{"bookinfo/frontend", "reviews:9080", "bookinfo/reviews", "HBONE"},
		{"bookinfo/reviews", "ratings:9080", "bookinfo/ratings", "same node"},
		{"bookinfo/reviews", "legacy/sleep:9080", "legacy/sleep", "passthrough"},
		{"bookinfo/productpage", "svc/reviews", "bookinfo/reviews", "Service VIP"},
	} {
		p, err := l.Spec.Pod(c.from)
		if err != nil {
			t.Fatal(err)
		}
		srcs := l.Spec.PodIPs(p)
		for i, target := range l.mustTargets(t, c.to) {
			got := l.Request(context.Background(), c.from, target)
			want := "hello from " + c.answer + " port 9080; you are " + srcs[i].String()
			if got.Result != "200" || got.Body != want {
				t.Errorf("%s: %s -> %s: %s %q, want 200 %q", c.path, c.from, target, got.Result, got.Body, want)
			}
		}
	}
}

// bothAddresses checks that the controller's config stream carried both addresses of a
// pod of the other node to node-2's agent, primary first.
func bothAddresses(t *testing.T, l *Lab) {
	t.Helper()
	body, err := l.NodeGet(context.Background(), "node-2", "127.0.0.1:15000", "/config_dump")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Workloads []struct {
			Namespace, Name string
			IPs             []string
		}
	}
	if err := json.Unmarshal(body, &d); err != nil {
		t.Fatal(err)
	}
	p, err := l.Spec.Pod("bookinfo/productpage")
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, a := range l.Spec.PodIPs(p) {
		want = append(want, a.String())
	}
	for _, w := range d.Workloads {
		if w.Namespace == "bookinfo" && w.Name == "productpage" {
			if !slices.Equal(w.IPs, want) {
				t.Fatalf("node-2's agent has productpage at %v, want %v", w.IPs, want)
			}
			return
		}
	}
	t.Fatalf("node-2's agent has no productpage: %s", body)
}

// TestIPv6OnlyLab: an IPv6-only lab (nodes, pods, Services and the controller): make
// demo's scenarios, the paths that keep the client's address, and the node's capture
// rules and routes in the IPv6 family.
func TestIPv6OnlyLab(t *testing.T) {
	l := upLab(t, withFamily(FamilyIPv6))
	var out bytes.Buffer
	mismatches, err := RunDemo(context.Background(), l, &out)
	t.Log("\n" + out.String())
	if err != nil || mismatches != 0 {
		t.Fatalf("demo on IPv6: %d mismatches, %v", mismatches, err)
	}
	sourcesPreserved(t, l)
	bothAddresses(t, l)
	// Not an IPv4 address anywhere but loopback: the agents reached the controller, and
	// each other, over IPv6.
	for _, ns := range []string{l.fabricNS(), l.nodeNS("node-1"), l.nodeNS("node-2"), l.podNS(&l.Spec.Pods[0])} {
		out, err := exec.Command("ip", "-n", ns, "-4", "-o", "addr", "show", "scope", "global").Output()
		if err != nil || len(bytes.TrimSpace(out)) != 0 {
			t.Errorf("%s has IPv4 addresses: %v\n%s", ns, err, out)
		}
	}
	// The agent's IPv6 policy rule and local route (bpf/node.go), as the README lists them.
	rules, err := exec.Command("ip", "-n", l.nodeNS("node-1"), "-6", "rule", "show").Output()
	if err != nil || !bytes.Contains(rules, []byte("fwmark")) {
		t.Errorf("node-1's IPv6 rules: %v\n%s; want the agent's fwmark rule", err, rules)
	}
	routes, err := exec.Command("ip", "-n", l.nodeNS("node-1"), "-6", "route", "show", "table", "all", "type", "local").Output()
	if err != nil || !bytes.Contains(routes, []byte("local default dev lo")) {
		t.Errorf("node-1's IPv6 local routes: %v\n%s; want the agent's local default route", err, routes)
	}
}
