package agent

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"

	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/tunnel"
)

// Outbound proxies a connection captured from an enrolled pod of this node; orig is the
// destination the pod dialled. An enrolled destination is reached over HBONE with the
// source pod's certificate (on this node: through the same policy check, without
// TLS); any other destination gets plain TCP passthrough; a Service VIP is first
// load-balanced to a ready endpoint. It blocks until the connection ends and closes c.
func (a *Agent) Outbound(ctx context.Context, c net.Conn, orig netip.AddrPort) {
	v := a.view.Load()
	srcAddr := addrPort(c.RemoteAddr())
	src := v.localEnrolled(srcAddr.Addr())
	if src == nil {
		// The capture hands over only enrolled pods' connections; anything else is a
		// misconfiguration, and is refused rather than forwarded unauthenticated.
		a.log.Warn("outbound: refused: source is not an enrolled pod of this node", "src", srcAddr.String(), "dst", orig.String())
		a.metrics.fail(newFlow("source", nil, nil, "", "", false), flagNoRoute)
		reset(c)
		return
	}
	target := orig
	if svc := v.vips[orig.Addr()]; svc != nil {
		// Traffic addressed to a Service goes through the Service's waypoint, never the
		// pod's (ISTIO-SEMANTICS §7).
		if (svc.waypoint != nil || svc.waypointErr != nil) && !src.isWaypoint {
			a.viaWaypoint(ctx, c, src, svc.waypoint, svc.waypointErr, srcAddr, orig, svc.svc.Name+"."+svc.svc.Namespace+".svc.cluster.local")
			return
		}
		ep, ok := svc.pick(orig)
		if !ok {
			a.log.Info("outbound: refused: service has no ready endpoint for the port", "src", srcAddr.String(), "service", svc.svc.Namespace+"/"+svc.svc.Name, "dst", orig.String())
			a.metrics.fail(newFlow("source", src, nil, src.id.String(), "", false), flagNoRoute)
			reset(c)
			return
		}
		target = ep
	}
	dst := v.byIP[target.Addr()]
	// A waypoint's own traffic (when its pod is captured at all) never goes through a
	// waypoint again.
	if dst != nil && target == orig && dst.enrolled && (dst.waypoint != nil || dst.waypointErr != nil) && !src.isWaypoint {
		a.viaWaypoint(ctx, c, src, dst.waypoint, dst.waypointErr, srcAddr, orig, "")
		return
	}
	switch {
	case dst != nil && dst.enrolled && dst.local:
		a.sameNode(ctx, c, src, dst, srcAddr, target)
	case dst != nil && dst.enrolled:
		a.viaHBONE(ctx, c, src, dst, srcAddr, target)
	default:
		a.passthrough(ctx, c, src, dst, srcAddr, target)
	}
}

// pick chooses a ready endpoint for a connection to a Service port, round robin, in the
// address family of the VIP, and maps the port to the pod's target port.
func (s *service) pick(vip netip.AddrPort) (netip.AddrPort, bool) {
	var sp *int
	for i := range s.svc.Ports {
		if s.svc.Ports[i].Port == vip.Port() && s.svc.Ports[i].Protocol == "TCP" {
			sp = &i
			break
		}
	}
	if sp == nil {
		return netip.AddrPort{}, false
	}
	start := int(s.next.Add(1))
	for i := range len(s.slices) {
		ep := s.slices[(start+i)%len(s.slices)]
		port, ok := ep.Ports[s.svc.Ports[*sp].Name]
		if ok && ep.Addr.Is4() == vip.Addr().Is4() {
			return netip.AddrPortFrom(ep.Addr, port), true
		}
	}
	if len(s.endpoints) == 0 {
		return netip.AddrPort{}, false
	}
	for i := range len(s.endpoints) {
		w := s.endpoints[(start+i)%len(s.endpoints)]
		port, ok := s.svc.Ports[*sp].TargetPortOn(w.pod)
		if !ok {
			continue
		}
		for _, ip := range w.pod.IPs {
			if ip.Is4() == vip.Addr().Is4() {
				return netip.AddrPortFrom(ip, port), true
			}
		}
	}
	return netip.AddrPort{}, false
}

