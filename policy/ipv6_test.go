package policy

import (
	"net/netip"
	"testing"
)

// ipBlocks, notIpBlocks, remoteIpBlocks and the *.ip conditions on IPv6 and dual-stack
// clients: an IPv4-mapped client address is matched as the IPv4 address it maps; an
// IPv4-mapped CIDR matches its IPv4 range and nothing more (no other IPv4 address, no
// IPv6 address, not the IPv4-compatible ::a.b.c.d form); a zone never hides an address.
func TestIPBlocksOnIPv6(t *testing.T) {
	allow := func(name, blocks string) string {
		return apYAML("ns", name, "  action: ALLOW\n  rules: [{from: [{source: {ipBlocks: "+blocks+"}}]}]")
	}
	deny := func(name, field, blocks string) string {
		return apYAML("ns", name, "  action: DENY\n  rules: [{from: [{source: {"+field+": "+blocks+"}}]}]")
	}
	for _, tc := range []struct {
		name   string
		policy string
		src    string
		want   string
	}{
		{"ipv6 pod in an ipv6 range", allow("a", `["fd00:100:1::/64", "10.100.1.0/24"]`), "fd00:100:1::11", "allow by ns/a"},
		{"ipv6 pod outside it", allow("a", `["fd00:100:1::/64", "10.100.1.0/24"]`), "fd00:100:2::10", "deny: not allowed"},
		{"ipv4 pod of the same policy", allow("a", `["fd00:100:1::/64", "10.100.1.0/24"]`), "10.100.1.10", "allow by ns/a"},
		{"ipv4-mapped client unmapped", allow("a", `["fd00:100:1::/64", "10.100.1.0/24"]`), "::ffff:10.100.1.10", "allow by ns/a"},
		{"ipv4-mapped client of another range", allow("a", `["10.100.1.0/24"]`), "::ffff:10.100.2.10", "deny: not allowed"},
		{"single ipv6 address is a /128", allow("a", `["fd00:100:1::11"]`), "fd00:100:1::12", "deny: not allowed"},
		{"single ipv6 address matches itself", allow("a", `["fd00:100:1::11"]`), "fd00:100:1::11", "allow by ns/a"},

		{"mapped cidr matches its ipv4 range", allow("m", `["::ffff:10.100.1.0/120"]`), "10.100.1.10", "allow by ns/m"},
		{"mapped cidr matches a mapped client of its range", allow("m", `["::ffff:10.100.1.0/120"]`), "::ffff:10.100.1.200", "allow by ns/m"},
		{"mapped cidr not the next ipv4 range", allow("m", `["::ffff:10.100.1.0/120"]`), "10.100.2.10", "deny: not allowed"},
		{"mapped cidr no ipv6 address", allow("m", `["::ffff:10.100.1.0/120"]`), "fd00:100:1::a", "deny: not allowed"},
		{"mapped cidr not the ipv4-compatible form", allow("m", `["::ffff:10.100.1.0/120"]`), "::10.100.1.10", "deny: not allowed"},
		{"mapped /96 is all of ipv4 and only that", allow("m", `["::ffff:0.0.0.0/96"]`), "fd00::1", "deny: not allowed"},
		{"mapped /96 matches an ipv4 client", allow("m", `["::ffff:0.0.0.0/96"]`), "192.0.2.1", "allow by ns/m"},
		{"mapped address wider than /96 matches no ipv4 client", allow("m", `["::ffff:10.100.1.0/88"]`), "10.100.1.10", "deny: not allowed"},

		{"deny ipv6 range", deny("d", "ipBlocks", `["fd00:100:2::/64"]`), "fd00:100:2::10", "deny by ns/d"},
		{"deny ipv6 range spares ipv4 of that node", deny("d", "ipBlocks", `["fd00:100:2::/64"]`), "10.100.2.10", "allow"},
		{"deny ipv4 range spares ipv6 of that node", deny("d", "ipBlocks", `["10.100.2.0/24"]`), "fd00:100:2::10", "allow"},
		{"notIpBlocks both families: inside", deny("nb", "notIpBlocks", `["fd00:100::/32", "10.100.0.0/16"]`), "fd00:100:1::11", "allow"},
		{"notIpBlocks both families: ipv4 inside", deny("nb", "notIpBlocks", `["fd00:100::/32", "10.100.0.0/16"]`), "::ffff:10.100.1.10", "allow"},
		{"notIpBlocks both families: ipv6 outside", deny("nb", "notIpBlocks", `["fd00:100::/32", "10.100.0.0/16"]`), "fd00:200::1", "deny by ns/nb"},
		{"notIpBlocks both families: ipv4 outside", deny("nb", "notIpBlocks", `["fd00:100::/32", "10.100.0.0/16"]`), "192.168.1.1", "deny by ns/nb"},
		{"zoned link-local client still matches", deny("z", "ipBlocks", `["fe80::/10"]`), "fe80::1%eth0", "deny by ns/z"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Compile(load(t, tc.policy), nil, Options{})
			c := from("", 9080)
			c.SrcIP = netip.MustParseAddr(tc.src)
			c.DstIP = netip.MustParseAddr("fd00:100:2::10")
			if got := decisionOf(s.Compile(wl("ns/app")).EvaluateL4(c)); got != tc.want {
				t.Fatalf("source %s: %q, want %q", tc.src, got, tc.want)
			}
		})
	}
}

// The same on the HTTP path (a waypoint): remoteIpBlocks and the remote.ip and
// destination.ip conditions with IPv6 CIDRs.
func TestRemoteAndDestinationIPOnIPv6(t *testing.T) {
	s := Compile(load(t,
		apYAML("ns", "remote", "  action: DENY\n  rules: [{from: [{source: {remoteIpBlocks: [\"2001:db8::/32\", \"::ffff:192.0.2.0/120\"]}}]}]")+
			apYAML("ns", "dst", "  action: DENY\n  rules: [{when: [{key: destination.ip, values: [\"fd00:100:2::11\"]}]}]")), nil, Options{})
	w := s.Compile(wl("ns/app"))
	for _, tc := range []struct {
		name, remote, dst, want string
	}{
		{"remote ipv6 in range", "2001:db8::7", "fd00:100:2::10", "deny by ns/remote"},
		{"remote ipv6 outside", "2001:db9::7", "fd00:100:2::10", "allow"},
		{"remote ipv4 by its mapped cidr", "192.0.2.9", "fd00:100:2::10", "deny by ns/remote"},
		{"remote ipv4 beside its mapped cidr", "192.0.3.9", "fd00:100:2::10", "allow"},
		{"destination ipv6", "fd00:100:1::11", "fd00:100:2::11", "deny by ns/dst"},
		{"destination ipv4-mapped form of another", "fd00:100:1::11", "::ffff:10.100.2.11", "allow"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httpReq("", 9080, "GET", "/")
			r.SrcIP = netip.MustParseAddr("fd00:100:1::11")
			r.RemoteIP = netip.MustParseAddr(tc.remote)
			r.DstIP = netip.MustParseAddr(tc.dst)
			if got := decisionOf(w.EvaluateHTTP(r)); got != tc.want {
				t.Fatalf("remote %s to %s: %q, want %q", tc.remote, tc.dst, got, tc.want)
			}
		})
	}
}
