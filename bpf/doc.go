// Package bpf captures enrolled pods' TCP connections for the veil agent, without
// sidecars and without iptables redirection.
//
// Two TC programs (capture.c, compiled by bpf2go; the .o files are committed) do the work:
//
//   - veil_ingress, at TC ingress of every pod's host-side veth and every uplink, hands a
//     new connection from an enrolled pod to the agent's outbound listener (:15001) and a
//     new connection to an enrolled pod to :15008 (destination port 15008) or :15006 (any
//     other port), with bpf_sk_assign. The accepted socket's local address is the original
//     destination. Packets of connections the agent already holds go to their socket.
//   - veil_egress, at TC egress of pod veths, hairpins host-originated connections to
//     enrolled pods back into ingress when host capture is on (off by default, as in Istio).
//
// Assigned packets carry a capture mark that a policy route (ip rule fwmark -> a table
// holding "local default dev lo") turns into local delivery, and an nftables rule exempts
// from conntrack so that kube-proxy's DNAT cannot rewrite the original destination.
//
// Enrollment is a map update keyed by pod IP; the programs never change per pod. Maps and
// links are pinned under a bpffs directory, so capture outlives the agent: while no agent
// listener is registered, enrolled pods' new connections are dropped (fail closed) unless
// Options.FailOpen is set, and a restarted agent adopts the pinned state with Load.
//
// Use: Load, then Attach every pod veth (Enroll attaches too), SetListener for the three
// listeners (made with Listen), Enroll/Unenroll pods, Counters for metrics. Uninstall
// removes everything Load and Enroll created.
package bpf