// viaWaypoint carries a connection to the waypoint wp bound to its destination: HBONE to
// one of the waypoint's pods, with the source pod's certificate, the destination as
// dialled for :authority, and the waypoint's identity expected. A binding that cannot be
// used (err) fails the connection rather than skip the waypoint.
func (a *Agent) viaWaypoint(ctx context.Context, c net.Conn, src *workload, wp *cluster.Waypoint, err error, srcAddr, orig netip.AddrPort, host string) {
	v := a.view.Load()
	if err != nil {
		a.log.Info("outbound: refused: the destination's waypoint cannot be used", "src", srcAddr.String(), "src_workload", src.String(), "dst", orig.String(), "err", err)
		a.metrics.fail(newFlow("source", src, nil, src.id.String(), "", false), flagNoRoute)
		reset(c)
		return
	}
	var pod *workload
	for i := range len(wp.Pods) {
		p := wp.Pods[(int(a.wpNext.Add(1))+i)%len(wp.Pods)]
		if w := v.byIP[p.IPs[0]]; w != nil && w.isWaypoint {
			pod = w
			break
		}
	}
	if pod == nil {
		a.log.Info("outbound: refused: the destination's waypoint has no usable pod", "src", srcAddr.String(), "dst", orig.String(), "waypoint", wp.String())
		a.metrics.fail(newFlow("source", src, nil, src.id.String(), "", false), flagNoRoute)
		reset(c)
		return
	}
	f := newFlow("source", src, pod, src.id.String(), pod.id.String(), true)
	addr := pod.pod.IPs[0]
	for _, ip := range pod.pod.IPs {
		if ip.Is4() == orig.Addr().Is4() {
			addr = ip
			break
		}
	}
	key := tunnel.Key{Src: src.id, Dst: pod.id, Addr: netip.AddrPortFrom(addr, a.opts.HBONEPort)}
	s, err := a.pool.Open(ctx, key, tunnel.Target{Authority: orig, Source: srcAddr, Host: host})
	if err != nil {
		a.log.Warn("outbound: HBONE connect to the waypoint failed", "src", srcAddr.String(), "dst", orig.String(), "waypoint", wp.String(), "err", err)
		a.metrics.fail(f, flagUnreachable)
		reset(c)
		return
	}
	a.carry(ctx, f, c, s)
}

func (a *Agent) viaHBONE(ctx context.Context, c net.Conn, src, dst *workload, srcAddr, target netip.AddrPort) {
	f := newFlow("source", src, dst, src.id.String(), dst.id.String(), true)
	key := tunnel.Key{Src: src.id, Dst: dst.id, Addr: netip.AddrPortFrom(target.Addr(), a.opts.HBONEPort)}
	s, err := a.pool.Connect(ctx, key, target, srcAddr)
	if err != nil {
		var se *tunnel.StatusError
		if errors.As(err, &se) && se.Code == http.StatusUnauthorized {
			a.denyLog("outbound: denied by the destination's policy", "src", srcAddr.String(), "src_workload", src.String(), "dst", target.String(), "dst_workload", dst.String())
			a.metrics.fail(f, flagDenied)
		} else {
			a.log.Warn("outbound: HBONE connect failed", "src", srcAddr.String(), "dst", target.String(), "dst_workload", dst.String(), "err", err)
			a.metrics.fail(f, flagUnreachable)
		}
		reset(c)
		return
	}
	a.carry(ctx, f, c, s)
}

func (a *Agent) passthrough(ctx context.Context, c net.Conn, src, dst *workload, srcAddr, target netip.AddrPort) {
	f := newFlow("source", src, dst, src.id.String(), "", false)
	up, err := a.opts.Sockets.Dial(ctx, srcAddr, target)
	if err != nil {
		a.log.Info("outbound: passthrough dial failed", "src", srcAddr.String(), "dst", target.String(), "err", err)
		a.metrics.fail(f, flagUnreachable)
		reset(c)
		return
	}
	a.carry(ctx, f, c, up)
}

// sameNode serves an enrolled destination on this node without a network round trip:
// the source's identity is known (its connection came from its own veth), so the
// destination's policy is checked exactly as on the HBONE path, then the application is
// dialled from the source's address.
func (a *Agent) sameNode(ctx context.Context, c net.Conn, src, dst *workload, srcAddr, target netip.AddrPort) {
	fs := newFlow("source", src, dst, src.id.String(), dst.id.String(), true)
	fd := newFlow("destination", src, dst, src.id.String(), dst.id.String(), true)
	up, remove, err := a.admit(ctx, fd, peerOf(src.id), dst, srcAddr, target)
	if err != nil {
		a.metrics.fail(fs, flagFor(err))
		reset(c)
		return
	}
	a.metrics.open(fs)
	a.metrics.open(fd)
	counts := a.join(ctx, c, up)
	remove()
	a.metrics.close(fs, counts.AToB, counts.BToA)
	a.metrics.close(fd, counts.AToB, counts.BToA)
}

// carry proxies c with up until both end, counting the flow f.
func (a *Agent) carry(ctx context.Context, f flow, c net.Conn, up io.ReadWriteCloser) {
	a.metrics.open(f)
	counts := a.join(ctx, c, up)
	a.metrics.close(f, counts.AToB, counts.BToA)
}
