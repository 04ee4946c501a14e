//go:build linux

package bpf

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI must run the kernel tests as root: " + "needs root (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN); CI runs it as root")
		}
		t.Skip("needs root (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN); CI runs it as root")
	}
}

var nsSeq atomic.Int64

// testNS is a named network namespace that the test removes when it ends.
type testNS struct {
	name string
	h    netns.NsHandle
}

func newNS(t testing.TB, role string) *testNS {
	t.Helper()
	name := fmt.Sprintf("veil-%s-%d-%d", role, os.Getpid(), nsSeq.Add(1))
	var h netns.NsHandle
	done := make(chan error, 1)
	go func() {
		// NewNamed moves the calling thread into the new namespace; this goroutine's
		// thread is locked and thrown away instead of being moved back.
		runtime.LockOSThread()
		var e error
		h, e = netns.NewNamed(name)
		if e == nil {
			e = netlink.LinkSetUp(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "lo"}})
		}
		done <- e
	}()
	if err := <-done; err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	n := &testNS{name: name, h: h}
	t.Cleanup(func() {
		h.Close()
		netns.DeleteNamed(name)
	})
	return n
}

// do runs fn inside the namespace.
func (n *testNS) do(t testing.TB, fn func() error) {
	t.Helper()
	if err := inNetNS(n.h, fn); err != nil {
		t.Fatalf("in %s: %v", n.name, err)
	}
}

func (n *testNS) sysctl(t testing.TB, path, v string) {
	t.Helper()
	n.do(t, func() error { return os.WriteFile("/proc/sys/"+path, []byte(v), 0o644) })
}

func (n *testNS) handle(t testing.TB) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(n.h)
	if err != nil {
		t.Fatalf("netlink handle for %s: %v", n.name, err)
	}
	t.Cleanup(h.Close)
	return h
}

// veth creates a veth pair with one end in a and the other in b and configures both.
func veth(t testing.TB, a *testNS, aName string, aAddrs []string, b *testNS, bName string, bAddrs []string) int {
	t.Helper()
	err := netlink.LinkAdd(&netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: aName, Namespace: netlink.NsFd(a.h)},
		PeerName:      bName,
		PeerNamespace: netlink.NsFd(b.h),
	})
	if err != nil {
		t.Fatalf("veth %s/%s: %v", aName, bName, err)
	}
	idx := 0
	for _, side := range []struct {
		ns    *testNS
		name  string
		addrs []string
	}{{a, aName, aAddrs}, {b, bName, bAddrs}} {
		h := side.ns.handle(t)
		l, err := h.LinkByName(side.name)
		if err != nil {
			t.Fatal(err)
		}
		if side.ns == a {
			idx = l.Attrs().Index
		}
		for _, s := range side.addrs {
			addr, err := netlink.ParseAddr(s)
			if err != nil {
				t.Fatal(err)
			}
			addr.Flags = unix.IFA_F_NODAD // no duplicate detection: usable at once
			if err := h.AddrAdd(l, addr); err != nil {
				t.Fatalf("addr %s on %s: %v", s, side.name, err)
			}
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	return idx
}

func route(t testing.TB, n *testNS, dst, via string) {
	t.Helper()
	h := n.handle(t)
	_, d, err := net.ParseCIDR(dst)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.RouteAdd(&netlink.Route{Dst: d, Gw: net.ParseIP(via)}); err != nil {
		t.Fatalf("route %s via %s in %s: %v", dst, via, n.name, err)
	}
}

// topo is one node with two pods and a second node ("remote") behind an uplink:
//
//	pod1 (10.244.1.2, fd00:1::2) --vp1--+
//	pod2 (10.244.2.2, fd00:2::2) --vp2--+ node --up0-- remote (10.0.0.2, fd00:99::2)
type topo struct {
	node, pod1, pod2, remote *testNS
	vp1, vp2, up0            int
	pinDir                   string
}

var (
	pod1v4   = netip.MustParseAddr("10.244.1.2")
	pod1v6   = netip.MustParseAddr("fd00:1::2")
	pod2v4   = netip.MustParseAddr("10.244.2.2")
	remoteV4 = netip.MustParseAddr("10.0.0.2")
	remoteV6 = netip.MustParseAddr("fd00:99::2")
)

func newTopo(t testing.TB) *topo {
	t.Helper()
	requireRoot(t)
	tp := &topo{
		node: newNS(t, "node"), pod1: newNS(t, "pod1"), pod2: newNS(t, "pod2"), remote: newNS(t, "remote"),
	}
	tp.vp1 = veth(t, tp.node, "vp1", []string{"10.244.1.1/24", "fd00:1::1/64"}, tp.pod1, "eth0", []string{"10.244.1.2/24", "fd00:1::2/64"})
	tp.vp2 = veth(t, tp.node, "vp2", []string{"10.244.2.1/24", "fd00:2::1/64"}, tp.pod2, "eth0", []string{"10.244.2.2/24", "fd00:2::2/64"})
	tp.up0 = veth(t, tp.node, "up0", []string{"10.0.0.1/24", "fd00:99::1/64"}, tp.remote, "eth0", []string{"10.0.0.2/24", "fd00:99::2/64"})
	route(t, tp.pod1, "0.0.0.0/0", "10.244.1.1")
	route(t, tp.pod1, "::/0", "fd00:1::1")
	route(t, tp.pod2, "0.0.0.0/0", "10.244.2.1")
	route(t, tp.pod2, "::/0", "fd00:2::1")
	route(t, tp.remote, "10.244.0.0/16", "10.0.0.1")
	route(t, tp.remote, "fd00:1::/64", "fd00:99::1")
	route(t, tp.remote, "fd00:2::/64", "fd00:99::1")
	tp.node.sysctl(t, "net/ipv4/ip_forward", "1")
	tp.node.sysctl(t, "net/ipv6/conf/all/forwarding", "1")
	tp.pinDir = bpffs(t)
	return tp
}

// bpffs mounts a private bpf filesystem for the test's pins.
func bpffs(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "bpffs")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return filepath.Join(dir, "veil")
}

