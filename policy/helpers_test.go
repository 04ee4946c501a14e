package policy

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// load parses and validates YAML, failing the test on any error.
func load(t testing.TB, yaml string) []*Object {
	t.Helper()
	m := Parse("test.yaml", []byte(yaml))
	for _, err := range m.Errors {
		t.Fatalf("parse: %v", err)
	}
	for _, o := range m.Objects {
		if _, err := Validate(o, Options{}); err != nil {
			t.Fatalf("validate: %v", err)
		}
	}
	return m.Objects
}

func loadFile(t testing.TB, name string) []*Object {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return load(t, string(data))
}

// wl builds a workload from "ns/name" and "k=v" labels; its IP is derived from the name.
func wl(id string, labels ...string) *Workload {
	ns, name, _ := strings.Cut(id, "/")
	w := &Workload{Namespace: ns, Name: name, Labels: map[string]string{}, ServiceAccount: name}
	for _, l := range labels {
		k, v, _ := strings.Cut(l, "=")
		w.Labels[k] = v
	}
	return w
}

// from builds a connection from a peer ("" for plaintext, "ns/sa" for a cluster.local identity,
// or a full spiffe:// URI) to port.
func from(peer string, port uint16) *Conn {
	c := &Conn{DstPort: port, SrcIP: netip.MustParseAddr("10.0.0.1"), DstIP: netip.MustParseAddr("10.0.0.2")}
	switch {
	case peer == "":
	case strings.HasPrefix(peer, "spiffe://"):
		c.Peer = ParsePeer(peer)
	default:
		ns, sa, _ := strings.Cut(peer, "/")
		c.Peer = ParsePeer("spiffe://cluster.local/ns/" + ns + "/sa/" + sa)
	}
	return c
}

func httpReq(peer string, port uint16, method, path string) *Request {
	return &Request{Conn: *from(peer, port), Method: method, Path: path, Host: "svc"}
}

// decisionOf names a decision compactly for table tests: "allow", "allow by ns/name",
// "deny by ns/name", "deny: not allowed".
func decisionOf(d Decision) string {
	switch d.Reason {
	case ReasonNoAllowPolicy:
		return "allow"
	case ReasonAllowed:
		return "allow by " + d.Policy.Namespace + "/" + d.Policy.Name
	case ReasonDenied:
		return "deny by " + d.Policy.Namespace + "/" + d.Policy.Name
	case ReasonNotAllowed:
		return "deny: not allowed"
	}
	return d.Reason.String()
}
