//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net/netip"
)

// Defaults for the zero values of Options.
const (
	// DefaultPinDir is where maps and links are pinned; it must be on a bpf filesystem.
	DefaultPinDir = "/sys/fs/bpf/veil"
	// DefaultCaptureMark is set on packets assigned to an agent socket. The policy route
	// matches it.
	DefaultCaptureMark = 0x5e1
	// DefaultAgentMark is the SO_MARK the agent's sockets carry; capture skips it.
	DefaultAgentMark = 0x5e2
	// DefaultMarkMask is the part of skb->mark veil owns.
	DefaultMarkMask = 0xfff
	// DefaultRouteTable holds "local default dev lo" for marked packets.
	DefaultRouteTable = 1505
	// DefaultRulePriority places the fwmark rule before "main" (32766) and before the
	// per-pod source rules some CNIs install.
	DefaultRulePriority = 100
)

// DefaultHostExclude is the probe source that Istio's CNI SNATs kubelet probes to; host
// traffic from it is never captured, even with CaptureHost.
var DefaultHostExclude = []netip.Prefix{netip.MustParsePrefix("169.254.7.127/32")}

// Options configure Load. The zero value is usable: every zero field means its default.
type Options struct {
	// PinDir is the bpffs directory for pinned maps and links (DefaultPinDir).
	PinDir string
	// Uplinks names the interfaces through which other nodes' packets enter (eth0, an
	// overlay device). Load attaches the ingress program to each.
	Uplinks []string

	CaptureMark  uint32 // DefaultCaptureMark
	AgentMark    uint32 // DefaultAgentMark
	MarkMask     uint32 // DefaultMarkMask
	RouteTable   int    // DefaultRouteTable
	RulePriority int    // DefaultRulePriority

	// FailOpen passes enrolled pods' traffic in plaintext while no agent listener is
	// registered, instead of dropping it. Off by default: fail closed.
	FailOpen bool
	// CaptureHost captures connections the node itself opens to enrolled pods (kubelet
	// probes, hostNetwork pods), except from HostExclude. Off by default, as in Istio.
	CaptureHost bool
	// HostExclude lists host source prefixes never captured (DefaultHostExclude when nil).
	HostExclude []netip.Prefix
	// Exclude lists destinations enrolled pods reach directly, uncaptured.
	Exclude []netip.Prefix

	// ForceClsact attaches with netlink clsact filters even where TCX exists (kernels
	// before 6.6 always use them).
	ForceClsact bool
	// SkipNotrack does not install the nftables NOTRACK rule. Only safe where no
	// netfilter NAT (kube-proxy in iptables or nftables mode) runs on the node.
	SkipNotrack bool
}

func (o Options) withDefaults() Options {
	if o.PinDir == "" {
		o.PinDir = DefaultPinDir
	}
	if o.CaptureMark == 0 {
		o.CaptureMark = DefaultCaptureMark
	}
	if o.AgentMark == 0 {
		o.AgentMark = DefaultAgentMark
	}
	if o.MarkMask == 0 {
		o.MarkMask = DefaultMarkMask
	}
	if o.RouteTable == 0 {
		o.RouteTable = DefaultRouteTable
	}
	if o.RulePriority == 0 {
		o.RulePriority = DefaultRulePriority
	}
	if o.HostExclude == nil {
		o.HostExclude = DefaultHostExclude
	}
	return o
}

func (o Options) validate() error {
	var errs []error
	if o.CaptureMark&^o.MarkMask != 0 {
		errs = append(errs, fmt.Errorf("CaptureMark %#x has bits outside MarkMask %#x", o.CaptureMark, o.MarkMask))
	}
	if o.AgentMark&^o.MarkMask != 0 {
		errs = append(errs, fmt.Errorf("AgentMark %#x has bits outside MarkMask %#x", o.AgentMark, o.MarkMask))
	}
	if o.CaptureMark == o.AgentMark {
		errs = append(errs, fmt.Errorf("CaptureMark and AgentMark are both %#x; they must differ (the agent's own packets must not be routed locally)", o.CaptureMark))
	}
	// 253-255 are the kernel's default, main and local tables.
	if o.RouteTable < 1 || o.RouteTable >= 253 && o.RouteTable <= 255 || o.RouteTable > 0xffffffff-1 {
		errs = append(errs, fmt.Errorf("RouteTable %d is reserved or out of range", o.RouteTable))
	}
	if o.RulePriority < 1 || o.RulePriority >= 32766 {
		errs = append(errs, fmt.Errorf("RulePriority %d must be between 1 and 32765 (before the main table's rule)", o.RulePriority))
	}
	for i, p := range o.Exclude {
		if !p.IsValid() {
			errs = append(errs, fmt.Errorf("Exclude[%d]: invalid prefix", i))
		}
	}
	for i, p := range o.HostExclude {
		if !p.IsValid() {
			errs = append(errs, fmt.Errorf("HostExclude[%d]: invalid prefix", i))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("bpf: options: %w", err)
	}
	return nil
}
