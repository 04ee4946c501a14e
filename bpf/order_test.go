//go:build linux

package bpf

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

// Another CNI's TCX program on a pod's veth (Cilium and Calico eBPF attach their own)
// may end the chain: one that returns TCX_PASS hands the packet to the stack and no later
// program runs. veil attaches first (at the head of the chain) and hands on what it does
// not capture (TCX_NEXT), so it captures with such a program present, and the other
// program still sees the rest.
func TestFirstAmongOtherTCXPrograms(t *testing.T) {
	tp := newTopo(t)
	if ok, _ := CheckFeatures(); !ok {
		t.Fatal("this test needs TCX (Linux >= 6.6); CI's kernel has it")
	}
	var foreign *ebpf.Program
	tp.node.do(t, func() (err error) {
		foreign, err = ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL", Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 0), // TCX_PASS: the chain ends here
			asm.Return(),
		}})
		if err != nil {
			return err
		}
		l, err := link.AttachTCX(link.TCXOptions{Interface: tp.vp1, Program: foreign, Attach: ebpf.AttachTCXIngress, Anchor: link.Head()})
		if err != nil {
			return err
		}
		t.Cleanup(func() { l.Close(); foreign.Close() })
		return nil
	})
	c := tp.load(t, Options{})
	tp.enrollPod1(t, c)
	startAgent(t, tp, c)
	serve(t, tp.remote, "tcp", ":8080", "server", nil)
	dst := netip.AddrPortFrom(remoteV4, 8080)
	wantAnswer(t, mustAsk(t, tp.pod1, dst.String(), nil), "outbound", dst, pod1v4)

	var res *link.QueryResult
	tp.node.do(t, func() (err error) {
		res, err = link.QueryPrograms(link.QueryOptions{Target: tp.vp1, Attach: ebpf.AttachTCXIngress})
		return err
	})
	veilInfo, err := c.objs.VeilIngress.Info()
	if err != nil {
		t.Fatal(err)
	}
	veilID, _ := veilInfo.ID()
	foreignInfo, _ := foreign.Info()
	foreignID, _ := foreignInfo.ID()
	if len(res.Programs) != 2 || res.Programs[0].ID != veilID || res.Programs[1].ID != foreignID {
		t.Fatalf("TCX ingress chain of the pod's veth %v; want veil's program %d first, then the other %d", res.Programs, veilID, foreignID)
	}
}
