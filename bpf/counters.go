//go:build linux

package bpf

import (
	"fmt"
)

// Decision indexes, as enum decision in capture.c.
const (
	dNone = iota
	dPassNotIP
	dPassNotTCP
	dPassNotEnrolled
	dPassMarked
	dPassExcluded
	dPassMalformed
	dEstablished
	dOutbound
	dInbound
	dInboundHBONE
	dDropMalformed
	dDropFragment
	dDropNoSocket
	dDropNoListener
	dFailOpen
	dHostHairpin
	dPassHost
	dAssignFailed
	dMax
)

// Counter is one packet counter: what happened (Result) and why (Reason).
type Counter struct {
	Result string // "captured", "passed" or "dropped"
	Reason string
	Value  uint64
}

// counterNames maps decision indexes to their Result and Reason. D_NONE is not counted.
var counterNames = [dMax]struct{ result, reason string }{
	dPassNotIP:       {"passed", "not_ip"},
	dPassNotTCP:      {"passed", "not_tcp"},
	dPassNotEnrolled: {"passed", "not_enrolled"},
	dPassMarked:      {"passed", "agent_mark"},
	dPassExcluded:    {"passed", "excluded"},
	dPassMalformed:   {"passed", "malformed_ip"},
	dEstablished:     {"captured", "established"},
	dOutbound:        {"captured", "outbound"},
	dInbound:         {"captured", "inbound"},
	dInboundHBONE:    {"captured", "inbound_hbone"},
	dDropMalformed:   {"dropped", "malformed_tcp"},
	dDropFragment:    {"dropped", "fragment"},
	dDropNoSocket:    {"dropped", "no_socket"},
	dDropNoListener:  {"dropped", "no_listener"},
	dFailOpen:        {"passed", "fail_open"},
	dHostHairpin:     {"captured", "host_hairpin"},
	dPassHost:        {"passed", "host_flow"},
	dAssignFailed:    {"dropped", "assign_failed"},
}

// Counters returns the packet counters summed over CPUs, in a fixed order, every counter
// present even when zero. They are pinned: they count from the first Load after the last
// Uninstall, across agent restarts. The agent exports them as
// veil_capture_packets_total{result,reason}. Safe for concurrent use; does not block.
func (c *Capture) Counters() ([]Counter, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	out := make([]Counter, 0, dMax)
	var per []uint64
	for i := 1; i < dMax; i++ {
		if err := c.objs.VeilCounters.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("bpf: read counter %s/%s: %w", counterNames[i].result, counterNames[i].reason, err)
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		out = append(out, Counter{Result: counterNames[i].result, Reason: counterNames[i].reason, Value: sum})
	}
	return out, nil
}
