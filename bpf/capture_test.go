//go:build linux

package bpf

import (
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func addrPort(a netip.Addr, port uint16) string { return netip.AddrPortFrom(a, port).String() }

// wantAnswer checks an answer's tag and the server-side addresses: local is what the
// server saw as its own address (the original destination, for the agent).
func wantAnswer(t *testing.T, got, tag string, local netip.AddrPort, remote netip.Addr) {
	t.Helper()
	gotTag, gotLocal, gotRemote := fields(t, got)
	if gotTag != tag || gotLocal != local || gotRemote.Addr() != remote {
		t.Errorf("answer %q; want %s %s %s:*", got, tag, local, remote)
	}
}

// TestCaptureOutbound: unmodified clients in an enrolled pod reach the agent's outbound
// listener, which sees the original destination as its local address (v4 and v6), while
// a pod that is not enrolled reaches the destination itself.
func TestCaptureOutbound(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{})
	tp.enrollPod1(t, c)
	startAgent(t, tp, c)
	serve(t, tp.remote, "tcp", ":8080", "server", nil)

	dst4 := netip.AddrPortFrom(remoteV4, 8080)
	dst6 := netip.AddrPortFrom(remoteV6, 8080)
	wantAnswer(t, mustAsk(t, tp.pod1, dst4.String(), nil), "outbound", dst4, pod1v4)
	wantAnswer(t, mustAsk(t, tp.pod1, dst6.String(), nil), "outbound", dst6, pod1v6)
	// To a local pod that is not enrolled: still captured, destination intact.
	toPod2 := netip.AddrPortFrom(pod2v4, 9090)
	wantAnswer(t, mustAsk(t, tp.pod1, toPod2.String(), nil), "outbound", toPod2, pod1v4)

	// Not enrolled: untouched, the server answers itself.
	wantAnswer(t, mustAsk(t, tp.pod2, dst4.String(), nil), "server", dst4, pod2v4)
	wantAnswer(t, mustAsk(t, tp.pod2, dst6.String(), nil), "server", dst6, netip.MustParseAddr("fd00:2::2"))

	t.Run("curl", func(t *testing.T) {
		out, err := exec.Command("ip", "netns", "exec", tp.pod1.name, "curl", "-sS", "--max-time", "5", "http://10.0.0.2:8080/").CombinedOutput()
		if err != nil {
			t.Fatalf("curl: %v: %s", err, out)
		}
		wantAnswer(t, strings.TrimSpace(string(out)), "outbound", dst4, pod1v4)
		out, err = exec.Command("ip", "netns", "exec", tp.pod1.name, "curl", "-sS", "--max-time", "5", "http://[fd00:99::2]:8080/").CombinedOutput()
		if err != nil {
			t.Fatalf("curl: %v: %s", err, out)
		}
		wantAnswer(t, strings.TrimSpace(string(out)), "outbound", dst6, pod1v6)
	})

	t.Run("unenroll", func(t *testing.T) {
		if err := c.Unenroll(Pod{IfIndex: tp.vp1, IPs: []netip.Addr{pod1v4, pod1v6}}); err != nil {
			t.Fatal(err)
		}
		wantAnswer(t, mustAsk(t, tp.pod1, dst4.String(), nil), "server", dst4, pod1v4)
		pods, err := c.List()
		if err != nil || len(pods) != 0 {
			t.Fatalf("List after unenroll = %v, %v; want none", pods, err)
		}
	})
}

// TestCaptureInbound: connections to an enrolled pod, from another node and from another
// pod on this node, reach :15008 for port 15008 and :15006 otherwise.
func TestCaptureInbound(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{})
	tp.enrollPod1(t, c)
	startAgent(t, tp, c)
	serve(t, tp.pod1, "tcp", ":9080", "pod", nil)

	for _, tc := range []struct {
		name string
		from *testNS
		src  netip.Addr
		dst  netip.Addr
	}{
		{"from another node v4", tp.remote, remoteV4, pod1v4},
		{"from another node v6", tp.remote, remoteV6, pod1v6},
		{"from a local pod v4", tp.pod2, pod2v4, pod1v4},
		{"from a local pod v6", tp.pod2, netip.MustParseAddr("fd00:2::2"), pod1v6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantAnswer(t, mustAsk(t, tc.from, addrPort(tc.dst, 9080), nil), "inbound", netip.AddrPortFrom(tc.dst, 9080), tc.src)
			wantAnswer(t, mustAsk(t, tc.from, addrPort(tc.dst, 15008), nil), "hbone", netip.AddrPortFrom(tc.dst, 15008), tc.src)
		})
	}
	// Pod2 is not enrolled: traffic to it is untouched.
	serve(t, tp.pod2, "tcp", ":9080", "pod2", nil)
	wantAnswer(t, mustAsk(t, tp.remote, addrPort(pod2v4, 9080), nil), "pod2", netip.AddrPortFrom(pod2v4, 9080), remoteV4)
}

