//go:build linux

package bpf

import (
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
)

// bridgeTopo is one node whose pods hang on a Linux bridge, as flannel's cni0 or the
// bridge plugin build it: the pods share a subnet, so their frames to each other are
// switched by the bridge and never routed.
//
//	bpod1 (10.244.9.2) --vb1--+
//	                          br0 (10.244.9.1/24) node
//	bpod2 (10.244.9.3) --vb2--+
type bridgeTopo struct {
	node, pod1, pod2 *testNS
	vb1, vb2         int
	pinDir           string
}

var (
	bpod1 = netip.MustParseAddr("10.244.9.2")
	bpod2 = netip.MustParseAddr("10.244.9.3")
)

func newBridgeTopo(t *testing.T) *bridgeTopo {
	t.Helper()
	requireRoot(t)
	tp := &bridgeTopo{node: newNS(t, "bnode"), pod1: newNS(t, "bpod1"), pod2: newNS(t, "bpod2")}
	h := tp.node.handle(t)
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
	if err := h.LinkAdd(br); err != nil {
		t.Fatal(err)
	}
	addr, _ := netlink.ParseAddr("10.244.9.1/24")
	if err := h.AddrAdd(br, addr); err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}
	tp.vb1 = veth(t, tp.node, "vb1", nil, tp.pod1, "eth0", []string{"10.244.9.2/24"})
	tp.vb2 = veth(t, tp.node, "vb2", nil, tp.pod2, "eth0", []string{"10.244.9.3/24"})
	for _, name := range []string{"vb1", "vb2"} {
		l, err := h.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetMaster(l, br); err != nil {
			t.Fatal(err)
		}
	}
	route(t, tp.pod1, "0.0.0.0/0", "10.244.9.1")
	route(t, tp.pod2, "0.0.0.0/0", "10.244.9.1")
	tp.pinDir = bpffs(t)
	return tp
}

// TestCaptureOnABridge: on a bridge, a connection between two pods of the node is still
// captured at the first pod's veth, in both directions, although the bridge would switch
// the frames straight to the other pod.
func TestCaptureOnABridge(t *testing.T) {
	tp := newBridgeTopo(t)
	var c *Capture
	tp.node.do(t, func() (err error) {
		c, err = Load(Options{PinDir: tp.pinDir, Uplinks: []string{}})
		return err
	})
	t.Cleanup(func() { c.Close() })
	if err := c.Enroll(Pod{IfIndex: tp.vb1, IPs: []netip.Addr{bpod1}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Attach(tp.vb2); err != nil {
		t.Fatal(err)
	}
	startAgent(t, &topo{node: tp.node}, c)
	serve(t, tp.pod1, "tcp", ":9080", "pod1", nil)
	serve(t, tp.pod2, "tcp", ":9080", "pod2", nil)

	t.Cleanup(func() {
		if t.Failed() {
			cs, _ := c.Counters()
			t.Logf("counters %+v", cs)
		}
	})
	to2 := netip.AddrPortFrom(bpod2, 9080)
	wantAnswer(t, mustAsk(t, tp.pod1, to2.String(), nil), "outbound", to2, bpod1)
	to1 := netip.AddrPortFrom(bpod1, 9080)
	wantAnswer(t, mustAsk(t, tp.pod2, to1.String(), nil), "inbound", to1, bpod2)
	hb := netip.AddrPortFrom(bpod1, 15008)
	wantAnswer(t, mustAsk(t, tp.pod2, hb.String(), nil), "hbone", hb, bpod2)
}
