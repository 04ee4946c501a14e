package waypoint

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/tunnel"
	"github.com/veilmesh/veil/waypoint/jwtauth"
)

// Router decides, for one waypoint, what each accepted CONNECT may reach and which
// policies judge its requests. Feed it with Update and ApplyPolicies (it is a
// agent.ConfigSink); Route is safe for concurrent use.
type Router struct {
	// Namespace and Name are the waypoint's Gateway.
	Namespace, Name string
	TrustDomain     spiffeid.TrustDomain
	// Policy are the mesh's policy settings; Policy.Placement decides whether the
	// destination workloads' own policies are enforced here too.
	Policy policy.Options
	// Now is the clock for token expiry; default time.Now.
	Now func() time.Time

	mu     sync.Mutex // serializes Update and ApplyPolicies
	store  *policy.Store
	state  atomic.Pointer[routerState]
	next   atomic.Uint32
	authns atomic.Pointer[authCache]
}

// routerState is an immutable picture of what the waypoint serves.
type routerState struct {
	self *cluster.Waypoint
	err  error // why the waypoint cannot serve (its Gateway is missing or refused)
	// pods by address (all pods with an address), and their identities.
	pods map[netip.Addr]*cluster.Pod
	ids  map[*cluster.Pod]spiffeid.ID
	// vips are the Services bound to this waypoint, by address.
	vips map[netip.Addr]*cluster.Service
	// bound are the pods bound to this waypoint (workload traffic), by address.
	bound map[netip.Addr]*cluster.Pod
	// podPorts are the protocols the Services selecting a bound pod declare for its
	// ports (computed here, not on every CONNECT).
	podPorts map[*cluster.Pod]map[uint16]Protocol
	// endpoints of the bound Services.
	endpoints map[*cluster.Service][]*cluster.Pod
	enrolled  map[*cluster.Pod]bool
}

// authCache holds the JWT authenticators compiled for one policy snapshot.
type authCache struct {
	snap *policy.Snapshot
	mu   sync.Mutex
	m    map[string]*jwtauth.Authenticator
	errs map[string]error
}

// ErrNotBound is the error of a CONNECT for a destination this waypoint does not serve:
// the waypoint is not an open relay.
var ErrNotBound = errors.New("destination is not bound to this waypoint")

func (r *Router) init() {
	if r.store == nil {
		r.store = &policy.Store{Options: r.Policy}
	}
}

// ApplyPolicies implements agent.ConfigSink.
func (r *Router) ApplyPolicies(objs []*policy.Object, deleted []policy.Key) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.init()
	if len(objs) > 0 {
		if _, err := r.store.Apply(objs...); err != nil {
			return err
		}
	}
	if len(deleted) > 0 {
		r.store.Delete(deleted...)
	}
	return nil
}

// Update implements agent.ConfigSink.
func (r *Router) Update(st *cluster.State) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.init()
	rs := &routerState{pods: map[netip.Addr]*cluster.Pod{}, ids: map[*cluster.Pod]spiffeid.ID{},
		vips: map[netip.Addr]*cluster.Service{}, bound: map[netip.Addr]*cluster.Pod{},
		endpoints: map[*cluster.Service][]*cluster.Pod{}, enrolled: map[*cluster.Pod]bool{},
		podPorts: map[*cluster.Pod]map[uint16]Protocol{}}
	bind := st.Bindings()
	var ws []*policy.Workload
	for _, p := range st.Pods {
		if p.HostNetwork {
			continue
		}
		ws = append(ws, &policy.Workload{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels,
			ServiceAccount: p.ServiceAccount, IPs: p.IPs, Waypoint: st.IsWaypointPod(p), Source: p.Source})
		id, err := identity.NewID(r.TrustDomain, p.Namespace, p.ServiceAccount)
		if err != nil {
			continue
		}
		rs.ids[p] = id
		rs.enrolled[p] = st.Enrolled(p)
		for _, ip := range p.IPs {
			rs.pods[ip] = p
		}
		if w, err := bind.PodWaypoint(p); err == nil && r.isSelf(w) {
			for _, ip := range p.IPs {
				rs.bound[ip] = p
			}
			rs.podPorts[p] = podProtocols(st, p)
		}
	}
	rs.self, rs.err = bind.Resolve(r.Namespace, r.Name)
	for _, s := range st.Services {
		if w, err := bind.ServiceWaypoint(s); err == nil && r.isSelf(w) {
			for _, ip := range s.ClusterIPs {
				rs.vips[ip] = s
			}
			rs.endpoints[s] = st.Endpoints(s)
		}
	}
	r.store.ReplaceWorkloads(ws...)
	r.state.Store(rs)
}

func (r *Router) isSelf(w *cluster.Waypoint) bool {
	return w != nil && w.Gateway.Namespace == r.Namespace && w.Gateway.Name == r.Name
}

