package agent

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
)

// The agent finds a pod's veth from the pod's side, whatever the node's routes say: a
// routed pod, the same pod with its host route gone, a pod on a Linux bridge (flannel's
// cni0, the bridge plugin) and one with no route at all (an overlay) are all found; a
// pod interface that is not a veth (macvlan) and a pod of another node are refused.
func TestNetnsLinksFindsPodVethsFromThePodsSide(t *testing.T) {
	tn := newTestNet(t, []podSpec{{name: "routed", node: "node-1", ip: netip.MustParseAddr("10.77.1.10")},
		{name: "remote", node: "node-2", ip: netip.MustParseAddr("10.77.2.10")}}, false)
	node := tn.nodes["node-1"]
	links := &NetnsLinks{}
	find := func(ip string) (string, error) {
		var name string
		err := node.do(func() error {
			idx, err := links.Link(netip.MustParseAddr(ip))
			if err != nil {
				return err
			}
			name, err = linkName(idx)
			return err
		})
		return name, err
	}
	if got, err := find("10.77.1.10"); err != nil || got != "vp0" {
		t.Fatalf("routed pod: %q, %v; want vp0", got, err)
	}
	// No host route, and a default route through the uplink: a route lookup would
	// answer with the uplink. The veth is still found.
	run(t, "ip", "-n", node.name, "route", "del", "10.77.1.10/32")
	run(t, "ip", "-n", node.name, "route", "replace", "default", "dev", "up1")
	links = &NetnsLinks{}
	if got, err := find("10.77.1.10"); err != nil || got != "vp0" {
		t.Fatalf("pod without a host route: %q, %v; want vp0", got, err)
	}

	// A bridge: the pod's veth is a port of br0, which holds the gateway address and the
	// route to the pod subnet.
	run(t, "ip", "-n", node.name, "link", "add", "br0", "type", "bridge")
	run(t, "ip", "-n", node.name, "addr", "add", "10.77.5.1/24", "dev", "br0")
	run(t, "ip", "-n", node.name, "link", "set", "br0", "up")
	bridged := newNS(t, "pod")
	run(t, "ip", "link", "add", "vb0", "netns", node.name, "type", "veth", "peer", "name", "eth0", "netns", bridged.name)
	run(t, "ip", "-n", node.name, "link", "set", "vb0", "master", "br0", "up")
	run(t, "ip", "-n", bridged.name, "addr", "add", "10.77.5.10/24", "dev", "eth0")
	run(t, "ip", "-n", bridged.name, "link", "set", "eth0", "up")
	if got, err := find("10.77.5.10"); err != nil || got != "vb0" {
		t.Fatalf("bridged pod: %q, %v; want vb0 (never the bridge)", got, err)
	}

	// macvlan: the pod's interface is not a veth.
	mac := newNS(t, "pod")
	run(t, "ip", "-n", node.name, "link", "add", "mv0", "link", "up1", "type", "macvlan", "mode", "bridge")
	run(t, "ip", "-n", node.name, "link", "set", "mv0", "netns", mac.name)
	run(t, "ip", "-n", mac.name, "addr", "add", "10.77.6.10/24", "dev", "mv0")
	if got, err := find("10.77.6.10"); err == nil || !strings.Contains(err.Error(), "not a veth") {
		t.Fatalf("macvlan pod: %q, %v; want a refusal naming it not a veth", got, err)
	}

	// node-2's pod: its veth pairs with node-2, not with this namespace.
	if got, err := find("10.77.2.10"); err == nil {
		t.Fatalf("another node's pod: %q; want a refusal", got)
	}

	// Remembered, and checked again: once the pod's veth is gone it is not found.
	run(t, "ip", "-n", node.name, "link", "del", "vb0")
	if got, err := find("10.77.5.10"); err == nil {
		t.Fatalf("a deleted pod: %q; want an error", got)
	}
}

func linkName(idx int) (string, error) {
	l, err := netlink.LinkByIndex(idx)
	if err != nil {
		return "", err
	}
	return l.Attrs().Name, nil
}
