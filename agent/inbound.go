package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/tunnel"
)

var errDenied = errors.New("denied by policy")

func peerOf(id spiffeid.ID) policy.Peer { return policy.ParsePeer(id.String()) }

func flagFor(err error) string {
	if errors.Is(err, errDenied) {
		return flagDenied
	}
	return flagUnreachable
}

// admit decides an inbound connection to the local workload dst with the destination's
// PeerAuthentication and AuthorizationPolicy, logs and counts a denial, and on allow
// dials the application from the original source address and tracks the connection for
// policy changes. remove untracks it; the caller calls it when the connection ends.
func (a *Agent) admit(ctx context.Context, f flow, peer policy.Peer, dst *workload, src, target netip.AddrPort) (up net.Conn, remove func(), err error) {
	pc := policy.Conn{Peer: peer, SrcIP: src.Addr(), DstIP: target.Addr(), DstPort: target.Port()}
	d := a.decide(a.view.Load(), a.store.Snapshot(), &pc)
	if !d.Allowed() {
		pol := ""
		if d.Policy != nil {
			pol = d.Policy.Namespace + "/" + d.Policy.Name
		}
		a.denyLog("connection denied", "src", src.String(), "src_principal", peer.URI, "dst", target.String(), "dst_workload", dst.String(), "policy", pol, "decision", d.String())
		a.metrics.fail(f, flagDenied)
		a.metrics.denied.WithLabelValues(f.labels["reporter"], dst.pod.Namespace, pol).Inc()
		return nil, nil, fmt.Errorf("%w: %s", errDenied, d.String())
	}
	up, err = a.opts.Sockets.Dial(ctx, src, target)
	if err != nil {
		a.log.Info("inbound: application unreachable", "src", src.String(), "dst", target.String(), "dst_workload", dst.String(), "err", err)
		a.metrics.fail(f, flagUnreachable)
		return nil, nil, err
	}
	remove = a.tracker.add(&tracked{conn: pc, desc: src.String() + "->" + target.String() + " (" + dst.String() + ")", close: func() { up.Close() }})
	// A policy change during the dial found nothing to re-check: decide again now that the
	// connection is tracked.
	if d := a.decide(a.view.Load(), a.store.Snapshot(), &pc); !d.Allowed() {
		remove()
		up.Close()
		a.denyLog("connection denied", "src", src.String(), "src_principal", peer.URI, "dst", target.String(), "dst_workload", dst.String(), "decision", d.String())
		a.metrics.fail(f, flagDenied)
		return nil, nil, fmt.Errorf("%w: %s", errDenied, d.String())
	}
	return up, remove, nil
}

// decide is the L4 decision for an inbound connection to a local workload, with veil's
// policy placement (policy.PlacementVeil): a connection whose proven peer is a waypoint
// serving the destination was judged there against the destination's own policies, for
// the real client, so they are not applied again to the waypoint's identity; an in-mesh
// connection to a workload bound to a waypoint that did not come through one serving it
// is refused, unless the mesh allows the bypass. Everything else, and everything under
// policy.PlacementIstio, is the policy engine's L4 decision (ztunnel's).
func (a *Agent) decide(v *view, snap *policy.Snapshot, c *policy.Conn) policy.Decision {
	if c.Peer.URI == "" || a.opts.Policy.Istio() || v == nil {
		return snap.EvaluateL4(c)
	}
	dst := v.byIP[c.DstIP.Unmap()]
	if dst == nil {
		return snap.EvaluateL4(c)
	}
	if src := v.byIP[c.SrcIP.Unmap()]; src != nil && src.isWaypoint && src.id.String() == c.Peer.URI {
		if enforces, serving := dst.servedBy[src.id]; serving {
			if !enforces {
				// A waypoint that does not declare veil's placement (istiod's Envoy, or
				// one run with --policy-placement=istio) enforced only its targetRefs
				// policies: the workload's are applied here, to its identity.
				return snap.EvaluateL4(c)
			}
			if snap.WorkloadByIP(c.DstIP) == nil {
				return policy.Decision{Reason: policy.ReasonUnknownWorkload}
			}
			return policy.Decision{Reason: policy.ReasonViaWaypoint}
		}
	}
	if dst.waypoint != nil && !a.opts.Policy.AllowWaypointBypass {
		return policy.Decision{Reason: policy.ReasonWaypointBypass}
	}
	return snap.EvaluateL4(c)
}

// inbound is the state of an HBONE stream between Connect and Done.
type inbound struct {
	flow   flow
	remove func()
}

