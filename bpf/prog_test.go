//go:build linux

package bpf

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// TestProgramDecisions runs the real programs with BPF_PROG_TEST_RUN on crafted packets
// and checks the decision each one records in skb->cb[0] and its return code. The test
// run is not a TC ingress, so the kernel refuses the final bpf_sk_assign: a packet
// decided for capture comes back dropped (fail closed) with its decision recorded.
func TestProgramDecisions(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{Exclude: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8::/32")}})

	// A flow that exists before enrollment: a host socket owns it.
	var held []net.Conn
	srv := serve(t, tp.node, "tcp4", "10.244.1.1:7000", "host", nil)
	_ = srv
	var pre net.Conn
	tp.pod1.do(t, func() (err error) {
		pre, err = net.DialTimeout("tcp4", "10.244.1.1:7000", 5*time.Second)
		return err
	})
	held = append(held, pre)
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	prePort := uint16(pre.LocalAddr().(*net.TCPAddr).Port)

	tp.enrollPod1(t, c)
	startAgent(t, tp, c)

	var (
		p1   = pod1v4
		p1v6 = pod1v6
		p2   = pod2v4
		host = netip.MustParseAddr("10.244.1.1")
		r4   = remoteV4
		r6   = remoteV6
		ex4  = netip.MustParseAddr("192.0.2.7")
		ex6  = netip.MustParseAddr("2001:db8::7")
		opts = v4opts{options: []byte{0x01, 0x01, 0x01, 0x00, 0x44, 0x08, 0x05, 0x00, 0, 0, 0, 0}} // NOP NOP NOP EOL + timestamp option
	)
	syn := tcpHdr(40000, 8080, tcpSYN)
	synHBONE := tcpHdr(40000, 15008, tcpSYN)
	ack := tcpHdr(40000, 8080, tcpACK)
	hbh := extHdr{typ: 0, body: make([]byte, 6)}
	dst := extHdr{typ: 60, body: make([]byte, 14)}
	rt := extHdr{typ: 43, body: make([]byte, 6)}
	ah := extHdr{typ: 51, body: make([]byte, 10)}
	atomicFrag := extHdr{typ: 44, body: []byte{0, 0, 0, 0, 0, 1}}
	laterFrag := extHdr{typ: 44, body: []byte{0, 0x10, 0, 0, 0, 1}} // offset 2, M=0
	firstFrag := extHdr{typ: 44, body: []byte{0, 0x01, 0, 0, 0, 1}} // offset 0, M=1
	tooMany := []extHdr{hbh, dst, dst, dst, dst, dst, dst, dst, dst}

	const (
		pass = -1 // TC_ACT_UNSPEC: leave the packet to the stack / next program
		shot = 2  // TC_ACT_SHOT
	)
	cases := []struct {
		name    string
		egress  bool
		pkt     []byte
		ifindex int
		mark    uint32
		want    int
		ret     int32
	}{
		{"v4 SYN from enrolled pod", false, ipv4Pkt(p1, r4, 6, v4opts{}, syn), tp.vp1, 0, dOutbound, shot},
		{"v4 SYN with IP options to enrolled pod port 15008", false, ipv4Pkt(r4, p1, 6, opts, synHBONE), tp.up0, 0, dInboundHBONE, shot},
		{"v4 SYN with IP options from enrolled pod", false, ipv4Pkt(p1, r4, 6, opts, syn), tp.vp1, 0, dOutbound, shot},
		{"v4 SYN to enrolled pod from local pod", false, ipv4Pkt(p2, p1, 6, v4opts{}, syn), tp.vp2, 0, dInbound, shot},
		{"v6 SYN from enrolled pod", false, ipv6Pkt(p1v6, r6, 6, nil, syn), tp.vp1, 0, dOutbound, shot},
		{"v6 SYN through hop-by-hop, routing, dest-opts, AH, atomic fragment", false,
			ipv6Pkt(r6, p1v6, 6, []extHdr{hbh, rt, dst, ah, atomicFrag}, synHBONE), tp.up0, 0, dInboundHBONE, shot},
		{"v6 non-first fragment to enrolled pod", false, ipv6Pkt(r6, p1v6, 6, []extHdr{laterFrag}, nil), tp.up0, 0, dDropFragment, shot},
		{"v6 first fragment with dest-opts inside, from enrolled pod", false, ipv6Pkt(p1v6, r6, 6, []extHdr{firstFrag, dst}, syn), tp.vp1, 0, dDropFragment, shot},
		{"v6 too many extension headers from enrolled pod", false, ipv6Pkt(p1v6, r6, 6, tooMany, syn), tp.vp1, 0, dDropMalformed, shot},
		{"v6 UDP behind extension headers from enrolled pod", false, ipv6Pkt(p1v6, r6, 17, []extHdr{hbh, dst}, udpHdr(1, 53)), tp.vp1, 0, dPassNotTCP, pass},
		{"v4 first fragment from enrolled pod", false, ipv4Pkt(p1, r4, 6, v4opts{frag: 0x2000}, syn), tp.vp1, 0, dDropFragment, shot},
		{"v4 fragment of a non-enrolled pod", false, ipv4Pkt(p2, r4, 6, v4opts{frag: 0x0010}, nil), tp.vp2, 0, dPassNotEnrolled, pass},
		// A packet shorter than its fixed IP header cannot be test-run: the kernel's test
		// run rejects it (EINVAL) before the program, as ip_rcv would drop it. Truncation
		// after the fixed header is what the program must handle:
		{"v4 IHL below 5", false, ipv4Pkt(p1, r4, 6, v4opts{ihl: 4}, syn), tp.vp1, 0, dPassMalformed, pass},
		{"v4 truncated TCP header from enrolled pod", false, ipv4Pkt(p1, r4, 6, v4opts{}, syn[:10]), tp.vp1, 0, dDropMalformed, shot},
		{"v4 IHL beyond the packet from enrolled pod", false, ipv4Pkt(p1, r4, 6, v4opts{ihl: 15}, syn), tp.vp1, 0, dDropMalformed, shot},
		{"v6 extension header cut short from enrolled pod", false, ipv6Pkt(p1v6, r6, 6, []extHdr{hbh, dst}, nil)[:14+40+8+4], tp.vp1, 0, dDropMalformed, shot},
		{"v6 truncated TCP header to enrolled pod", false, ipv6Pkt(r6, p1v6, 6, []extHdr{hbh}, syn[:12]), tp.up0, 0, dDropMalformed, shot},
		{"v4 UDP from enrolled pod", false, ipv4Pkt(p1, r4, 17, v4opts{}, udpHdr(1, 53)), tp.vp1, 0, dPassNotTCP, pass},
		{"ARP", false, append(ethHdr(0x0806), make([]byte, 28)...), tp.vp1, 0, dPassNotIP, pass},
		{"agent-marked SYN from enrolled pod address", false, ipv4Pkt(p1, r4, 6, v4opts{}, syn), tp.vp1, DefaultAgentMark, dPassMarked, pass},
		{"agent mark among other mark bits", false, ipv4Pkt(p1, r4, 6, v4opts{}, syn), tp.vp1, 0x4000 | DefaultAgentMark, dPassMarked, pass},
		{"SYN between non-enrolled addresses", false, ipv4Pkt(p2, r4, 6, v4opts{}, syn), tp.vp2, 0, dPassNotEnrolled, pass},
		{"enrolled pod address on the wrong veth", false, ipv4Pkt(p1, r4, 6, v4opts{}, syn), tp.vp2, 0, dPassNotEnrolled, pass},
		{"SYN to excluded v4 destination", false, ipv4Pkt(p1, ex4, 6, v4opts{}, syn), tp.vp1, 0, dPassExcluded, pass},
		{"SYN to excluded v6 destination", false, ipv6Pkt(p1v6, ex6, 6, nil, syn), tp.vp1, 0, dPassExcluded, pass},
		{"answer from an excluded destination to enrolled pod", false, ipv4Pkt(ex4, p1, 6, v4opts{}, tcpHdr(80, 40000, tcpACK)), tp.up0, 0, dPassExcluded, pass},
		{"answer from an excluded v6 destination to enrolled pod", false, ipv6Pkt(ex6, p1v6, 6, nil, tcpHdr(80, 40000, tcpACK)), tp.up0, 0, dPassExcluded, pass},
		{"new connection from an excluded address is still captured", false, ipv4Pkt(ex4, p1, 6, v4opts{}, syn), tp.up0, 0, dInbound, shot},
		{"ACK without a socket from enrolled pod", false, ipv4Pkt(p1, r4, 6, v4opts{}, ack), tp.vp1, 0, dDropNoSocket, shot},
		{"RST without a socket to enrolled pod", false, ipv4Pkt(r4, p1, 6, v4opts{}, tcpHdr(1, 2, tcpRST)), tp.up0, 0, dDropNoSocket, shot},
		{"ACK of a flow owned by a host socket", false, ipv4Pkt(p1, host, 6, v4opts{}, tcpHdr(prePort, 7000, tcpACK)), tp.vp1, 0, dEstablished, shot},
		{"egress without host capture does nothing", true, ipv4Pkt(host, p1, 6, v4opts{}, syn), tp.vp1, 0, dNone, pass},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, ret := runProg(t, tp, c, tc.egress, tc.pkt, tc.ifindex, tc.mark)
			if got.CB[0] != uint32(tc.want) || ret != tc.ret {
				t.Errorf("decision %s (%d), return %d; want %s (%d), return %d (cb[1]=%d)",
					name(got.CB[0]), got.CB[0], ret, name(uint32(tc.want)), tc.want, tc.ret, got.CB[1])
			}
		})
	}

	t.Run("no listener drops (fail closed)", func(t *testing.T) {
		withoutListeners(t, c, func() {
			got, ret := runProg(t, tp, c, false, ipv4Pkt(p1, r4, 6, v4opts{}, syn), tp.vp1, 0)
			if got.CB[0] != dDropNoListener || ret != shot {
				t.Errorf("decision %s, return %d; want no_listener, %d", name(got.CB[0]), ret, shot)
			}
		})
	})
	t.Run("no listener passes with fail-open", func(t *testing.T) {
		withoutListeners(t, c, func() {
			setFlags(t, c, cfgFailOpen)
			got, ret := runProg(t, tp, c, false, ipv4Pkt(p1, r4, 6, v4opts{}, syn), tp.vp1, 0)
			if got.CB[0] != dFailOpen || ret != pass {
				t.Errorf("decision %s, return %d; want fail_open, %d", name(got.CB[0]), ret, pass)
			}
		})
	})
	t.Run("egress with host capture hairpins a host SYN", func(t *testing.T) {
		setFlags(t, c, cfgCaptureHost)
		// The test run gives the packet a socket, as for a locally sent packet.
		got, ret := runProg(t, tp, c, true, ipv4Pkt(host, p1, 6, v4opts{}, syn), tp.vp1, 0)
		if got.CB[0] != dHostHairpin || ret != 7 { // TC_ACT_REDIRECT
			t.Errorf("decision %s, return %d; want host_hairpin, 7", name(got.CB[0]), ret)
		}
		got, ret = runProg(t, tp, c, true, ipv4Pkt(netip.MustParseAddr("169.254.7.127"), p1, 6, v4opts{}, syn), tp.vp1, 0)
		if got.CB[0] != dPassExcluded || ret != pass {
			t.Errorf("probe source: decision %s, return %d; want excluded, pass", name(got.CB[0]), ret)
		}
		got, ret = runProg(t, tp, c, true, ipv4Pkt(host, p1, 6, v4opts{}, ack), tp.vp1, 0)
		if got.CB[0] != dPassHost || ret != pass {
			t.Errorf("host ACK: decision %s, return %d; want host_flow, pass", name(got.CB[0]), ret)
		}
	})
}

