//go:build linux

package bpf

import (
	"net/netip"
	"strings"
	"testing"
)

func TestOptionsValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
		want string // substring of the error; empty: valid
	}{
		{"zero value", Options{}, ""},
		{"same marks", Options{CaptureMark: 0x10, AgentMark: 0x10}, "must differ"},
		{"capture mark outside mask", Options{CaptureMark: 0x1000}, "CaptureMark 0x1000 has bits outside MarkMask 0xfff"},
		{"agent mark outside mask", Options{AgentMark: 0x2000}, "AgentMark 0x2000 has bits outside"},
		{"main table", Options{RouteTable: 254}, "RouteTable 254 is reserved"},
		{"rule after main", Options{RulePriority: 32766}, "RulePriority 32766"},
		{"bad exclude", Options{Exclude: []netip.Prefix{{}}}, "Exclude[0]: invalid prefix"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.o.withDefaults().validate()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v; want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestPodValidate(t *testing.T) {
	ok := netip.MustParseAddr("10.244.1.2")
	for _, tc := range []struct {
		name string
		p    Pod
		want string
	}{
		{"valid", Pod{IfIndex: 3, IPs: []netip.Addr{ok, netip.MustParseAddr("fd00::2")}}, ""},
		{"no ifindex", Pod{IPs: []netip.Addr{ok}}, "interface index 0"},
		{"no IPs", Pod{IfIndex: 3}, "no IP addresses"},
		{"invalid IP", Pod{IfIndex: 3, IPs: []netip.Addr{{}}}, "IPs[0]: invalid address"},
		{"unspecified", Pod{IfIndex: 3, IPs: []netip.Addr{ok, netip.IPv4Unspecified()}}, "IPs[1] 0.0.0.0: not a pod address"},
		{"loopback", Pod{IfIndex: 3, IPs: []netip.Addr{netip.MustParseAddr("::1")}}, "not a pod address"},
		{"zoned", Pod{IfIndex: 3, IPs: []netip.Addr{netip.MustParseAddr("fd00::2%eth0")}}, "zoned"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.p.validate()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v; want it to contain %q", err, tc.want)
			}
		})
	}
}

// TestEnrollErrors: bad input through the API fails with an error naming what is wrong,
// and changes nothing.
func TestEnrollErrors(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{})
	if err := c.Enroll(Pod{IfIndex: 9999, IPs: []netip.Addr{pod1v4}}); err == nil || !strings.Contains(err.Error(), "interface 9999") {
		t.Errorf("Enroll on a missing interface: %v", err)
	}
	if err := c.Enroll(Pod{IfIndex: tp.vp1}); err == nil || !strings.Contains(err.Error(), "no IP addresses") {
		t.Errorf("Enroll without IPs: %v", err)
	}
	if err := c.SetListener(Role(7), nil); err == nil || !strings.Contains(err.Error(), "unknown role 7") {
		t.Errorf("SetListener with a bad role: %v", err)
	}
	if pods, err := c.List(); err != nil || len(pods) != 0 {
		t.Errorf("List after failed enrolls = %v, %v; want none", pods, err)
	}
	tp.node.do(t, func() error {
		_, err := Load(Options{PinDir: t.TempDir()})
		if err == nil || !strings.Contains(err.Error(), "is not on a bpf filesystem") {
			t.Errorf("Load with a pin dir outside bpffs: %v", err)
		}
		return nil
	})
	c.Close()
	if err := c.Enroll(Pod{IfIndex: tp.vp1, IPs: []netip.Addr{pod1v4}}); err != ErrClosed {
		t.Errorf("Enroll after Close: %v; want ErrClosed", err)
	}
}
