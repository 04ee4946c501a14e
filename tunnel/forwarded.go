package tunnel

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// FormatForwarded returns the Forwarded header value (RFC 7239) that carries src:
// for="192.0.2.1:4711" or for="[2001:db8::1]:4711". An IPv4-mapped address is written
// as the IPv4 address it maps, and a zone is dropped (RFC 7239 §6 has no zones).
func FormatForwarded(src netip.AddrPort) string {
	return `for="` + FormatAuthority(src) + `"`
}

// FormatAuthority returns ap as an HBONE CONNECT :authority (RFC 9113 §8.5, RFC 3986
// §3.2.2): "192.0.2.1:15008", or "[2001:db8::1]:15008" with the IPv6 address in
// brackets. An IPv4-mapped address is written as the IPv4 address it maps, as ztunnel
// and the server compare it, and a zone is dropped: an authority carries none.
func FormatAuthority(ap netip.AddrPort) string {
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port()).String()
}

// ParseForwarded returns the address in the for= parameter of the first element of a
// Forwarded header (RFC 7239 §4), the hop closest to the original client. The node
// (ip:port, IPv6 in brackets, quoted when it has a colon) must carry a port.
func ParseForwarded(h string) (netip.AddrPort, error) {
	src, _, err := parseForwarded(h)
	return src, err
}

// parseForwarded returns for= and host= of the first element of a Forwarded header.
func parseForwarded(h string) (netip.AddrPort, string, error) {
	if h == "" {
		return netip.AddrPort{}, "", errors.New("forwarded: empty")
	}
	first, _, _ := strings.Cut(h, ",")
	var src netip.AddrPort
	var host string
	var sawFor bool
	for _, pair := range strings.Split(first, ";") {
		name, value, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if !ok {
			return netip.AddrPort{}, "", fmt.Errorf("forwarded: %q is not name=value", pair)
		}
		quoted := len(value) >= 2 && value[0] == '"' && value[len(value)-1] == '"'
		if quoted {
			value = value[1 : len(value)-1]
		}
		switch {
		case strings.EqualFold(name, "host"):
			host = value
		case strings.EqualFold(name, "for") && !sawFor:
			if !quoted && strings.ContainsAny(value, `":[]`) {
				return netip.AddrPort{}, "", fmt.Errorf("forwarded: for=%s: a node with a port must be quoted", value)
			}
			ap, err := netip.ParseAddrPort(value)
			if err != nil {
				return netip.AddrPort{}, "", fmt.Errorf("forwarded: for=%q: %w", value, err)
			}
			if ap.Addr().Zone() != "" {
				return netip.AddrPort{}, "", fmt.Errorf("forwarded: for=%q: zoned address", value)
			}
			src, sawFor = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
		}
	}
	if !sawFor {
		return netip.AddrPort{}, "", errors.New("forwarded: no for= parameter")
	}
	return src, host, nil
}