// Ready reports whether the waypoint has a config in which its Gateway can serve.
func (r *Router) Ready() error {
	rs := r.state.Load()
	if rs == nil {
		return errors.New("no config yet")
	}
	return rs.err
}

// Route resolves an accepted CONNECT: the peer must own the source it names, and the
// destination must be a Service address and port bound to this waypoint, or the address
// of a pod bound to it. Anything else is refused (tunnel.Denied, tunnel.Unreachable).
func (r *Router) Route(req *tunnel.Request) (*Route, error) {
	rs := r.state.Load()
	if rs == nil || rs.self == nil {
		return nil, tunnel.Unreachable(errors.New("waypoint: not serving: no usable config for its Gateway"))
	}
	src := rs.pods[req.Source.Addr().Unmap()]
	if src == nil || rs.ids[src] != req.Peer {
		owner := "no known workload"
		if src != nil {
			owner = rs.ids[src].String()
		}
		return nil, tunnel.Denied(fmt.Errorf("source %s belongs to %s, not to peer %s", req.Source.Addr(), owner, req.Peer))
	}
	dst := req.Destination
	rt := &Route{}
	ctx := &routeCtx{r: r, rs: rs, req: req, src: src}
	if svc := rs.vips[dst.Addr().Unmap()]; svc != nil {
		var sp *cluster.ServicePort
		for i := range svc.Ports {
			if svc.Ports[i].Port == dst.Port() && svc.Ports[i].Protocol == "TCP" {
				sp = &svc.Ports[i]
				break
			}
		}
		if sp == nil {
			return nil, tunnel.Unreachable(fmt.Errorf("%w: Service %s/%s has no TCP port %d", ErrNotBound, svc.Namespace, svc.Name, dst.Port()))
		}
		ctx.svc, ctx.port = svc, sp
		rt.Protocol = PortProtocol(sp.Port, sp.Name, sp.AppProtocol)
	} else if pod := rs.bound[dst.Addr().Unmap()]; pod != nil {
		ctx.pod = pod
		p, ok := rs.podPorts[pod][dst.Port()]
		if !ok {
			p = ProtocolAuto // no Service port declares it: sniffed, as Istio does
		}
		rt.Protocol = p
	} else {
		return nil, tunnel.Unreachable(fmt.Errorf("%w: %s", ErrNotBound, dst))
	}
	rt.Decide = ctx.decideHTTP
	rt.DecideTCP = ctx.decideTCP
	rt.Labels = ctx.labels()
	return rt, nil
}

// podProtocols are the protocols the Services that select p declare for p's ports (the
// last Service listed wins a port two declare).
func podProtocols(st *cluster.State, p *cluster.Pod) map[uint16]Protocol {
	out := map[uint16]Protocol{}
	for _, s := range st.Services {
		if s.Namespace != p.Namespace || len(s.Selector) == 0 || !cluster.Selects(s.Selector, p.Labels) {
			continue
		}
		for _, sp := range s.Ports {
			if tp, ok := sp.TargetPortOn(p); ok && sp.Protocol == "TCP" {
				out[tp] = PortProtocol(tp, sp.Name, sp.AppProtocol)
			}
		}
	}
	return out
}

// routeCtx is one accepted CONNECT's route.
type routeCtx struct {
	r   *Router
	rs  *routerState
	req *tunnel.Request
	src *cluster.Pod
	// svc and port for service traffic, pod for workload traffic.
	svc  *cluster.Service
	port *cluster.ServicePort
	pod  *cluster.Pod
}

// Endpoint is where the waypoint forwards a request: the pod and its address.
type Endpoint struct {
	Pod      *cluster.Pod
	ID       spiffeid.ID
	Addr     netip.AddrPort
	Enrolled bool // reached over HBONE, else plain TCP
}

// pick chooses a ready endpoint, round robin, in the family of the dialled address.
func (c *routeCtx) pick() (*Endpoint, bool) {
	dst := c.req.Destination
	if c.pod != nil {
		return &Endpoint{Pod: c.pod, ID: c.rs.ids[c.pod], Addr: dst, Enrolled: c.rs.enrolled[c.pod]}, true
	}
	eps := c.rs.endpoints[c.svc]
	start := int(c.r.next.Add(1))
	for i := range len(eps) {
		p := eps[(start+i)%len(eps)]
		port, ok := c.port.TargetPortOn(p)
		if !ok {
			continue
		}
		for _, ip := range p.IPs {
			if ip.Is4() == dst.Addr().Unmap().Is4() {
				return &Endpoint{Pod: p, ID: c.rs.ids[p], Addr: netip.AddrPortFrom(ip, port), Enrolled: c.rs.enrolled[p]}, true
			}
		}
	}
	return nil, false
}

