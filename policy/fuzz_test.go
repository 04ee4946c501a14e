package policy

import (
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func addExampleSeeds(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.yaml")
	for _, name := range files {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {a: b}}\n  portLevelMtls: {80: {mode: STRICT}}\n"))
	f.Add([]byte("---\n---\nkind: List\napiVersion: v1\nitems: [{}]\n"))
}

// FuzzParse: Parse and Validate never panic, and parsing is deterministic.
func FuzzParse(f *testing.F) {
	addExampleSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		m1 := Parse("fuzz.yaml", data)
		m2 := Parse("fuzz.yaml", data)
		if len(m1.Objects) != len(m2.Objects) || len(m1.Errors) != len(m2.Errors) || !reflect.DeepEqual(m1.Skipped, m2.Skipped) {
			t.Fatalf("non-deterministic parse")
		}
		for i, e := range m1.Errors {
			if e.Error() != m2.Errors[i].Error() {
				t.Fatalf("non-deterministic error %q vs %q", e, m2.Errors[i])
			}
		}
		for _, o := range m1.Objects {
			_, _ = Validate(o, Options{})
		}
	})
}

// FuzzEvaluate: compiling any valid policy set and evaluating any connection or request never
// panics, and the decision is deterministic.
func FuzzEvaluate(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.yaml")
	for i, name := range files {
		data, _ := os.ReadFile(name)
		f.Add(data, "spiffe://cluster.local/ns/bookinfo/sa/frontend", uint16(9080), "GET", "/reviews/1", "reviews", byte(i))
		f.Add(data, "", uint16(8080), "POST", "/x?y", "ratings", byte(i))
	}
	f.Fuzz(func(t *testing.T, data []byte, peer string, port uint16, method, path, app string, ip byte) {
		var objs []*Object
		m := Parse("fuzz.yaml", data)
		for _, o := range m.Objects {
			if _, err := Validate(o, Options{}); err == nil {
				objs = append(objs, o)
			}
		}
		w := &Workload{Namespace: "bookinfo", Name: "pod", Labels: map[string]string{"app": app},
			IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 0, 0, ip})}}
		s := Compile(objs, []*Workload{w}, Options{TrustDomainAliases: []string{"td1"}})
		c := &Conn{Peer: ParsePeer(peer), SrcIP: netip.AddrFrom4([4]byte{ip, 1, 2, 3}), DstIP: w.IPs[0], DstPort: port}
		d1, d2 := s.EvaluateL4(c), s.EvaluateL4(c)
		if d1 != d2 || d1.Reason == 0 {
			t.Fatalf("L4 decision not deterministic: %v vs %v", d1, d2)
		}
		r := &Request{Conn: *c, Method: method, Path: path, Host: app,
			Headers: map[string][]string{"x-" + app: {method}}, JWT: &JWT{Issuer: peer, Subject: app, Claims: map[string]any{"scope": path}}}
		cw := s.Workload("bookinfo", "pod")
		h1, h2 := cw.EvaluateHTTP(r), cw.EvaluateHTTP(r)
		if h1 != h2 || h1.Reason == 0 {
			t.Fatalf("HTTP decision not deterministic: %v vs %v", h1, h2)
		}
		_ = h1.String()
	})
}
