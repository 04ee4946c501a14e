package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// synthetic builds n AuthorizationPolicies in namespace "bench" that all apply to the workload
// bench/target (a mix: namespace-wide and selector policies; ALLOW by principal, DENY by
// namespace, port and IP rules), a STRICT namespace PeerAuthentication, and nw workloads.
func synthetic(n, nw int) ([]*Object, []*Workload) {
	var b strings.Builder
	b.WriteString("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: bench}\nspec: {mtls: {mode: STRICT}}\n---\n")
	for i := 0; i < n; i++ {
		selector := ""
		if i%2 == 0 {
			selector = "  selector: {matchLabels: {app: target}}\n"
		}
		switch i % 4 {
		case 0, 1:
			fmt.Fprintf(&b, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-%d, namespace: bench}\nspec:\n%s  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/client-%d/sa/sa-%d]}\n    to:\n    - operation: {ports: [\"%d\"]}\n---\n", i, selector, i, i, 8000+i%100)
		case 2:
			fmt.Fprintf(&b, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-%d, namespace: bench}\nspec:\n%s  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [evil-%d]}\n---\n", i, selector, i)
		case 3:
			fmt.Fprintf(&b, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-ip-%d, namespace: bench}\nspec:\n%s  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/team-%d/*\"]}\n    when:\n    - {key: source.ip, values: [\"10.%d.0.0/16\"]}\n---\n", i, selector, i, i%250)
		}
	}
	m := Parse("bench.yaml", []byte(b.String()))
	if len(m.Errors) > 0 {
		panic(m.Errors[0])
	}
	ws := []*Workload{{Namespace: "bench", Name: "target", Labels: map[string]string{"app": "target"},
		IPs: []netip.Addr{netip.MustParseAddr("10.255.0.1")}}}
	for i := 1; i < nw; i++ {
		ws = append(ws, &Workload{Namespace: fmt.Sprintf("ns-%d", i%100), Name: fmt.Sprintf("pod-%d", i),
			Labels: map[string]string{"app": fmt.Sprintf("app-%d", i%500), "pod-template-hash": fmt.Sprintf("h%d", i)},
			IPs:    []netip.Addr{netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})}})
	}
	return m.Objects, ws
}

func benchConn(i int) *Conn {
	c := &Conn{Peer: ParsePeer(fmt.Sprintf("spiffe://cluster.local/ns/client-%d/sa/sa-%d", i, i)),
		SrcIP: netip.MustParseAddr("10.1.2.3"), DstIP: netip.MustParseAddr("10.255.0.1"), DstPort: uint16(8000 + i%100)}
	return c
}

// TestL4DecisionDoesNotAllocate fails if an L4 decision allocates.
func TestL4DecisionDoesNotAllocate(t *testing.T) {
	objs, ws := synthetic(1000, 10)
	s := Compile(objs, ws, Options{})
	conns := []*Conn{benchConn(500), benchConn(501), benchConn(7), {DstIP: netip.MustParseAddr("10.255.0.1"), DstPort: 80}}
	evil := benchConn(1)
	evil.Peer = ParsePeer("spiffe://cluster.local/ns/evil-2/sa/x")
	conns = append(conns, evil)
	for _, c := range conns {
		d := s.EvaluateL4(c)
		if d.Reason == 0 {
			t.Fatalf("no decision for %+v", c)
		}
		if n := testing.AllocsPerRun(200, func() { _ = s.EvaluateL4(c) }); n != 0 {
			t.Errorf("%v: %v allocations per L4 decision", d, n)
		}
	}
	if d := s.EvaluateL4(conns[0]); decisionOf(d) != "allow by bench/allow-500" {
		t.Errorf("decision %v", d)
	}
	if d := s.EvaluateL4(evil); decisionOf(d) != "deny by bench/deny-2" {
		t.Errorf("decision %v", d)
	}
	if d := s.EvaluateL4(conns[3]); decisionOf(d) != "deny by istio-system/istio_converted_static_strict" {
		t.Errorf("decision %v", d)
	}
	var store Store
	store.SetWorkloads(ws...)
	if n := testing.AllocsPerRun(100, func() { _ = store.Snapshot().EvaluateL4(conns[0]) }); n != 0 {
		t.Errorf("Store.Snapshot + decision: %v allocations", n)
	}
}

func BenchmarkL4Decision(b *testing.B) {
	for _, size := range []struct{ policies, workloads int }{{10, 10}, {1000, 10}, {10000, 10}, {1000, 100000}} {
		b.Run(fmt.Sprintf("policies=%d/workloads=%d", size.policies, size.workloads), func(b *testing.B) {
			objs, ws := synthetic(size.policies, size.workloads)
			var store Store
			store.SetWorkloads(ws...)
			if _, err := store.Apply(objs...); err != nil {
				b.Fatal(err)
			}
			cw := store.Snapshot().Workload("bench", "target")
			if got := len(cw.Policies); got != size.policies {
				b.Fatalf("%d policies in scope, want %d", got, size.policies)
			}
			conns := make([]*Conn, 64)
			for i := range conns {
				conns[i] = benchConn(i * size.policies / 64)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				_ = store.Snapshot().EvaluateL4(conns[i&63])
			}
		})
	}
}

func BenchmarkCompile(b *testing.B) {
	for _, size := range []struct{ policies, workloads int }{{10, 10}, {1000, 10}, {10000, 10}, {10000, 100000}} {
		b.Run(fmt.Sprintf("policies=%d/workloads=%d", size.policies, size.workloads), func(b *testing.B) {
			objs, ws := synthetic(size.policies, size.workloads)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				_ = Compile(objs, ws, Options{})
			}
		})
	}
}

func BenchmarkHTTPDecision(b *testing.B) {
	s := Compile(loadFile(b, "authz-ratings-combined.yaml"), nil, Options{})
	cw := s.Compile(wl("bookinfo/ratings", "app=ratings"))
	r := httpReq("bookinfo/reviews", 9080, "GET", "/ratings/1")
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		_ = cw.EvaluateHTTP(r)
	}
}
