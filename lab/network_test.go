package lab

import (
	"bytes"
	"context"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// withNetwork wires the lab's pods as another CNI does (Spec.Network).
func withNetwork(n string) func(*Spec, *Options) {
	return func(s *Spec, _ *Options) { s.Network = n }
}

// TestCNIShapes: make demo's scenarios, and connections between two pods of one node
// both ways, on pod networks shaped like the common CNIs besides the routed default: a
// Linux bridge (flannel's cni0, the bridge plugin), where frames between a node's pods
// are switched, never routed; and an overlay (VXLAN between the nodes, as Calico or
// Cilium in VXLAN mode), where other nodes' traffic arrives on the vxlan device.
func TestCNIShapes(t *testing.T) {
	for _, n := range []string{NetworkBridge, NetworkOverlay} {
		t.Run(n, func(t *testing.T) {
			l := upLab(t, withNetwork(n))
			ctx := context.Background()
			var out bytes.Buffer
			mismatches, err := RunDemo(ctx, l, &out)
			t.Log("\n" + out.String())
			if err != nil || mismatches != 0 {
				t.Fatalf("demo on a %s network: %d mismatches, %v", n, mismatches, err)
			}
			// Same node (node-1), under STRICT: enrolled to enrolled over mTLS, plaintext
			// from a pod outside the mesh refused, although the bridge would switch it.
			l.applyStrict(t)
			l.want(t, "bookinfo/frontend", "productpage:9080", "200")
			l.want(t, "bookinfo/productpage", "frontend:9080", "200")
			l.want(t, "legacy/sleep", "productpage:9080", "reset")
			l.want(t, "legacy/meshed-sleep", "frontend:9080", "200")
			// And across nodes.
			l.want(t, "bookinfo/frontend", "reviews:9080", "200")
			l.want(t, "legacy/sleep", "reviews:9080", "reset")
			// The network is the shape it claims: node-1's pods are ports of cni0, or
			// node-2 received the other node's traffic on vxlan0.
			switch n {
			case NetworkBridge:
				out, err := exec.Command("ip", "-n", l.nodeNS("node-1"), "-o", "link", "show", "master", "cni0").Output()
				if err != nil || strings.Count(string(out), "\n") != 4 {
					t.Fatalf("cni0's ports on node-1: %v\n%s; want the node's 4 pods", err, out)
				}
			case NetworkOverlay:
				out, err := exec.Command("ip", "-n", l.nodeNS("node-2"), "-s", "-o", "link", "show", "vxlan0").Output()
				f := strings.Fields(string(out))
				i := slices.Index(f, "RX:")
				if err != nil || i < 0 || len(f) < i+10 || f[i+9] == "0" {
					t.Fatalf("vxlan0 on node-2: %v\n%s; want packets received", err, out)
				}
			}
		})
	}
}
