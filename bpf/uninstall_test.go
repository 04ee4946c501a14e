//go:build linux

package bpf

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

var progID = regexp.MustCompile(`\bid \d+`)

// linkLocal matches the kernel's own IPv6 link-local routes (local fe80::x, anycast fe80::),
// which appear asynchronously once duplicate address detection ends on a new link, so a
// snapshot taken early on a loaded machine may lack them. veil never touches them.
var linkLocal = regexp.MustCompile(`(?m)^(local|anycast) fe80:[^\n]*\n`)

// nodeSnapshot is everything veil may touch on a node, as text: policy rules, routes
// (all tables), the nftables ruleset, qdiscs and tc filters, TCX programs, and the pod
// veths' sysctls.
func nodeSnapshot(t *testing.T, tp *topo) string {
	t.Helper()
	var b strings.Builder
	for _, cmd := range []string{
		"ip -4 rule", "ip -6 rule", "ip -4 route show table all", "ip -6 route show table all",
		"nft list ruleset", "tc qdisc show",
		"tc filter show dev vp1 ingress", "tc filter show dev vp1 egress",
		"tc filter show dev vp2 ingress", "tc filter show dev vp2 egress",
		"tc filter show dev up0 ingress",
	} {
		out, err := exec.Command("ip", append([]string{"netns", "exec", tp.node.name}, strings.Fields(cmd)...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v: %s", cmd, err, out)
		}
		// A reload replaces the programs: their ids change, nothing else may.
		fmt.Fprintf(&b, "## %s\n%s", cmd, progID.ReplaceAll(linkLocal.ReplaceAll(out, nil), []byte("id N")))
	}
	tp.node.do(t, func() error {
		for _, dev := range []int{tp.vp1, tp.vp2, tp.up0} {
			for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				res, err := link.QueryPrograms(link.QueryOptions{Target: dev, Attach: at})
				if err != nil {
					return err
				}
				fmt.Fprintf(&b, "## tcx %d %v: %d programs\n", dev, at, len(res.Programs))
			}
		}
		for _, dev := range []string{"vp1", "vp2"} {
			for _, k := range []string{"rp_filter", "accept_local"} {
				v, err := readSysctl(dev, k)
				if err != nil {
					return err
				}
				fmt.Fprintf(&b, "## %s %s=%d\n", dev, k, v)
			}
		}
		return nil
	})
	return b.String()
}

// TestUninstall: Load is idempotent, and Uninstall leaves the node as it was found, for
// both attachment mechanisms.
func TestUninstall(t *testing.T) {
	for _, mode := range []struct {
		name string
		opts Options
	}{{"tcx", Options{CaptureHost: true}}, {"clsact", Options{CaptureHost: true, ForceClsact: true}}} {
		t.Run(mode.name, func(t *testing.T) {
			tp := newTopo(t)
			// Sysctls the node had before: veil must put these back, not defaults.
			tp.node.sysctl(t, "net/ipv4/conf/vp1/rp_filter", "2")
			before := nodeSnapshot(t, tp)

			c := tp.load(t, mode.opts)
			tp.enrollPod1(t, c)
			a := startAgent(t, tp, c)
			serve(t, tp.remote, "tcp", ":8080", "server", nil)
			wantAnswer(t, mustAsk(t, tp.pod1, addrPort(remoteV4, 8080), nil), "outbound", netip.AddrPortFrom(remoteV4, 8080), pod1v4)
			loaded := nodeSnapshot(t, tp)
			if loaded == before {
				t.Fatal("Load and Enroll changed nothing visible")
			}
			for _, want := range []string{"lookup 1505", "local default dev lo table 1505", "notrack", "rp_filter=0", "accept_local=1"} {
				if !strings.Contains(loaded, want) {
					t.Errorf("after Load: %q missing from\n%s", want, loaded)
				}
			}
			a.stop()
			c.Close()

			// A second Load (agent restart) adds nothing.
			c = tp.load(t, mode.opts)
			if again := nodeSnapshot(t, tp); again != loaded {
				t.Errorf("second Load changed the node:\n--- first\n%s\n--- second\n%s", loaded, again)
			}
			c.Close()

			tp.node.do(t, func() error { return Uninstall(tp.pinDir) })
			if after := nodeSnapshot(t, tp); after != before {
				t.Errorf("Uninstall left the node changed:\n--- before\n%s\n--- after\n%s", before, after)
			}
			if _, err := os.Stat(tp.pinDir); !os.IsNotExist(err) {
				t.Errorf("pin dir %s still exists after Uninstall (%v)", tp.pinDir, err)
			}
			// Uninstall twice is harmless.
			tp.node.do(t, func() error { return Uninstall(tp.pinDir) })
		})
	}
}

// TestClsactFallback forces the pre-6.6 attachment (clsact + direct-action cls_bpf) on
// this kernel, checks that capture works through it, then that an agent restarting with
// TCX moves every interface over.
func TestClsactFallback(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{ForceClsact: true})
	tp.enrollPod1(t, c)
	a := startAgent(t, tp, c)
	serve(t, tp.remote, "tcp", ":8080", "server", nil)
	serve(t, tp.pod1, "tcp", ":9080", "pod", nil)
	check := func() {
		t.Helper()
		wantAnswer(t, mustAsk(t, tp.pod1, addrPort(remoteV4, 8080), nil), "outbound", netip.AddrPortFrom(remoteV4, 8080), pod1v4)
		wantAnswer(t, mustAsk(t, tp.pod1, addrPort(remoteV6, 8080), nil), "outbound", netip.AddrPortFrom(remoteV6, 8080), pod1v6)
		wantAnswer(t, mustAsk(t, tp.remote, addrPort(pod1v4, 9080), nil), "inbound", netip.AddrPortFrom(pod1v4, 9080), remoteV4)
		wantAnswer(t, mustAsk(t, tp.pod2, addrPort(pod1v4, 15008), nil), "hbone", netip.AddrPortFrom(pod1v4, 15008), pod2v4)
	}
	check()
	snap := nodeSnapshot(t, tp)
	if !strings.Contains(snap, "veil_ingress") || !strings.Contains(snap, "direct-action") {
		t.Fatalf("no veil cls_bpf filter:\n%s", snap)
	}
	if strings.Contains(snap, "1 programs") {
		t.Fatalf("TCX programs attached in clsact mode:\n%s", snap)
	}

	a.stop()
	c.Close()
	c = tp.load(t, Options{})
	startAgent(t, tp, c)
	check()
	snap = nodeSnapshot(t, tp)
	if strings.Contains(snap, "veil_ingress") || strings.Contains(snap, "clsact") {
		t.Errorf("clsact filters left after switching to TCX:\n%s", snap)
	}
	if strings.Count(snap, ": 1 programs") != 5 { // vp1, vp2 ingress+egress, up0 ingress
		t.Errorf("want 5 TCX attachments after switching:\n%s", snap)
	}
}
