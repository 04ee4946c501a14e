package lab

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
)

// The IP families a Spec can have.
const (
	// FamilyIPv4 gives every node, pod and Service one IPv4 address (the default).
	FamilyIPv4 = "ipv4"
	// FamilyIPv6 gives them one IPv6 address each: an IPv6-only cluster, controller
	// included.
	FamilyIPv6 = "ipv6"
	// FamilyDual gives them an IPv4 and an IPv6 address, IPv4 first (the primary family,
	// as kubeadm's "10.244.0.0/16,fd00::/56" has it): a dual-stack cluster.
	FamilyDual = "dual"
)

// A lab's IPv6 addresses mirror its IPv4 ones, in the unique local range fd00::/8, each
// decimal number of the IPv4 address written with the same digits in the IPv6 one:
// 10.B.C.D is fd00:B:C::D, so node 10.99.0.1 is fd00:99::1, pod 10.100.2.10 is
// fd00:100:2::10, Service 10.96.0.11 is fd00:96::11, and a node's pod range
// 10.100.2.0/24 is fd00:100:2::/64.

// sixOf is the IPv6 address of the lab's IPv4 address a.
func sixOf(a netip.Addr) netip.Addr {
	b := a.As4()
	var s [16]byte
	s[0], s[1] = 0xfd, 0x00
	put := func(i int, v byte) {
		// The decimal digits of v read as hexadecimal: 100 -> 0x100. At most 0x255.
		n, _ := strconv.ParseUint(strconv.Itoa(int(v)), 16, 16)
		s[i], s[i+1] = byte(n>>8), byte(n)
	}
	put(2, b[1])
	put(4, b[2])
	put(14, b[3])
	return netip.AddrFrom16(s)
}

// has4 and has6 report the lab's families.
func (s *Spec) has4() bool { return s.Family != FamilyIPv6 }
func (s *Spec) has6() bool { return s.Family == FamilyIPv6 || s.Family == FamilyDual }

// addrsOf returns the addresses, one per family of the lab, of what has the IPv4
// address a in an IPv4 lab: a itself and sixOf(a), the primary first.
func (s *Spec) addrsOf(a netip.Addr) []netip.Addr {
	var out []netip.Addr
	if s.has4() {
		out = append(out, a)
	}
	if s.has6() {
		out = append(out, sixOf(a))
	}
	return out
}

// inFamily returns the address of addrs in family ("ipv4" or "ipv6"), or false.
func inFamily(addrs []netip.Addr, family string) (netip.Addr, bool) {
	for _, a := range addrs {
		if a.Is4() == (family == FamilyIPv4) {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// NodeIPs are a node's fabric addresses, the primary first.
func (s *Spec) NodeIPs(node string) []netip.Addr { return s.addrsOf(s.nodeIP4(node)) }

// PodIPs are a pod's addresses (status.podIPs), the primary first.
func (s *Spec) PodIPs(p *PodSpec) []netip.Addr { return s.addrsOf(s.podIP4(p)) }

// ServiceIPs are a Service's ClusterIPs (spec.clusterIPs), one per family, the primary
// first.
func (s *Spec) ServiceIPs(i int) []netip.Addr { return s.addrsOf(s.serviceIP4(i)) }

// controllerIP is the controller's address on the fabric: ControllerIP, or its IPv6
// twin in an IPv6-only lab.
func (s *Spec) controllerIP() netip.Addr { return s.addrsOf(ControllerIP())[0] }

// gateway6 is the next hop of a node's pods for IPv6: as a routed CNI sets it up, a
// link-local address of every node-side veth (the same on each: it is per link); on a
// bridge, cni0's address in the pods' /64.
func (s *Spec) gateway6(node string) netip.Addr {
	if s.Network == NetworkBridge {
		return sixOf(s.gateway(node))
	}
	return netip.MustParseAddr("fe80::1")
}

// prefixLen is the length of the lab's subnets in a's family: /24 or /64. (A routed
// pod's own address is a host route, /32 or /128.)
func prefixLen(a netip.Addr) int {
	if a.Is4() {
		return 24
	}
	return 64
}

// hostLen is a/32 or a/128.
func hostLen(a netip.Addr) string { return netip.PrefixFrom(a, a.BitLen()).String() }

// addrAdd is `ip -n ns addr add a/bits dev dev`, with nodad for IPv6: the lab's
// addresses are unique by construction, and an address that waits for duplicate
// address detection is unusable for a second or two after it is added.
func addrAdd(ns string, a netip.Addr, bits int, dev string) []string {
	c := []string{"ip", "-n", ns, "addr", "add", netip.PrefixFrom(a, bits).String(), "dev", dev}
	if a.Is6() {
		c = append(c, "nodad")
	}
	return c
}

// netnsSysctls are the sysctls a new namespace of the lab gets before any interface is
// made in it: a router (a node) forwards in each of the lab's families; with IPv6, no
// duplicate address detection on the interfaces to come, so that every address (the
// link-local ones the kernel adds too) is usable at once. A new namespace starts from
// the kernel's defaults, not the host's (net.core.devconf_inherit_init_net=0).
func (s *Spec) netnsSysctls(ns string, router bool) [][]string {
	keys := []string{}
	if router && s.has4() {
		keys = append(keys, "net.ipv4.ip_forward=1")
	}
	if s.has6() {
		keys = append(keys, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
		if router {
			keys = append(keys, "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.forwarding=1")
		}
	}
	if len(keys) == 0 {
		return nil
	}
	return [][]string{append([]string{"ip", "netns", "exec", ns, "sysctl", "-qw"}, keys...)}
}

// checkFamilies refuses a lab the machine or the options cannot give the spec's
// families.
func checkFamilies(s *Spec, opts Options) error {
	if !s.has6() {
		return nil
	}
	if _, err := os.Stat("/proc/sys/net/ipv6"); err != nil {
		return fmt.Errorf("lab: family %s needs IPv6, which this kernel has disabled (booted with ipv6.disable=1?): use family %s", s.Family, FamilyIPv4)
	}
	if opts.Kube {
		return fmt.Errorf("lab: a kube lab is IPv4 only (its API server's Service range is IPv4): family %s needs a config-directory lab", s.Family)
	}
	return nil
}

// familyOf is "ipv4" or "ipv6".
func familyOf(a netip.Addr) string {
	if a.Is4() {
		return FamilyIPv4
	}
	return FamilyIPv6
}

// joinAddrs writes addresses separated by spaces.
func joinAddrs(as []netip.Addr) string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, " ")
}