// TestHostTraffic: connections the node itself opens to an enrolled pod reach the pod
// untouched by default; with CaptureHost they reach :15006, except from the probe source.
func TestHostTraffic(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{})
	tp.enrollPod1(t, c)
	a := startAgent(t, tp, c)
	serve(t, tp.pod1, "tcp", ":9080", "pod", nil)
	hostV4 := netip.MustParseAddr("10.244.1.1")
	hostV6 := netip.MustParseAddr("fd00:1::1")

	wantAnswer(t, mustAsk(t, tp.node, addrPort(pod1v4, 9080), nil), "pod", netip.AddrPortFrom(pod1v4, 9080), hostV4)
	wantAnswer(t, mustAsk(t, tp.node, addrPort(pod1v6, 9080), nil), "pod", netip.AddrPortFrom(pod1v6, 9080), hostV6)

	// A restarted agent with CaptureHost: Load again adopts the pinned state.
	a.stop()
	c.Close()
	c = tp.load(t, Options{CaptureHost: true})
	startAgent(t, tp, c)
	wantAnswer(t, mustAsk(t, tp.node, addrPort(pod1v4, 9080), nil), "inbound", netip.AddrPortFrom(pod1v4, 9080), hostV4)
	wantAnswer(t, mustAsk(t, tp.node, addrPort(pod1v6, 9080), nil), "inbound", netip.AddrPortFrom(pod1v6, 9080), hostV6)

	// Kubelet probes from Istio's probe source stay untouched.
	probe := netip.MustParseAddr("169.254.7.127")
	tp.node.do(t, func() error {
		return exec.Command("ip", "addr", "add", "169.254.7.127/32", "dev", "lo").Run()
	})
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: probe.AsSlice()}}
	wantAnswer(t, mustAsk(t, tp.node, addrPort(pod1v4, 9080), d), "pod", netip.AddrPortFrom(pod1v4, 9080), probe)
}

// TestAgentSocketsNotLooped: the agent's own marked sockets are never captured, and
// packets of its transparent connections (source = a pod's or a remote client's address)
// return to their socket through the established-socket branch.
func TestAgentSocketsNotLooped(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{CaptureHost: true})
	tp.enrollPod1(t, c)
	startAgent(t, tp, c)
	serve(t, tp.pod1, "tcp", ":9080", "pod", nil)
	serve(t, tp.remote, "tcp", ":8080", "server", nil)
	marked := &net.Dialer{Control: Control(DefaultAgentMark, false)}

	// Marked dial from the node to an enrolled pod: not hairpinned despite CaptureHost.
	wantAnswer(t, mustAsk(t, tp.node, addrPort(pod1v4, 9080), marked), "pod", netip.AddrPortFrom(pod1v4, 9080), netip.MustParseAddr("10.244.1.1"))

	// Outbound leg as the agent makes it: from the enrolled pod's own address. The
	// remote's answer arrives at the uplink addressed to the enrolled pod.
	asPod := &net.Dialer{Control: Control(DefaultAgentMark, true), LocalAddr: &net.TCPAddr{IP: pod1v4.AsSlice()}}
	wantAnswer(t, mustAsk(t, tp.node, addrPort(remoteV4, 8080), asPod), "server", netip.AddrPortFrom(remoteV4, 8080), pod1v4)
	asPod6 := &net.Dialer{Control: Control(DefaultAgentMark, true), LocalAddr: &net.TCPAddr{IP: pod1v6.AsSlice()}}
	wantAnswer(t, mustAsk(t, tp.node, addrPort(remoteV6, 8080), asPod6), "server", netip.AddrPortFrom(remoteV6, 8080), pod1v6)

	// Inbound leg as the agent makes it: to the pod, from the remote client's address.
	// The pod's answer leaves from an enrolled pod towards a remote address.
	asRemote := &net.Dialer{Control: Control(DefaultAgentMark, true), LocalAddr: &net.TCPAddr{IP: remoteV4.AsSlice()}}
	wantAnswer(t, mustAsk(t, tp.node, addrPort(pod1v4, 9080), asRemote), "pod", netip.AddrPortFrom(pod1v4, 9080), remoteV4)
	asRemote6 := &net.Dialer{Control: Control(DefaultAgentMark, true), LocalAddr: &net.TCPAddr{IP: remoteV6.AsSlice()}}
	wantAnswer(t, mustAsk(t, tp.node, addrPort(pod1v6, 9080), asRemote6), "pod", netip.AddrPortFrom(pod1v6, 9080), remoteV6)
}