// load loads capture in the node namespace with the topology's pin dir and uplink.
func (tp *topo) load(t testing.TB, o Options) *Capture {
	t.Helper()
	o.PinDir = tp.pinDir
	if o.Uplinks == nil {
		o.Uplinks = []string{"up0"}
	}
	var c *Capture
	tp.node.do(t, func() (err error) {
		c, err = Load(o)
		return err
	})
	t.Cleanup(func() { c.Close() })
	return c
}

func (tp *topo) enrollPod1(t testing.TB, c *Capture) {
	t.Helper()
	if err := c.Enroll(Pod{IfIndex: tp.vp1, IPs: []netip.Addr{pod1v4, pod1v6}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Attach(tp.vp2); err != nil {
		t.Fatal(err)
	}
}

// serve answers every connection with one line, "<tag> <local> <remote>", after reading
// the client's first line; an HTTP request gets the line as an HTTP/1.0 response body.
func serve(t testing.TB, n *testNS, network, addr, tag string, ctl func(string, string, syscall.RawConn) error) *net.TCPListener {
	t.Helper()
	var l net.Listener
	n.do(t, func() (err error) {
		lc := net.ListenConfig{Control: ctl}
		lc.SetMultipathTCP(false)
		l, err = lc.Listen(context.Background(), network, addr)
		return err
	})
	tl := l.(*net.TCPListener)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				answer(c, tag)
			}()
		}
	}()
	t.Cleanup(func() { tl.Close(); wg.Wait() })
	return tl
}

func answer(c net.Conn, tag string) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return
	}
	msg := fmt.Sprintf("%s %s %s\n", tag, c.LocalAddr(), c.RemoteAddr())
	if strings.HasPrefix(line, "GET ") {
		msg = "HTTP/1.0 200 OK\r\nContent-Length: " + fmt.Sprint(len(msg)) + "\r\n\r\n" + msg
	}
	io.WriteString(c, msg)
}

// ask dials addr from inside n, sends a line and returns the answer line.
func ask(n *testNS, addr string, timeout time.Duration, d *net.Dialer) (string, error) {
	if d == nil {
		d = &net.Dialer{}
	}
	d.Timeout = timeout
	var c net.Conn
	err := inNetNS(n.h, func() (err error) {
		c, err = d.Dial("tcp", addr)
		return err
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, "hello\n"); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func mustAsk(t testing.TB, n *testNS, addr string, d *net.Dialer) string {
	t.Helper()
	got, err := ask(n, addr, 5*time.Second, d)
	if err != nil {
		t.Fatalf("from %s to %s: %v", n.name, addr, err)
	}
	return got
}

// fields splits an answer into tag, local and remote address.
func fields(t testing.TB, answer string) (tag string, local, remote netip.AddrPort) {
	t.Helper()
	f := strings.Fields(answer)
	if len(f) != 3 {
		t.Fatalf("answer %q: want tag local remote", answer)
	}
	return f[0], netip.MustParseAddrPort(f[1]), netip.MustParseAddrPort(f[2])
}

// testAgent is the agent side for kernel tests: transparent, marked listeners on 15001,
// 15006 and 15008 in the node namespace, answering with their role and addresses.
type testAgent struct {
	lns []*net.TCPListener
}

func startAgent(t testing.TB, tp *topo, c *Capture) *testAgent {
	t.Helper()
	a := &testAgent{}
	for _, r := range []struct {
		role Role
		port string
		tag  string
	}{{Outbound, "15001", "outbound"}, {Inbound, "15006", "inbound"}, {InboundHBONE, "15008", "hbone"}} {
		l := serve(t, tp.node, "tcp", ":"+r.port, r.tag, Control(DefaultAgentMark, true))
		if err := c.SetListener(r.role, l); err != nil {
			t.Fatal(err)
		}
		a.lns = append(a.lns, l)
	}
	return a
}

func (a *testAgent) stop() {
	for _, l := range a.lns {
		l.Close()
	}
}

type counting struct {
	mu sync.Mutex
	n  int
}

func (c *counting) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// countingServer answers like serve and counts the connections it accepted.
func countingServer(t testing.TB, n *testNS, addr string) *counting {
	t.Helper()
	cnt := &counting{}
	var l net.Listener
	n.do(t, func() (err error) {
		lc := net.ListenConfig{}
		lc.SetMultipathTCP(false)
		l, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			cnt.mu.Lock()
			cnt.n++
			cnt.mu.Unlock()
			answer(c, "server")
		}
	}()
	t.Cleanup(func() { l.Close(); <-done })
	return cnt
}
