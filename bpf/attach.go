//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Bits of captureIfaceState.Flags: what veil did to an interface.
const (
	ifIngress      = 1 << 0 // veil_ingress attached
	ifEgress       = 1 << 1 // veil_egress attached (pod veths)
	ifClsact       = 1 << 2 // attached as clsact filters, not TCX links
	ifCreatedQdisc = 1 << 3 // veil created the clsact qdisc, so uninstall deletes it
	ifSysctl       = 1 << 4 // rp_filter/accept_local changed; originals saved
)

// clsact filter identity: priority 1 runs before filters added with the default
// priority; the handle tells veil's filter apart from others at that priority.
const (
	clsactPrio   = 1
	clsactHandle = 0x5e1
)

func linkDir(pinDir string) string { return filepath.Join(pinDir, "links") }

func linkPin(pinDir, dir string, ifindex int) string {
	return filepath.Join(linkDir(pinDir), dir+"-"+strconv.Itoa(ifindex))
}

// Attach attaches the programs to a pod's host-side veth: ingress for connections from
// the pod and for connections from this pod to enrolled pods, egress for host capture.
// Every pod veth needs it, enrolled or not; Enroll attaches by itself. Idempotent; safe
// for concurrent use; does not block.
func (c *Capture) Attach(ifindex int) error {
	return c.locked(func() error { return c.attach(ifindex, true) })
}

// AttachUplink attaches the ingress program to an interface through which other nodes'
// packets arrive (physical NIC, bond, overlay device). Idempotent; safe for concurrent use.
func (c *Capture) AttachUplink(name string) error {
	return c.locked(func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("bpf: uplink %q: %w", name, err)
		}
		return c.attach(l.Attrs().Index, false)
	})
}

// Detach removes the programs from an interface, restores its sysctls and unenrolls any
// pod on it. Call it when a pod's veth goes away. Idempotent; safe for concurrent use.
func (c *Capture) Detach(ifindex int) error {
	return c.locked(func() error {
		if err := c.unenrollIfindex(ifindex); err != nil {
			return err
		}
		if err := c.objs.VeilPortMac.Delete(uint32(ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("bpf: detach: interface %d: %w", ifindex, err)
		}
		return detachIface(c.opts.PinDir, c.objs.VeilIfaces, ifindex)
	})
}

// locked runs fn under c.mu in the node's network namespace.
func (c *Capture) locked(fn func() error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	return inNetNS(c.ns, fn)
}

func (c *Capture) ifaceState(ifindex int) (captureIfaceState, bool, error) {
	var st captureIfaceState
	err := c.objs.VeilIfaces.Lookup(uint32(ifindex), &st)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return captureIfaceState{RpFilter: -1, AcceptLocal: -1}, false, nil
	}
	return st, err == nil, err
}

// attach (c.mu held, in the node namespace) attaches with the mechanism this kernel (or
// ForceClsact) selects, replacing the programs of an earlier attachment in place.
func (c *Capture) attach(ifindex int, pod bool) error {
	if ifindex <= 0 {
		return fmt.Errorf("bpf: attach: invalid interface index %d", ifindex)
	}
	lnk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("bpf: attach: interface %d: %w", ifindex, err)
	}
	st, _, err := c.ifaceState(ifindex)
	if err != nil {
		return fmt.Errorf("bpf: attach: interface %d state: %w", ifindex, err)
	}
	if pod {
		if err := c.setPortMAC(lnk); err != nil {
			return err
		}
	}
	// A pod veth keeps its egress program even if attached earlier as an uplink.
	want := ifIngress
	if pod || st.Flags&ifEgress != 0 {
		want |= ifEgress
	}
	// Switching mechanism (an agent restarted with or without ForceClsact): drop the old
	// attachment first so the packet never sees both.
	if c.tcx && st.Flags&ifClsact != 0 {
		if err := clsactDetach(ifindex, st.Flags); err != nil {
			return err
		}
		st.Flags &^= ifClsact | ifCreatedQdisc | ifIngress | ifEgress
	}
	if !c.tcx && st.Flags&ifClsact == 0 {
		if err := tcxDetach(c.opts.PinDir, ifindex); err != nil {
			return err
		}
		st.Flags &^= ifIngress | ifEgress
	}
	progs := []struct {
		bit  uint32
		dir  string
		prog *ebpf.Program
		at   ebpf.AttachType
	}{
		{ifIngress, "ingress", c.objs.VeilIngress, ebpf.AttachTCXIngress},
		{ifEgress, "egress", c.objs.VeilEgress, ebpf.AttachTCXEgress},
	}
	for _, p := range progs {
		if uint32(want)&p.bit == 0 {
			continue
		}
		if c.tcx {
			err = tcxAttach(linkPin(c.opts.PinDir, p.dir, ifindex), ifindex, p.prog, p.at)
		} else {
			var created bool
			created, err = clsactAttach(ifindex, p.dir == "ingress", p.prog)
			if created {
				st.Flags |= ifCreatedQdisc
			}
			st.Flags |= ifClsact
		}
		if err != nil {
			return fmt.Errorf("bpf: attach %s to interface %d: %w", p.dir, ifindex, err)
		}
		st.Flags |= p.bit
	}
	if err := c.objs.VeilIfaces.Update(uint32(ifindex), st, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("bpf: record interface %d: %w", ifindex, err)
	}
	return nil
}

