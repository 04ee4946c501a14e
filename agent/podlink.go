package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// VethPeer finds a pod's node-side interface from the pod's side, as a CNI plugin
// knows it: in the pod's network namespace podNS, the interface that holds ip must be a
// veth, and its peer must be a veth in the agent's namespace whose own peer is that
// interface in podNS. Anything else (an ipvlan or macvlan pod, a veth whose peer lives
// in another namespace, an address the namespace does not hold) is refused: only a
// pod's own veth ever gets the pod programs. It works the same for routed CNIs, bridges
// (the veth is a bridge port) and overlays, which have no host route to a pod.
func VethPeer(podNS netns.NsHandle, ip netip.Addr) (int, error) {
	in, err := netlink.NewHandleAt(podNS)
	if err != nil {
		return 0, fmt.Errorf("pod network namespace: %w", err)
	}
	defer in.Close()
	pod, err := linkWithAddr(in, ip)
	if err != nil {
		return 0, err
	}
	if pod == nil {
		return 0, &notHeldError{ip}
	}
	pa := pod.Attrs()
	if pod.Type() != "veth" {
		return 0, fmt.Errorf("%s is on %s (%s) in the pod's namespace, not a veth: not a pod interface veil captures", ip, pa.Name, pod.Type())
	}
	if pa.ParentIndex <= 0 {
		return 0, fmt.Errorf("%s is on veth %s, whose peer is unknown", ip, pa.Name)
	}
	host, err := netlink.LinkByIndex(pa.ParentIndex)
	if err != nil {
		return 0, fmt.Errorf("%s is on veth %s, whose peer (index %d) is not in this namespace: %w", ip, pa.Name, pa.ParentIndex, err)
	}
	ha := host.Attrs()
	if host.Type() != "veth" || ha.ParentIndex != pa.Index {
		return 0, fmt.Errorf("%s is on veth %s, whose peer index %d is %s (%s) here, not its peer", ip, pa.Name, pa.ParentIndex, ha.Name, host.Type())
	}
	// Indexes are per namespace: the host veth's peer must be in podNS itself.
	nsid, err := netlink.GetNetNsIdByFd(int(podNS))
	if err != nil {
		return 0, fmt.Errorf("the pod namespace's id: %w", err)
	}
	if nsid < 0 || ha.NetNsID != nsid {
		return 0, fmt.Errorf("%s is on veth %s, but %s here pairs with another namespace's interface", ip, pa.Name, ha.Name)
	}
	return ha.Index, nil
}

// linkWithAddr returns the interface of h's namespace that holds ip, or nil.
func linkWithAddr(h *netlink.Handle, ip netip.Addr) (netlink.Link, error) {
	fam := netlink.FAMILY_V4
	if ip.Is6() {
		fam = netlink.FAMILY_V6
	}
	addrs, err := h.AddrList(nil, fam)
	if err != nil {
		return nil, fmt.Errorf("addresses of the pod's namespace: %w", err)
	}
	for _, a := range addrs {
		if got, ok := netip.AddrFromSlice(a.IP); ok && got.Unmap() == ip {
			return h.LinkByIndex(a.LinkIndex)
		}
	}
	return nil, nil
}

// NetnsLinks is a PodLink that finds pods' network namespaces itself, as istio-cni does
// for pods that started before it: every namespace a process of the node is in (it
// needs the host's PID namespace) or that is pinned in /var/run/netns, asked which holds
// the pod's address on a veth paired with one of the agent's namespace (VethPeer). What
// it found is remembered per address and checked again on every call; the namespaces
// are scanned only for an address it has not found (or whose veth is gone). Safe for
// concurrent use.
type NetnsLinks struct {
	// Proc and Pinned are where processes and pinned namespaces are listed. Defaults
	// /proc and /var/run/netns.
	Proc, Pinned string

	mu    sync.Mutex
	known map[netip.Addr]netnsLink
}

// netnsLink is what was found for an address: the node-side veth, and what identifies
// it beyond its index (indexes are reused): its name, its peer's index and the peer's
// namespace id. No namespace is held open: that would keep a dead pod's network alive.
type netnsLink struct {
	ifindex, peer, nsid int
	name                string
}

func (k netnsLink) current() bool {
	l, err := netlink.LinkByIndex(k.ifindex)
	if err != nil {
		return false
	}
	a := l.Attrs()
	return l.Type() == "veth" && a.Name == k.name && a.ParentIndex == k.peer && a.NetNsID == k.nsid
}

// Link implements PodLink.
func (n *NetnsLinks) Link(ip netip.Addr) (int, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.known == nil {
		n.known = map[netip.Addr]netnsLink{}
	}
	if k, ok := n.known[ip]; ok {
		if k.current() {
			return k.ifindex, nil
		}
		delete(n.known, ip)
	}
	found, err := n.scan(ip)
	if err != nil {
		return 0, err
	}
	n.known[ip] = found
	if len(n.known) > 4*maxRemembered {
		n.known = map[netip.Addr]netnsLink{ip: found} // pods come and go: start over rather than grow
	}
	return found.ifindex, nil
}

// maxRemembered is about the pods one node runs.
const maxRemembered = 1024

// scan looks for ip in every network namespace of the node, each once.
func (n *NetnsLinks) scan(ip netip.Addr) (netnsLink, error) {
	proc, pinned := n.Proc, n.Pinned
	if proc == "" {
		proc = "/proc"
	}
	if pinned == "" {
		pinned = "/var/run/netns"
	}
	self, err := netns.Get()
	if err != nil {
		return netnsLink{}, fmt.Errorf("own network namespace: %w", err)
	}
	defer self.Close()
	seen := map[uint64]bool{}
	var own syscall.Stat_t
	if err := syscall.Fstat(int(self), &own); err != nil {
		return netnsLink{}, fmt.Errorf("own network namespace: %w", err)
	}
	seen[own.Ino] = true
	var paths []string
	if ents, err := os.ReadDir(pinned); err == nil {
		for _, e := range ents {
			paths = append(paths, filepath.Join(pinned, e.Name()))
		}
	}
	ents, err := os.ReadDir(proc)
	if err != nil {
		return netnsLink{}, fmt.Errorf("list processes (%s): %w", proc, err)
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err == nil {
			paths = append(paths, filepath.Join(proc, e.Name(), "ns", "net"))
		}
	}
	var lastErr error
	for _, p := range paths {
		var st syscall.Stat_t
		if syscall.Stat(p, &st) != nil || seen[st.Ino] {
			continue // a process that exited, or a namespace already asked
		}
		seen[st.Ino] = true
		h, err := netns.GetFromPath(p)
		if err != nil {
			continue
		}
		idx, err := VethPeer(h, ip)
		h.Close()
		if err == nil {
			if l, lerr := netlink.LinkByIndex(idx); lerr == nil {
				a := l.Attrs()
				return netnsLink{ifindex: idx, peer: a.ParentIndex, nsid: a.NetNsID, name: a.Name}, nil
			}
		}
		if holds(err) {
			lastErr = err // the namespace holds the address, but not on a pod veth of ours
		}
	}
	if lastErr != nil {
		return netnsLink{}, lastErr
	}
	return netnsLink{}, fmt.Errorf("no network namespace of this node holds %s on a veth paired with this namespace", ip)
}

// holds reports whether a VethPeer error is about a namespace that holds the address
// (worth reporting) rather than one that does not.
func holds(err error) bool {
	var h *notHeldError
	return !errors.As(err, &h)
}

type notHeldError struct{ ip netip.Addr }

func (e *notHeldError) Error() string {
	return fmt.Sprintf("no interface in the pod's network namespace holds %s", e.ip)
}