// TestNotrackKeepsOriginalDestination: with a kube-proxy-like DNAT for a ClusterIP in
// place, a captured connection still shows the ClusterIP to the agent.
func TestNotrackKeepsOriginalDestination(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{})
	tp.enrollPod1(t, c)
	startAgent(t, tp, c)
	serve(t, tp.remote, "tcp", ":8080", "server", nil)
	nft := exec.Command("ip", "netns", "exec", tp.node.name, "nft", "-f", "-")
	nft.Stdin = strings.NewReader(`table ip kubeproxy {
	chain prerouting { type nat hook prerouting priority dstnat; ip daddr 10.96.0.10 tcp dport 80 dnat to 10.0.0.2:8080; }
}`)
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	clusterIP := netip.MustParseAddrPort("10.96.0.10:80")
	// The DNAT works for a pod that is not enrolled...
	wantAnswer(t, mustAsk(t, tp.pod2, clusterIP.String(), nil), "server", netip.AddrPortFrom(remoteV4, 8080), pod2v4)
	// ...and does not touch the captured connection.
	wantAnswer(t, mustAsk(t, tp.pod1, clusterIP.String(), nil), "outbound", clusterIP, pod1v4)
}

// TestFailClosed: with the agent's listeners closed, an enrolled pod's new connection is
// dropped, never sent to its destination; FailOpen sends it there instead.
func TestFailClosed(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{})
	tp.enrollPod1(t, c)
	a := startAgent(t, tp, c)
	srv := countingServer(t, tp.remote, ":8080")
	dst := addrPort(remoteV4, 8080)
	wantAnswer(t, mustAsk(t, tp.pod1, dst, nil), "outbound", netip.MustParseAddrPort(dst), pod1v4)
	a.stop()

	before := counter(t, c, "dropped", "no_listener")
	if got, err := ask(tp.pod1, dst, 1500*time.Millisecond, nil); err == nil {
		t.Fatalf("dial with the agent gone succeeded: %q", got)
	}
	if n := srv.count(); n != 0 {
		t.Fatalf("destination saw %d connections with the agent gone; want 0 (leak)", n)
	}
	if after := counter(t, c, "dropped", "no_listener"); after <= before {
		t.Errorf("dropped/no_listener counter %d -> %d; want it to grow", before, after)
	}

	c.Close()
	c = tp.load(t, Options{FailOpen: true})
	if _, err := ask(tp.pod1, dst, 3*time.Second, nil); err != nil {
		t.Fatalf("fail-open dial: %v", err)
	}
	if n := srv.count(); n != 1 {
		t.Fatalf("fail-open: destination saw %d connections; want 1", n)
	}
	if n := counter(t, c, "passed", "fail_open"); n == 0 {
		t.Error("passed/fail_open counter is 0")
	}
}

// TestCounters: a captured connection shows in the counters, which survive a reload.
func TestCounters(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{})
	tp.enrollPod1(t, c)
	startAgent(t, tp, c)
	serve(t, tp.remote, "tcp", ":8080", "server", nil)
	mustAsk(t, tp.pod1, addrPort(remoteV4, 8080), nil)
	mustAsk(t, tp.pod2, addrPort(remoteV4, 8080), nil)
	if n := counter(t, c, "captured", "outbound"); n != 1 {
		t.Errorf("captured/outbound = %d; want 1 (one SYN)", n)
	}
	if n := counter(t, c, "captured", "established"); n < 2 {
		t.Errorf("captured/established = %d; want at least 2 (handshake ACK, data)", n)
	}
	if n := counter(t, c, "passed", "not_enrolled"); n == 0 {
		t.Error("passed/not_enrolled = 0; pod2's connection should count")
	}
	c.Close()
	c = tp.load(t, Options{})
	if n := counter(t, c, "captured", "outbound"); n != 1 {
		t.Errorf("after reload captured/outbound = %d; want 1 (pinned)", n)
	}
	all, err := c.Counters()
	if err != nil || len(all) != dMax-1 {
		t.Fatalf("Counters() = %d counters, %v; want %d", len(all), err, dMax-1)
	}
}

func counter(t *testing.T, c *Capture, result, reason string) uint64 {
	t.Helper()
	all, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range all {
		if k.Result == result && k.Reason == reason {
			return k.Value
		}
	}
	t.Fatalf("no counter %s/%s", result, reason)
	return 0
}