// tcxAttach attaches prog, or moves an existing pinned link to prog (an agent upgrade):
// link update is atomic, so no packet passes unjudged.
func tcxAttach(pin string, ifindex int, prog *ebpf.Program, at ebpf.AttachType) error {
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		if info, err := l.Info(); err == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex {
			return l.Update(prog)
		}
		// The interface went away (its index may have been reused): a stale pin.
		if err := l.Unpin(); err != nil {
			return err
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	// Head: judge packets before other TCX programs (a CNI's) can pass them on.
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: at, Anchor: link.Head()})
	if err != nil {
		return err
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin link %s: %w", pin, err)
	}
	return nil
}

// tcxDetach unpins veil's TCX links on ifindex; with the last reference gone the kernel
// detaches them.
func tcxDetach(pinDir string, ifindex int) error {
	for _, dir := range []string{"ingress", "egress"} {
		pin := linkPin(pinDir, dir, ifindex)
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			// Not a link we can load: remove the pin anyway, it is ours.
			if rerr := os.Remove(pin); rerr != nil {
				return fmt.Errorf("bpf: remove pin %s: %w", pin, errors.Join(err, rerr))
			}
			continue
		}
		err = l.Unpin()
		l.Close()
		if err != nil {
			return fmt.Errorf("bpf: unpin %s: %w", pin, err)
		}
	}
	return nil
}

func clsactQdisc(ifindex int) *netlink.GenericQdisc {
	return &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
}

func clsactFilter(ifindex int, ingress bool) *netlink.BpfFilter {
	parent, name := uint32(netlink.HANDLE_MIN_EGRESS), "veil_egress"
	if ingress {
		parent, name = netlink.HANDLE_MIN_INGRESS, "veil_ingress"
	}
	return &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex, Parent: parent, Handle: clsactHandle,
			Protocol: unix.ETH_P_ALL, Priority: clsactPrio,
		},
		Name:         name,
		DirectAction: true,
	}
}

// clsactAttach is the fallback for kernels before 6.6: a direct-action cls_bpf filter
// under a clsact qdisc. The filter holds the program, so it survives the agent without a
// pin; replacing it swaps the program in one netlink call.
func clsactAttach(ifindex int, ingress bool, prog *ebpf.Program) (createdQdisc bool, err error) {
	switch err := netlink.QdiscAdd(clsactQdisc(ifindex)); {
	case err == nil:
		createdQdisc = true
	case errors.Is(err, unix.EEXIST):
	default:
		return false, fmt.Errorf("add clsact qdisc: %w", err)
	}
	f := clsactFilter(ifindex, ingress)
	f.Fd = prog.FD()
	if err := netlink.FilterReplace(f); err != nil {
		return createdQdisc, fmt.Errorf("add cls_bpf filter: %w", err)
	}
	return createdQdisc, nil
}

func clsactDetach(ifindex int, flags uint32) error {
	for _, ingress := range []bool{true, false} {
		err := netlink.FilterDel(clsactFilter(ifindex, ingress))
		if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("bpf: delete cls_bpf filter on interface %d: %w", ifindex, err)
		}
	}
	if flags&ifCreatedQdisc == 0 {
		return nil
	}
	// Delete the qdisc veil created only if nobody else has filters on it since.
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return nil // interface gone, and its qdisc with it
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		if fs, err := netlink.FilterList(l, parent); err == nil && len(fs) > 0 {
			return nil
		}
	}
	if err := netlink.QdiscDel(clsactQdisc(ifindex)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("bpf: delete clsact qdisc on interface %d: %w", ifindex, err)
	}
	return nil
}