func name(d uint32) string {
	if d == dNone {
		return "none"
	}
	if d >= dMax {
		return "?"
	}
	return counterNames[d].result + "/" + counterNames[d].reason
}

func runProg(t *testing.T, tp *topo, c *Capture, egress bool, pkt []byte, ifindex int, mark uint32) (skBuff, int32) {
	t.Helper()
	prog := c.objs.VeilIngress
	if egress {
		prog = c.objs.VeilEgress
	}
	in := skBuff{Ifindex: uint32(ifindex), Mark: mark}
	var out skBuff
	var ret uint32
	tp.node.do(t, func() (err error) {
		ret, err = prog.Run(&ebpf.RunOptions{Data: pkt, Context: in, ContextOut: &out})
		return err
	})
	return out, int32(ret)
}

// withoutListeners empties the listener map for fn and restores it after.
func withoutListeners(t *testing.T, c *Capture, fn func()) {
	t.Helper()
	saved := map[uint32]uint64{}
	for k := uint32(0); k < uint32(roleCount)*2; k++ {
		if err := c.objs.VeilListeners.Delete(k); err == nil {
			saved[k] = 1
		}
	}
	t.Cleanup(func() {
		if len(saved) > 0 {
			t.Log("listeners removed for the test; later tests re-register their own")
		}
	})
	fn()
}

func setFlags(t *testing.T, c *Capture, flags uint32) {
	t.Helper()
	var cfg captureConfig
	if err := c.objs.VeilConfig.Lookup(uint32(0), &cfg); err != nil {
		t.Fatal(err)
	}
	old := cfg.Flags
	cfg.Flags = flags
	if err := c.objs.VeilConfig.Update(uint32(0), cfg, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cfg.Flags = old
		c.objs.VeilConfig.Update(uint32(0), cfg, ebpf.UpdateAny)
	})
}

var _ = binary.BigEndian
