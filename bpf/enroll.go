//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
)

// Pod identifies an enrolled pod on this node: its host-side veth and its addresses.
type Pod struct {
	IfIndex int          // index of the pod's host-side veth in the node namespace
	IPs     []netip.Addr // the pod's addresses (IPv4 and/or IPv6)
}

func (p Pod) validate() error {
	if p.IfIndex <= 0 {
		return fmt.Errorf("interface index %d is not a valid index", p.IfIndex)
	}
	if len(p.IPs) == 0 {
		return errors.New("no IP addresses")
	}
	for i, ip := range p.IPs {
		switch {
		case !ip.IsValid():
			return fmt.Errorf("IPs[%d]: invalid address", i)
		case ip.Zone() != "":
			return fmt.Errorf("IPs[%d] %s: zoned address", i, ip)
		case ip.IsUnspecified(), ip.IsLoopback(), ip.IsMulticast(), ip.IsLinkLocalUnicast():
			return fmt.Errorf("IPs[%d] %s: not a pod address (unspecified, loopback, multicast or link-local)", i, ip)
		}
	}
	return nil
}

func addrKey(ip netip.Addr) captureAddr {
	return captureAddr{B: ip.Unmap().As16()} // As16 of an IPv4 address is IPv4-mapped
}

func keyAddr(k captureAddr) netip.Addr {
	return netip.AddrFrom16(k.B).Unmap()
}

// Enroll puts a pod in the mesh: its veth gets the programs (if not yet attached) and the
// sysctls capture needs, and its addresses enter the enrollment map. From then on its new
// TCP connections, and new connections to it, go to the agent. An address enrolled on
// another interface moves to this one (pod IPs are reused). Idempotent; safe for
// concurrent use; does not block.
func (c *Capture) Enroll(p Pod) error {
	if err := p.validate(); err != nil {
		return fmt.Errorf("bpf: enroll pod on interface %d: %w", p.IfIndex, err)
	}
	return c.locked(func() error {
		if err := c.attach(p.IfIndex, true); err != nil {
			return err
		}
		st, _, err := c.ifaceState(p.IfIndex)
		if err != nil {
			return fmt.Errorf("bpf: enroll: interface %d state: %w", p.IfIndex, err)
		}
		if st, err = podSysctls(p.IfIndex, st, c.opts.CaptureHost); err != nil {
			return err
		}
		if err := c.objs.VeilIfaces.Update(uint32(p.IfIndex), st, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("bpf: enroll: record interface %d: %w", p.IfIndex, err)
		}
		for _, ip := range p.IPs {
			ep := captureEndpoint{Ifindex: uint32(p.IfIndex)}
			if err := c.objs.VeilEnrolled.Update(addrKey(ip), ep, ebpf.UpdateAny); err != nil {
				return fmt.Errorf("bpf: enroll %s: %w", ip, err)
			}
		}
		return nil
	})
}

// Unenroll takes a pod out of the mesh: its addresses leave the enrollment map (new
// connections are no longer captured; the agent's existing ones keep their sockets), and
// its veth's sysctls are restored once no address on it is enrolled. The programs stay
// attached: the pod's connections to enrolled pods still need them. Unknown addresses are
// ignored. Safe for concurrent use; does not block.
func (c *Capture) Unenroll(p Pod) error {
	if err := p.validate(); err != nil {
		return fmt.Errorf("bpf: unenroll pod on interface %d: %w", p.IfIndex, err)
	}
	return c.locked(func() error {
		for _, ip := range p.IPs {
			var ep captureEndpoint
			err := c.objs.VeilEnrolled.Lookup(addrKey(ip), &ep)
			if errors.Is(err, ebpf.ErrKeyNotExist) || err == nil && int(ep.Ifindex) != p.IfIndex {
				continue // not enrolled, or enrolled since for another pod
			}
			if err == nil {
				err = c.objs.VeilEnrolled.Delete(addrKey(ip))
			}
			if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("bpf: unenroll %s: %w", ip, err)
			}
		}
		return c.restoreIfUnused(p.IfIndex)
	})
}

// restoreIfUnused restores the sysctls of an interface no enrolled address uses.
func (c *Capture) restoreIfUnused(ifindex int) error {
	pods, err := c.list()
	if err != nil {
		return err
	}
	if slices.ContainsFunc(pods, func(p Pod) bool { return p.IfIndex == ifindex }) {
		return nil
	}
	st, ok, err := c.ifaceState(ifindex)
	if err != nil || !ok || st.Flags&ifSysctl == 0 {
		return err
	}
	if err := restoreSysctls(ifindex, st); err != nil {
		return err
	}
	st.Flags &^= ifSysctl
	st.RpFilter, st.AcceptLocal = -1, -1
	if err := c.objs.VeilIfaces.Update(uint32(ifindex), st, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("bpf: record interface %d: %w", ifindex, err)
	}
	return nil
}

// unenrollIfindex removes every address enrolled on ifindex (c.mu held).
func (c *Capture) unenrollIfindex(ifindex int) error {
	pods, err := c.list()
	if err != nil {
		return err
	}
	for _, p := range pods {
		if p.IfIndex != ifindex {
			continue
		}
		for _, ip := range p.IPs {
			if err := c.objs.VeilEnrolled.Delete(addrKey(ip)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("bpf: unenroll %s: %w", ip, err)
			}
		}
	}
	return nil
}

// List returns the enrolled pods, one per interface, addresses sorted. It reads the
// pinned map, so after a restart it shows what the previous agent enrolled. Safe for
// concurrent use; does not block.
func (c *Capture) List() ([]Pod, error) {
	var pods []Pod
	err := c.locked(func() error {
		var err error
		pods, err = c.list()
		return err
	})
	return pods, err
}

func (c *Capture) list() ([]Pod, error) {
	var (
		k     captureAddr
		ep    captureEndpoint
		byIdx = map[int]*Pod{}
	)
	it := c.objs.VeilEnrolled.Iterate()
	for it.Next(&k, &ep) {
		p := byIdx[int(ep.Ifindex)]
		if p == nil {
			p = &Pod{IfIndex: int(ep.Ifindex)}
			byIdx[p.IfIndex] = p
		}
		p.IPs = append(p.IPs, keyAddr(k))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("bpf: read enrollment map: %w", err)
	}
	pods := make([]Pod, 0, len(byIdx))
	for _, p := range byIdx {
		slices.SortFunc(p.IPs, netip.Addr.Compare)
		pods = append(pods, *p)
	}
	slices.SortFunc(pods, func(a, b Pod) int { return a.IfIndex - b.IfIndex })
	return pods, nil
}