func (c *routeCtx) serviceRef() policy.ServiceRef {
	if c.svc == nil {
		return policy.ServiceRef{}
	}
	return policy.ServiceRef{Kind: "Service", Namespace: c.svc.Namespace, Name: c.svc.Name}
}

// self is the compiled waypoint: any of its pods (they share labels and policies).
func (c *routeCtx) self(snap *policy.Snapshot) *policy.CompiledWorkload {
	for _, p := range c.rs.self.Pods {
		if cw := snap.Workload(p.Namespace, p.Name); cw != nil {
			return cw
		}
	}
	return nil
}

var (
	rbacDenied = &Response{Status: http.StatusForbidden, Body: "RBAC: access denied"}
	noUpstream = &Response{Status: http.StatusServiceUnavailable, Body: "no healthy upstream", Flags: "UH"}
)

// decideHTTP is Envoy's order at a waypoint: CUSTOM, RequestAuthentication, DENY, ALLOW
// (AUDIT logged), for the targetRefs policies of the waypoint and, under veil's
// placement, for the destination workload's own policies: two decisions that must both
// allow, each with its own RequestAuthentications.
func (c *routeCtx) decideHTTP(hr *http.Request) (Upstream, *Response) {
	ep, ok := c.pick()
	if !ok {
		return Upstream{}, noUpstream
	}
	snap := c.r.store.Snapshot()
	gw := c.self(snap)
	if gw == nil {
		return Upstream{}, rbacDenied // fail closed: the waypoint is not in the policy snapshot
	}
	req := c.request(hr, ep)
	layers := []*policy.CompiledWorkload{gw}
	if !c.r.Policy.Istio() {
		w := snap.WorkloadByIP(ep.Addr.Addr())
		if w == nil {
			return Upstream{}, rbacDenied // fail closed: an endpoint the policy engine does not know
		}
		layers = append(layers, w)
	}
	svc := c.serviceRef()
	// CUSTOM first, without the token (Envoy's ext_authz runs before jwt_authn): veil
	// calls no external authorizer, so a matching CUSTOM policy denies. The first decision
	// is for the Service (its targetRefs policies), the second for the endpoint.
	for i, cw := range layers {
		req.Service = policy.ServiceRef{}
		if i == 0 {
			req.Service = svc
		}
		if !cw.HasCustom(req.Service) {
			continue
		}
		if d := cw.EvaluateHTTP(req); d.Custom != nil {
			return Upstream{}, rbacDenied
		}
	}
	jwts := make([]*policy.JWT, len(layers))
	now := time.Now
	if c.r.Now != nil {
		now = c.r.Now
	}
	// Each decision authenticates the request as the client sent it: the first one's
	// changes (its token removed, its outputs set) must not hide the token from the
	// second; both sets of changes are forwarded.
	var sent http.Header
	for i, cw := range layers {
		ras := cw.RequestAuthentications
		if i == 0 {
			ras = cw.RequestAuthenticationsFor(svc)
		}
		if len(ras) == 0 {
			continue
		}
		a, err := c.r.authenticator(snap, ras)
		if err != nil {
			return Upstream{}, &Response{Status: http.StatusUnauthorized, Body: "Jwt verification fails"}
		}
		target := hr
		if sent == nil {
			sent = hr.Header.Clone()
		} else {
			target = hr.Clone(hr.Context())
			target.Header = sent.Clone()
		}
		tok, fail := a.Authenticate(target, now())
		if target != hr {
			mergeChanges(hr.Header, sent, target.Header)
		}
		if fail != nil {
			h := http.Header{}
			if fail.WWWAuthenticate != "" {
				h.Set("WWW-Authenticate", fail.WWWAuthenticate)
			}
			return Upstream{}, &Response{Status: fail.Status, Body: fail.Body, Header: h}
		}
		jwts[i] = tok
	}
	// RBAC sees the request as the JWT filter left it: a client's copies of output
	// headers removed, verified claims copied in (unchanged when no filter ran).
	if sent != nil {
		req.Headers = lowerHeaders(hr.Header)
	}
	for i, cw := range layers {
		req.JWT = jwts[i]
		if i == 0 {
			req.Service = svc
		} else {
			req.Service = policy.ServiceRef{}
		}
		if d := cw.EvaluateHTTP(req); !d.Allowed() {
			return Upstream{}, rbacDenied
		}
	}
	return ep.upstream(), nil
}

// endpointKey is what the dialer needs of an endpoint; comparable, so the proxy reuses
// connections to it.
type endpointKey struct {
	ID       spiffeid.ID
	Addr     netip.AddrPort
	Enrolled bool
}

func (ep *Endpoint) key() endpointKey { return endpointKey{ep.ID, ep.Addr, ep.Enrolled} }

