package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"
)

// The kernel tests build a two-node network out of network namespaces, as a routed CNI
// would: nodes joined by a veth "uplink", each pod a namespace with a veth into its
// node, /32 pod addresses, routes between nodes.
//
// Until the BPF capture lands, two things stand in for it, both real kernel mechanisms:
//   - outbound and plaintext connections are handed to the agent by the test, which
//     accepts them on the node and calls Agent.Outbound or Agent.Plaintext with the
//     original destination, as the capture's listener will;
//   - policy routing makes the node deliver locally what the capture will assign to the
//     agent: HBONE (dport 15008) arriving on the uplink, and the applications' replies
//     (sport 9080) to the agent's transparent dials.

// appPort is where every test application listens.
const appPort = 9080

// netNS is a network namespace made by a test.
type netNS struct {
	name   string
	handle netns.NsHandle
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		// The kernel tests need CAP_NET_ADMIN for namespaces and IP_TRANSPARENT. CI runs
		// as root, so there this never skips.
		if os.Getenv("CI") != "" {
			t.Fatal("CI must run the kernel tests as root: " + "needs root (network namespaces, IP_TRANSPARENT); CI runs it as root")
		}
		t.Skip("needs root (network namespaces, IP_TRANSPARENT); CI runs it as root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatal("iproute2's ip command is required: apt-get install iproute2")
	}
}

func run(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// newNS creates a namespace with a unique name and deletes it when the test ends.
func newNS(t *testing.T, role string) *netNS {
	t.Helper()
	b := make([]byte, 3)
	rand.Read(b)
	name := "veil-" + role + "-" + hex.EncodeToString(b)
	run(t, "ip", "netns", "add", name)
	h, err := netns.GetFromName(name)
	if err != nil {
		exec.Command("ip", "netns", "del", name).Run()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.Close()
		exec.Command("ip", "netns", "del", name).Run()
	})
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return &netNS{name: name, handle: h}
}

// do runs f on a thread inside the namespace. Sockets created by f stay in the
// namespace when used from other goroutines afterwards.
func (n *netNS) do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Back to the original namespace and unlocked afterwards; a thread that cannot
		// go back stays locked and Go discards it with this goroutine.
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(n.handle); err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.name, err)
			return
		}
		ferr := f()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

func (n *netNS) listen(t *testing.T, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	if err := n.do(func() (err error) { l, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func (n *netNS) dial(ctx context.Context, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	return c, err
}

// nsSockets creates the agent's sockets inside a node namespace.
type nsSockets struct {
	ns   *netNS
	host HostSockets
}

func (s nsSockets) Listen(ctx context.Context, addr string) (l net.Listener, err error) {
	err = s.ns.do(func() error { l, err = s.host.Listen(ctx, addr); return err })
	return l, err
}

func (s nsSockets) Dial(ctx context.Context, src, raddr netip.AddrPort) (c net.Conn, err error) {
	err = s.ns.do(func() error { c, err = s.host.Dial(ctx, src, raddr); return err })
	return c, err
}

func (s nsSockets) ForgetTimeWait(local, remote netip.AddrPort) error {
	return s.ns.do(func() error { return s.host.ForgetTimeWait(local, remote) })
}

func (s nsSockets) dialString(ctx context.Context, _, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	return s.Dial(ctx, netip.AddrPort{}, ap)
}

// testNet is the two-node network.
type testNet struct {
	nodes map[string]*netNS
	pods  map[string]*netNS // by pod name
	// nodeIP is each node's uplink address.
	nodeIP map[string]netip.Addr
}

type podSpec struct {
	name, node string
	ip         netip.Addr
}

// newTestNet builds nodes node-1 (10.77.0.1) and node-2 (10.77.0.2) and the pods. With
// standIn, policy routing stands in for the capture (see above); without, the test
// loads the real BPF capture.
func newTestNet(t *testing.T, pods []podSpec, standIn bool) *testNet {
	t.Helper()
	requireRoot(t)
	tn := &testNet{nodes: map[string]*netNS{}, pods: map[string]*netNS{}, nodeIP: map[string]netip.Addr{}}
	n1, n2 := newNS(t, "n1"), newNS(t, "n2")
	tn.nodes["node-1"], tn.nodes["node-2"] = n1, n2
	tn.nodeIP["node-1"], tn.nodeIP["node-2"] = netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("10.77.0.2")
	run(t, "ip", "link", "add", "up1", "netns", n1.name, "type", "veth", "peer", "name", "up2", "netns", n2.name)
	for i, n := range []*netNS{n1, n2} {
		dev := fmt.Sprintf("up%d", i+1)
		other := 2 - i
		run(t, "ip", "-n", n.name, "addr", "add", fmt.Sprintf("10.77.0.%d/24", i+1), "dev", dev)
		run(t, "ip", "-n", n.name, "link", "set", dev, "up")
		run(t, "ip", "-n", n.name, "route", "add", fmt.Sprintf("10.77.%d.0/24", other), "via", fmt.Sprintf("10.77.0.%d", other))
		run(t, "ip", "netns", "exec", n.name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		if standIn {
			// What the capture does: HBONE from other nodes is delivered to the agent.
			run(t, "ip", "-n", n.name, "rule", "add", "pref", "100", "iif", dev, "ipproto", "tcp", "dport", "15008", "lookup", "100")
			run(t, "ip", "-n", n.name, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
		}
	}
	for i, p := range pods {
		node := tn.nodes[p.node]
		pns := newNS(t, "pod")
		tn.pods[p.name] = pns
		hostDev := fmt.Sprintf("vp%d", i)
		gw := fmt.Sprintf("10.77.%d.1", map[string]int{"node-1": 1, "node-2": 2}[p.node])
		run(t, "ip", "link", "add", hostDev, "netns", node.name, "type", "veth", "peer", "name", "eth0", "netns", pns.name)
		run(t, "ip", "-n", pns.name, "addr", "add", p.ip.String()+"/32", "dev", "eth0")
		run(t, "ip", "-n", pns.name, "link", "set", "eth0", "up")
		run(t, "ip", "-n", pns.name, "route", "add", gw, "dev", "eth0")
		run(t, "ip", "-n", pns.name, "route", "add", "default", "via", gw)
		run(t, "ip", "-n", node.name, "addr", "add", gw+"/32", "dev", hostDev)
		run(t, "ip", "-n", node.name, "link", "set", hostDev, "up")
		run(t, "ip", "-n", node.name, "route", "add", p.ip.String()+"/32", "dev", hostDev)
		if standIn {
			// What the capture does: the application's replies to the agent's
			// transparent dials are delivered to the agent's socket.
			run(t, "ip", "-n", node.name, "rule", "add", "pref", "101", "iif", hostDev, "ipproto", "tcp", "sport", fmt.Sprint(appPort), "lookup", "100")
		}
	}
	return tn
}