// setPortMAC records the bridge of a pod veth that is a port of a Linux bridge, with the
// bridge's address (see veil_port_mac in capture.c), and forgets it otherwise.
func (c *Capture) setPortMAC(l netlink.Link) error {
	idx := uint32(l.Attrs().Index)
	if m := l.Attrs().MasterIndex; m > 0 {
		master, err := netlink.LinkByIndex(m)
		if err != nil {
			return fmt.Errorf("bpf: attach: interface %s's master %d: %w", l.Attrs().Name, m, err)
		}
		if master.Type() == "bridge" {
			pm := capturePortMac{Bridge: uint32(m)}
			if copy(pm.Mac[:], master.Attrs().HardwareAddr) != len(pm.Mac) {
				return fmt.Errorf("bpf: attach: bridge %s has no Ethernet address", master.Attrs().Name)
			}
			if err := c.objs.VeilPortMac.Update(idx, pm, ebpf.UpdateAny); err != nil {
				return fmt.Errorf("bpf: attach: record bridge port %s: %w", l.Attrs().Name, err)
			}
			return nil
		}
	}
	if err := c.objs.VeilPortMac.Delete(idx); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("bpf: attach: interface %s: %w", l.Attrs().Name, err)
	}
	return nil
}

// detachIface undoes everything veil did to one interface and forgets it.
func detachIface(pinDir string, ifaces *ebpf.Map, ifindex int) error {
	var st captureIfaceState
	if err := ifaces.Lookup(uint32(ifindex), &st); errors.Is(err, ebpf.ErrKeyNotExist) {
		return tcxDetach(pinDir, ifindex) // stale pins only
	} else if err != nil {
		return fmt.Errorf("bpf: interface %d state: %w", ifindex, err)
	}
	var errs []error
	errs = append(errs, tcxDetach(pinDir, ifindex))
	if st.Flags&ifClsact != 0 {
		errs = append(errs, clsactDetach(ifindex, st.Flags))
	}
	if st.Flags&ifSysctl != 0 {
		errs = append(errs, restoreSysctls(ifindex, st))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := ifaces.Delete(uint32(ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("bpf: forget interface %d: %w", ifindex, err)
	}
	return nil
}

// adopt moves every attachment recorded by an earlier agent to this agent's programs and
// forgets interfaces that no longer exist.
func (c *Capture) adopt() error {
	return c.locked(func() error {
		var (
			ifindex uint32
			st      captureIfaceState
			all     = map[int]captureIfaceState{}
		)
		it := c.objs.VeilIfaces.Iterate()
		for it.Next(&ifindex, &st) {
			all[int(ifindex)] = st
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("bpf: read interfaces map: %w", err)
		}
		// Pins without a record (a crash between attach and record).
		if ents, err := os.ReadDir(linkDir(c.opts.PinDir)); err == nil {
			for _, e := range ents {
				_, idx, ok := strings.Cut(e.Name(), "-")
				if n, err := strconv.Atoi(idx); ok && err == nil {
					if _, known := all[n]; !known {
						all[n] = captureIfaceState{Flags: ifIngress, RpFilter: -1, AcceptLocal: -1}
					}
				}
			}
		}
		for idx, st := range all {
			if _, err := netlink.LinkByIndex(idx); err != nil {
				// Gone with its pod: its TCX links detached with it.
				if err := tcxDetach(c.opts.PinDir, idx); err != nil {
					return err
				}
				if err := c.unenrollIfindex(idx); err != nil {
					return err
				}
				if err := c.objs.VeilIfaces.Delete(uint32(idx)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
					return fmt.Errorf("bpf: forget interface %d: %w", idx, err)
				}
				continue
			}
			if err := c.attach(idx, st.Flags&ifEgress != 0); err != nil {
				return err
			}
			// Options may differ from the previous agent's (CaptureHost decides accept_local).
			if st.Flags&ifSysctl != 0 {
				cur, _, err := c.ifaceState(idx)
				if err != nil {
					return fmt.Errorf("bpf: interface %d state: %w", idx, err)
				}
				if cur, err = podSysctls(idx, cur, c.opts.CaptureHost); err != nil {
					return err
				}
				if err := c.objs.VeilIfaces.Update(uint32(idx), cur, ebpf.UpdateAny); err != nil {
					return fmt.Errorf("bpf: record interface %d: %w", idx, err)
				}
			}
		}
		return nil
	})
}