// connectInbound decides an HBONE stream to a local workload (the tunnel.Handler).
func (a *Agent) connectInbound(ctx context.Context, r *tunnel.Request) (net.Conn, error) {
	v := a.view.Load()
	dst := v.localEnrolled(r.Destination.Addr())
	if dst == nil {
		return nil, tunnel.Unreachable(fmt.Errorf("%s is not an enrolled pod of node %s", r.Destination.Addr(), a.opts.Node))
	}
	src := v.byIP[r.Source.Addr()]
	f := newFlow("destination", src, dst, r.Peer.String(), dst.id.String(), true)
	// Without Forwarded, a tunnel from a node's address is the node's proxy speaking for
	// a pod of that node with the peer's identity (Istio's Go dialer on a node): the
	// source is that node address.
	nodeProxy := !r.Forwarded && src == nil && v.nodeIDs[r.Source.Addr()][r.Peer]
	// The Forwarded source is the client's word: it decides ipBlocks and the address the
	// application sees, so it must be a workload with the identity the peer proved.
	// Without Forwarded (Istio's Go dialer sends none) the source is the tunnel's own
	// peer address, held to the same rule: a pod dialling with its own identity.
	// A Forwarded source that no workload owns yet may be a pod its node has just started:
	// its CNI enrolled it before the controller published its address. Accepted only
	// when the tunnel comes from a node running a pod with the peer's identity that has
	// no address yet; an address that belongs to a workload never is.
	newPod := r.Forwarded && src == nil && v.startingIDs[r.Remote.Addr()][r.Peer]
	if !nodeProxy && !newPod && (src == nil || src.id != r.Peer) {
		owner := "no known workload"
		if src != nil {
			owner = src.id.String()
		}
		a.denyLog("connection denied: source does not belong to the peer", "src", r.Source.String(), "forwarded", r.Forwarded, "src_owner", owner, "peer", r.Peer.String(), "dst", r.Destination.String())
		a.metrics.fail(f, flagDenied)
		return nil, tunnel.Denied(fmt.Errorf("source %s belongs to %s, not to peer %s", r.Source.Addr(), owner, r.Peer))
	}
	if !a.limit.acquire(r.Source.Addr()) {
		a.denyLog("connection refused: too many connections", "src", r.Source.String(), "peer", r.Peer.String(), "dst", r.Destination.String(),
			"max", a.opts.MaxConnections, "max_per_source", a.opts.MaxConnectionsPerSource)
		a.metrics.fail(f, flagOverflow)
		return nil, tunnel.Unreachable(errors.New("too many connections"))
	}
	up, remove, err := a.admit(ctx, f, peerOf(r.Peer), dst, r.Source, r.Destination)
	if err != nil {
		a.limit.release(r.Source.Addr())
	}
	if errors.Is(err, errDenied) {
		return nil, tunnel.Denied(err)
	}
	if err != nil {
		return nil, tunnel.Unreachable(err)
	}
	a.metrics.open(f)
	a.streams.Store(r, &inbound{flow: f, remove: func() { remove(); a.limit.release(r.Source.Addr()) }})
	return up, nil
}

// inboundDone records the end of an HBONE stream that Connect admitted.
func (a *Agent) inboundDone(r *tunnel.Request, c tunnel.Counts, _ error) {
	v, ok := a.streams.LoadAndDelete(r)
	if !ok {
		return // refused in Connect
	}
	in := v.(*inbound)
	in.remove()
	// Join's A is the application, B the tunnel: BToA flowed toward the destination.
	a.metrics.close(in.flow, c.BToA, c.AToB)
}

// Plaintext proxies a connection captured on its way to an enrolled pod of this node
// that did not come through HBONE: from outside the mesh. The pod's effective
// PeerAuthentication decides first (STRICT resets it), then AuthorizationPolicy with no
// peer identity. It blocks until the connection ends and closes c.
func (a *Agent) Plaintext(ctx context.Context, c net.Conn, orig netip.AddrPort) {
	v := a.view.Load()
	srcAddr := addrPort(c.RemoteAddr())
	dst := v.localEnrolled(orig.Addr())
	if dst == nil {
		a.log.Warn("plaintext: refused: destination is not an enrolled pod of this node", "src", srcAddr.String(), "dst", orig.String())
		reset(c)
		return
	}
	srcW := v.byIP[srcAddr.Addr()]
	f := newFlow("destination", srcW, dst, "", dst.id.String(), false)
	if srcW != nil && srcW.enrolled {
		// An enrolled pod always reaches an enrolled pod over HBONE (or, on this node,
		// through the agent): plaintext from its address is a bypass of its own agent or
		// a spoofed source. Refused whatever the PeerAuthentication mode.
		a.denyLog("connection denied: plaintext from an enrolled pod's address (capture bypassed or source spoofed)", "src", srcAddr.String(), "src_workload", srcW.String(), "dst", orig.String(), "dst_workload", dst.String())
		a.metrics.fail(f, flagDenied)
		reset(c)
		return
	}
	up, remove, err := a.admit(ctx, f, policy.Peer{}, dst, srcAddr, orig)
	if err != nil {
		reset(c)
		return
	}
	a.metrics.open(f)
	counts := a.join(ctx, c, up)
	remove()
	a.metrics.close(f, counts.AToB, counts.BToA)
}