// upstream is the proxy's name for the endpoint.
func (ep *Endpoint) upstream() Upstream {
	return Upstream{Addr: ep.Addr, Key: ep.key(), Workload: &Workload{Name: ep.Pod.Name, Namespace: ep.Pod.Namespace,
		Principal: ep.ID.String(), CanonicalService: ep.Pod.Labels["app"]}}
}

// mergeChanges applies to h what an authenticator changed in after relative to before.
func mergeChanges(h, before, after http.Header) {
	for k, v := range after {
		if !slices.Equal(before[k], v) {
			h[k] = v
		}
	}
	for k := range before {
		if _, ok := after[k]; !ok {
			delete(h, k)
		}
	}
}

// decideTCP judges a connection the waypoint cannot parse with Envoy's TCP semantics:
// both decisions, with no HTTP attributes; a DENY rule that needs HTTP attributes denies.
func (c *routeCtx) decideTCP() (Upstream, error) {
	ep, ok := c.pick()
	if !ok {
		return Upstream{}, errors.New("no healthy upstream")
	}
	snap := c.r.store.Snapshot()
	gw := c.self(snap)
	if gw == nil {
		return Upstream{}, errors.New("waypoint not in the policy snapshot")
	}
	conn := policy.Conn{Peer: policy.ParsePeer(c.req.Peer.String()), SrcIP: c.req.Source.Addr(), DstIP: ep.Addr.Addr(), DstPort: ep.Addr.Port()}
	if d := gw.EvaluateTCP(&conn, c.serviceRef()); !d.Allowed() || d.Custom != nil {
		return Upstream{}, fmt.Errorf("denied: %s", d)
	}
	if !c.r.Policy.Istio() {
		w := snap.WorkloadByIP(ep.Addr.Addr())
		if w == nil {
			return Upstream{}, errors.New("denied: endpoint unknown to the policy engine")
		}
		if d := w.EvaluateTCP(&conn, policy.ServiceRef{}); !d.Allowed() || d.Custom != nil {
			return Upstream{}, fmt.Errorf("denied: %s", d)
		}
	}
	return ep.upstream(), nil
}

// request builds the policy engine's view of hr, sent to ep.
func (c *routeCtx) request(hr *http.Request, ep *Endpoint) *policy.Request {
	h := lowerHeaders(hr.Header)
	return &policy.Request{
		Conn: policy.Conn{Peer: policy.ParsePeer(c.req.Peer.String()), SrcIP: c.req.Source.Addr(),
			DstIP: ep.Addr.Addr(), DstPort: ep.Addr.Port()},
		Host:    hr.Host,
		Method:  hr.Method,
		Path:    hr.URL.RequestURI(),
		Headers: h,
	}
}

// lowerHeaders is h with lower-case names, as the policy engine reads them.
func lowerHeaders(h http.Header) map[string][]string {
	out := make(map[string][]string, len(h))
	for k, v := range h {
		out[strings.ToLower(k)] = v
	}
	return out
}

// authenticator returns the JWT filter for a set of RequestAuthentications, compiled
// once per policy snapshot.
func (r *Router) authenticator(snap *policy.Snapshot, ras []*policy.Object) (*jwtauth.Authenticator, error) {
	var b strings.Builder
	for _, o := range ras {
		b.WriteString(o.Namespace)
		b.WriteByte('/')
		b.WriteString(o.Name)
		b.WriteByte(',')
	}
	key := b.String()
	ac := r.authns.Load()
	if ac == nil || ac.snap != snap {
		ac = &authCache{snap: snap, m: map[string]*jwtauth.Authenticator{}, errs: map[string]error{}}
		r.authns.Store(ac)
	}
	ac.mu.Lock()
	defer ac.mu.Unlock()
	if a, ok := ac.m[key]; ok {
		return a, ac.errs[key]
	}
	a, err := jwtauth.New(ras)
	ac.m[key], ac.errs[key] = a, err
	return a, err
}

func (c *routeCtx) labels() MetricLabels {
	l := MetricLabels{
		SourceWorkload:          c.src.Name,
		SourceNamespace:         c.src.Namespace,
		SourcePrincipal:         c.req.Peer.String(),
		SourceCanonicalService:  c.src.Labels["app"],
		ConnectionSecurityLabel: "mutual_tls",
	}
	if c.svc != nil {
		l.DestinationService = c.svc.Name + "." + c.svc.Namespace + ".svc.cluster.local"
		l.DestinationServiceName = c.svc.Name
		l.DestinationServiceNS = c.svc.Namespace
	} else if c.pod != nil {
		l.DestinationWorkload = c.pod.Name
		l.DestinationNamespace = c.pod.Namespace
		l.DestinationPrincipal = c.rs.ids[c.pod].String()
		l.DestinationCanonicalService = c.pod.Labels["app"]
	}
	return l
}
