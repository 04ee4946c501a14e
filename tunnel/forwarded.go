package tunnel

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// FormatForwarded returns the Forwarded header value (RFC 7239) that carries src:
// for="192.0.2.1:4711" or for="[2001:db8::1]:4711".
func FormatForwarded(src netip.AddrPort) string {
	return `for="` + src.String() + `"`
}

// ParseForwarded returns the address in the for= parameter of the first element of a
// Forwarded header (RFC 7239 §4), the hop closest to the original client. The node
// (ip:port, IPv6 in brackets, quoted when it has a colon) must carry a port.
func ParseForwarded(h string) (netip.AddrPort, error) {
	if h == "" {
		return netip.AddrPort{}, errors.New("forwarded: empty")
	}
	first, _, _ := strings.Cut(h, ",")
	for _, pair := range strings.Split(first, ";") {
		name, value, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if !ok {
			return netip.AddrPort{}, fmt.Errorf("forwarded: %q is not name=value", pair)
		}
		if !strings.EqualFold(name, "for") {
			continue
		}
		if len(value) >= 2 && value[0] == '"' && value[len(value)-1] == '"' {
			value = value[1 : len(value)-1]
		} else if strings.ContainsAny(value, `":[]`) {
			return netip.AddrPort{}, fmt.Errorf("forwarded: for=%s: a node with a port must be quoted", value)
		}
		ap, err := netip.ParseAddrPort(value)
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("forwarded: for=%q: %w", value, err)
		}
		if ap.Addr().Zone() != "" {
			return netip.AddrPort{}, fmt.Errorf("forwarded: for=%q: zoned address", value)
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	return netip.AddrPort{}, errors.New("forwarded: no for= parameter")
}
