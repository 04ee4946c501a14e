package policy

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
)

// Options configure compilation and validation. The zero value means Istio's defaults.
type Options struct {
	// RootNamespace is meshConfig.rootNamespace; "" means istio-system.
	RootNamespace string
	// TrustDomain is meshConfig.trustDomain; "" means cluster.local.
	TrustDomain string
	// TrustDomainAliases are meshConfig.trustDomainAliases, applied to principals at L7 only
	// (Envoy); ztunnel, and so veil at L4, does no alias expansion (§2.11).
	TrustDomainAliases []string
	// Placement says where the policies that select a workload are enforced for traffic
	// a waypoint carries: PlacementVeil (the default) or PlacementIstio.
	Placement Placement
	// AllowWaypointBypass, under PlacementVeil, lets a workload bound to a waypoint
	// accept in-mesh connections that did not come through it (Istio's behaviour).
	AllowWaypointBypass bool
}

// Placement is where a workload's own policies (root-namespace, namespace-wide and
// selector AuthorizationPolicies and RequestAuthentications) are enforced when a
// waypoint carries its traffic.
type Placement string

const (
	// PlacementVeil, veil's extension: the waypoint enforces them too, for the chosen
	// endpoint with the real client's identity; the destination's agent skips them only
	// for connections whose proven peer is a waypoint serving the workload, and refuses
	// in-mesh connections to a workload bound to a waypoint that did not come through
	// one (unless AllowWaypointBypass).
	PlacementVeil Placement = "veil"
	// PlacementIstio is Istio's placement: the waypoint enforces only targetRefs
	// policies, and the destination applies its L4 policies to the waypoint's identity.
	PlacementIstio Placement = "istio"
)

// ParsePlacement reads a --policy-placement value.
func ParsePlacement(s string) (Placement, error) {
	switch Placement(s) {
	case "", PlacementVeil:
		return PlacementVeil, nil
	case PlacementIstio:
		return PlacementIstio, nil
	}
	return "", fmt.Errorf("policy placement %q: want veil or istio", s)
}

// Istio reports whether o asks for Istio's exact placement.
func (o Options) Istio() bool { return o.Placement == PlacementIstio }

func (o Options) rootNamespace() string {
	if o.RootNamespace == "" {
		return DefaultRootNamespace
	}
	return o.RootNamespace
}

func (o Options) trustDomain() string {
	if o.TrustDomain == "" {
		return DefaultTrustDomain
	}
	return strings.ReplaceAll(o.TrustDomain, "@", ".")
}

type ruleRef struct {
	r *rule
	p *Policy
}

// ruleIndex finds the first matching rule (by policy order) without scanning every rule: rules
// that need an exact peer principal or namespace are bucketed by it.
type ruleIndex struct {
	byPrincipal map[string][]ruleRef
	byNamespace map[string][]ruleRef
	scan        []ruleRef
	// all holds every rule, for peers whose SPIFFE ID is not an Istio identity: the namespace
	// derived from a principal pattern cannot be trusted for them.
	all []ruleRef
	n   int
}

func (ix *ruleIndex) add(rr ruleRef) {
	ix.n++
	ix.all = append(ix.all, rr)
	if keys := indexKeys(rr.r, attrPrincipal); keys != nil {
		if ix.byPrincipal == nil {
			ix.byPrincipal = map[string][]ruleRef{}
		}
		for _, k := range keys {
			ix.byPrincipal[k] = append(ix.byPrincipal[k], rr)
		}
		return
	}
	if keys := indexKeys(rr.r, attrNamespace); keys != nil {
		if ix.byNamespace == nil {
			ix.byNamespace = map[string][]ruleRef{}
		}
		for _, k := range keys {
			ix.byNamespace[k] = append(ix.byNamespace[k], rr)
		}
		return
	}
	ix.scan = append(ix.scan, rr)
}

// indexKeys returns the exact values of a that the rule requires, or nil: some clause must have
// only matches that each carry a positive pred on a whose values are all exact. For
// attrNamespace, a principal pattern such as "td/ns/X/*" also requires namespace X.
func indexKeys(ru *rule, a attr) []string {
	for _, cl := range ru.clauses {
		if cl.never || len(cl.matches) == 0 {
			continue
		}
		var keys []string
		ok := true
		for _, m := range cl.matches {
			found := false
			for _, p := range m.preds {
				if p.not {
					continue
				}
				var vals []string
				switch {
				case p.attr == a && allExact(p.strs):
					for _, s := range p.strs {
						vals = append(vals, s.s)
					}
				case a == attrNamespace && p.attr == attrPrincipal:
					vals = principalNamespaces(p.strs)
				}
				if vals == nil {
					continue
				}
				for _, v := range vals {
					if !containsString(keys, v) {
						keys = append(keys, v)
					}
				}
				found = true
				break
			}
			if !found {
				ok = false
				break
			}
		}
		if ok && len(keys) > 0 {
			return keys
		}
	}
	return nil
}

// principalNamespaces returns the namespace each principal pattern requires ("td/ns/X/..." as
// an exact or prefix value with a literal trust domain), or nil if any pattern does not.
func principalNamespaces(ms []strMatch) []string {
	var out []string
	for _, m := range ms {
		if (m.kind != strExact && m.kind != strPrefix) || m.fold {
			return nil
		}
		parts := strings.SplitN(m.s, "/", 4)
		if len(parts) != 4 || parts[0] == "" || parts[1] != "ns" || parts[2] == "" {
			return nil
		}
		out = append(out, parts[2])
	}
	return out
}

func allExact(ms []strMatch) bool {
	for _, m := range ms {
		if m.kind != strExact || m.fold {
			return false
		}
	}
	return len(ms) > 0
}

// first returns the earliest policy (by order) with a rule matching r, or nil. It does not
// allocate.
func (ix *ruleIndex) first(r *Request) *Policy {
	if ix.n == 0 {
		return nil
	}
	if r.Peer.URI != "" && r.Peer.Namespace == "" {
		return firstIn(ix.all, r, nil) // not an Istio identity: no bucket applies
	}
	var best *Policy
	if len(ix.byPrincipal) > 0 {
		if pr, ok := r.Peer.principal(); ok {
			best = firstIn(ix.byPrincipal[pr], r, best)
		}
	}
	if len(ix.byNamespace) > 0 && r.Peer.Namespace != "" {
		best = firstIn(ix.byNamespace[r.Peer.Namespace], r, best)
	}
	return firstIn(ix.scan, r, best)
}

func firstIn(list []ruleRef, r *Request, best *Policy) *Policy {
	for i := range list {
		if best != nil && list[i].p.order >= best.order {
			return best
		}
		if list[i].r.eval(r) {
			return list[i].p
		}
	}
	return best
}

// policySet is the compiled form of a group of policies for one layer.
type policySet struct {
	deny, allow, audit, custom, dryRun ruleIndex
	allowPolicies                      int
	policies                           []*Policy
}

func buildSet(policies []*Policy, l layer) *policySet {
	if len(policies) == 0 {
		return nil
	}
	s := &policySet{policies: policies}
	for _, p := range policies {
		rules := p.l7
		if l == layerL4 {
			if p.l4Skipped {
				continue
			}
			rules = p.l4
		}
		ix := &s.allow
		switch {
		case p.DryRun:
			ix = &s.dryRun
		case p.Action == ActionDeny:
			ix = &s.deny
		case p.Action == ActionAudit:
			ix = &s.audit
		case p.Action == ActionCustom:
			ix = &s.custom
		default:
			s.allowPolicies++
		}
		for i := range rules {
			ix.add(ruleRef{&rules[i], p})
		}
	}
	return s
}

// enforcement is everything one workload enforces at one layer.
type enforcement struct {
	pa   *Policy       // derived from PeerAuthentication, checked first
	sets [3]*policySet // sets[0]: mesh, namespace and selector policies; others for gateways
}

func firstAcross(sets *[4]*policySet, pick func(*policySet) *ruleIndex, r *Request) *Policy {
	var best *Policy
	for _, s := range sets {
		if s == nil {
			continue
		}
		if p := pick(s).first(r); p != nil && (best == nil || p.order < best.order) {
			best = p
		}
	}
	return best
}

func pickDeny(s *policySet) *ruleIndex   { return &s.deny }
func pickAllow(s *policySet) *ruleIndex  { return &s.allow }
func pickAudit(s *policySet) *ruleIndex  { return &s.audit }
func pickCustom(s *policySet) *ruleIndex { return &s.custom }

// customConflict returns the first enforced CUSTOM policy when the workload's CUSTOM
// policies name more than one provider, else nil. It does not allocate.
func customConflict(sets *[4]*policySet) *Policy {
	var first *Policy
	conflict := false
	for _, s := range sets {
		if s == nil {
			continue
		}
		for _, p := range s.policies {
			if p.Action != ActionCustom || p.DryRun {
				continue
			}
			if first != nil && p.Provider != first.Provider {
				conflict = true
			}
			if first == nil || p.order < first.order {
				first = p
			}
		}
	}
	if conflict {
		return first
	}
	return nil
}
func pickDryRun(s *policySet) *ruleIndex { return &s.dryRun }

// decide runs the decision procedure of ISTIO-SEMANTICS §2.4 / §2.9.
func (e *enforcement) decide(r *Request, l layer, extra *policySet) Decision {
	rules := e.pa.rulesFor(l)
	for i := range rules {
		if rules[i].eval(r) {
			return Decision{Reason: ReasonDenied, Policy: e.pa}
		}
	}
	sets := [4]*policySet{e.sets[0], e.sets[1], e.sets[2], extra}
	var d Decision
	dry, allowN := false, 0
	custom := false
	for _, s := range sets {
		if s != nil {
			dry = dry || s.dryRun.n > 0
			custom = custom || s.custom.n > 0 || s.audit.n > 0
			allowN += s.allowPolicies
		}
	}
	if dry {
		d.DryRun = firstAcross(&sets, pickDryRun, r)
	}
	if custom && l == layerL7 {
		// Only one CUSTOM provider per workload: a conflict becomes deny-all (§2.4 step 1),
		// as istiod generates it. [Envoy]
		if p := customConflict(&sets); p != nil {
			d.Reason, d.Policy = ReasonDenied, p
			return d
		}
		// CUSTOM is consulted first; veil reports it, the caller asks the provider.
		d.Custom = firstAcross(&sets, pickCustom, r)
		d.Audit = firstAcross(&sets, pickAudit, r)
	}
	if r.tcp != tcpNone {
		r.tcp = tcpDenying
	}
	if p := firstAcross(&sets, pickDeny, r); p != nil {
		d.Reason, d.Policy = ReasonDenied, p
		return d
	}
	if allowN == 0 {
		d.Reason = ReasonNoAllowPolicy
		return d
	}
	if r.tcp != tcpNone {
		r.tcp = tcpAllowing
	}
	if p := firstAcross(&sets, pickAllow, r); p != nil {
		d.Reason, d.Policy = ReasonAllowed, p
		return d
	}
	d.Reason = ReasonNotAllowed
	return d
}

func (p *Policy) rulesFor(l layer) []rule {
	if p == nil {
		return nil
	}
	if l == layerL4 {
		return p.l4
	}
	return p.l7
}

// CompiledWorkload is a workload with everything that applies to it, ready for decisions. It is
// immutable and safe for concurrent use.
type CompiledWorkload struct {
	Workload *Workload
	// PeerAuth is the workload's PeerAuthentication outcome.
	PeerAuth PeerAuthResolution
	// Policies lists the AuthorizationPolicies that apply to the workload at L4 and at L7
	// (including ones not enforced at L4), by namespace then name.
	Policies []*Policy
	// RequestAuthentications lists the RequestAuthentications that apply (they are additive, §3.2).
	RequestAuthentications []*Object

	l4, l7     enforcement
	services   map[ServiceRef]*policySet // waypoints: targetRefs to a Service or ServiceEntry
	serviceRAs map[ServiceRef][]*Object  // waypoints: RequestAuthentications by targeted Service
}

// EvaluateL4 decides an inbound connection with ztunnel's semantics: PeerAuthentication
// (STRICT refuses connections without a peer identity), then DENY, then ALLOW, using only L4
// attributes. It takes no lock and does not allocate.
func (w *CompiledWorkload) EvaluateL4(c *Conn) Decision {
	r := Request{Conn: *c}
	return w.l4.decide(&r, layerL4, nil)
}

// EvaluateHTTP decides an HTTP request with Envoy's semantics (a sidecar, or a waypoint when the
// workload is one): PeerAuthentication, CUSTOM, DENY, ALLOW, AUDIT, with every attribute.
func (w *CompiledWorkload) EvaluateHTTP(r *Request) Decision {
	var extra *policySet
	if w.services != nil {
		extra = w.services[r.Service]
	}
	return w.l7.decide(r, layerL7, extra)
}

// HasCustom reports whether any CUSTOM policy applies to requests for svc (zero for
// none) at this workload: when not, no request's decision can name one, and a caller
// that checks CUSTOM apart (a waypoint, before authentication) can skip that pass.
func (w *CompiledWorkload) HasCustom(svc ServiceRef) bool {
	for _, s := range w.l7.sets {
		if s != nil && s.custom.n > 0 {
			return true
		}
	}
	s := w.services[svc]
	return s != nil && s.custom.n > 0
}

// EvaluateTCP decides a connection that an Envoy-based proxy (a waypoint) cannot parse as
// HTTP, with Envoy's TCP semantics over the policies that apply at L7 (for svc, at a
// waypoint): a DENY rule is enforced without its HTTP fields, so one that needs HTTP
// attributes denies the connection; an ALLOW rule with HTTP fields never matches; a
// matching CUSTOM policy is reported in Decision.Custom.
func (w *CompiledWorkload) EvaluateTCP(c *Conn, svc ServiceRef) Decision {
	r := Request{Conn: *c, Service: svc, tcp: tcpAllowing}
	var extra *policySet
	if w.services != nil {
		extra = w.services[svc]
	}
	return w.l7.decide(&r, layerL7, extra)
}

// Snapshot is an immutable, compiled view of all policies and workloads. It is safe for
// concurrent use; decisions on it take no lock.
type Snapshot struct {
	opts     Options
	objects  []*Object
	policies []*Policy
	pas      map[string][]*Object // PeerAuthentications by namespace
	ras      []*Object
	static   *Policy
	global   []*Policy // root namespace, no selector
	nsScopes map[string]*nsScope
	setCache map[string]*[2]*policySet

	workloads map[WorkloadKey]*CompiledWorkload
	byIP      map[netip.Addr]*CompiledWorkload
	// Warnings are things compilation noticed, such as newer duplicate PeerAuthentications.
	Warnings []string
}

type labelPair struct{ k, v string }

// nsScope holds one namespace's AuthorizationPolicies by attachment kind.
type nsScope struct {
	wide      []*Policy // no selector (or empty labels), no targetRefs
	selectors map[labelPair][]*Policy
	targeted  []*Policy
}

// Compile builds a Snapshot from valid objects (see Validate; Store validates for you) and
// workloads. Objects of a kind are deduplicated by namespace/name, the last one winning.
func Compile(objects []*Object, workloads []*Workload, opts Options) *Snapshot {
	root := opts.rootNamespace()
	s := &Snapshot{opts: opts, pas: map[string][]*Object{}, nsScopes: map[string]*nsScope{},
		setCache: map[string]*[2]*policySet{}, workloads: map[WorkloadKey]*CompiledWorkload{},
		byIP: map[netip.Addr]*CompiledWorkload{}, static: newStaticStrict(root)}
	dedup := map[Key]*Object{}
	for _, o := range objects {
		dedup[o.Key()] = o
	}
	for _, o := range dedup {
		s.objects = append(s.objects, o)
	}
	sort.Slice(s.objects, func(i, j int) bool {
		a, b := s.objects[i], s.objects[j]
		if a.Namespace != b.Namespace {
			return a.Namespace < b.Namespace
		}
		if a.Name != b.Name {
			return a.Name < b.Name
		}
		return a.Kind < b.Kind
	})
	c := newCompiler(opts)
	var global []*Policy
	for _, o := range s.objects {
		switch o.Kind {
		case KindPeerAuthentication:
			s.pas[o.Namespace] = append(s.pas[o.Namespace], o)
		case KindRequestAuthentication:
			s.ras = append(s.ras, o)
		case KindAuthorizationPolicy:
			p := c.compilePolicy(o)
			p.order = int32(len(s.policies))
			s.policies = append(s.policies, p)
			ns := s.scope(o.Namespace)
			ap := o.AuthorizationPolicy
			switch {
			case p.targeted:
				ns.targeted = append(ns.targeted, p)
			case len(ap.GetSelector().GetMatchLabels()) == 0 && o.Namespace == root:
				global = append(global, p)
			case len(ap.GetSelector().GetMatchLabels()) == 0:
				ns.wide = append(ns.wide, p)
			default:
				k, v := anyPair(ap.Selector.MatchLabels)
				if ns.selectors == nil {
					ns.selectors = map[labelPair][]*Policy{}
				}
				ns.selectors[labelPair{k, v}] = append(ns.selectors[labelPair{k, v}], p)
			}
		}
	}
	s.global = global
	s.warnDuplicates(root)
	for _, w := range workloads {
		cw := s.Compile(w)
		s.workloads[WorkloadKey{w.Namespace, w.Name}] = cw
		for _, ip := range w.IPs {
			s.byIP[ip.Unmap()] = cw
		}
	}
	return s
}

func (s *Snapshot) scope(ns string) *nsScope {
	sc := s.nsScopes[ns]
	if sc == nil {
		sc = &nsScope{}
		s.nsScopes[ns] = sc
	}
	return sc
}

// anyPair returns the smallest key of labels and its value, the key a selector is indexed by.
func anyPair(labels map[string]string) (string, string) {
	best := ""
	first := true
	for k := range labels {
		if first || k < best {
			best, first = k, false
		}
	}
	return best, labels[best]
}

func (s *Snapshot) warnDuplicates(root string) {
	for _, ns := range sortedKeys(s.pas) {
		var wide []*Object
		for _, o := range s.pas[ns] {
			if !hasSelector(o.PeerAuthentication) {
				wide = append(wide, o)
			} else if ns == root {
				s.Warnings = append(s.Warnings, o.Key().String()+": a PeerAuthentication with a selector in the root namespace is ignored")
			}
		}
		if len(wide) > 1 {
			sortByAge(wide)
			for _, o := range wide[1:] {
				s.Warnings = append(s.Warnings, o.Key().String()+": ignored, "+wide[0].Key().String()+" is older and applies to the same "+levelName(ns, root))
			}
		}
	}
}

func levelName(ns, root string) string {
	if ns == root {
		return "mesh"
	}
	return "namespace"
}

// Compile compiles one workload against the snapshot's policies, whether or not it is part of
// the snapshot. It allocates; the agent uses Workload or WorkloadByIP instead.
func (s *Snapshot) Compile(w *Workload) *CompiledWorkload {
	root := s.opts.rootNamespace()
	cw := &CompiledWorkload{Workload: w}
	var pas []*Object
	pas = append(pas, s.pas[root]...)
	if w.Namespace != root {
		pas = append(pas, s.pas[w.Namespace]...)
	}
	cw.PeerAuth = ResolvePeerAuthentication(pas, root, w.Namespace, w.Labels)
	pa := peerAuthPolicy(&cw.PeerAuth, s.static)
	cw.l4.pa, cw.l7.pa = pa, pa

	// Selector policies from the workload's namespace and the root namespace.
	var selected []*Policy
	for _, ns := range uniqNS(w.Namespace, root) {
		sc := s.nsScopes[ns]
		if sc == nil || sc.selectors == nil {
			continue
		}
		for k, v := range w.Labels {
			for _, p := range sc.selectors[labelPair{k, v}] {
				if selects(p.Object.AuthorizationPolicy.Selector.MatchLabels, w.Labels) {
					selected = append(selected, p)
				}
			}
		}
	}
	sort.Slice(selected, func(i, j int) bool { return selected[i].order < selected[j].order })
	set := s.workloadSet(w.Namespace, root, selected)
	cw.l4.sets = [3]*policySet{set[0]}
	cw.l7.sets = [3]*policySet{set[1]}

	gateway := w.Labels[gatewayNameLabel]
	if gateway != "" {
		s.attachGateway(cw, gateway, root)
	}
	for _, set := range cw.l7.sets {
		if set != nil {
			cw.Policies = append(cw.Policies, set.policies...)
		}
	}
	for _, set := range cw.services {
		cw.Policies = append(cw.Policies, set.policies...)
	}
	sort.Slice(cw.Policies, func(i, j int) bool { return cw.Policies[i].order < cw.Policies[j].order })
	for _, o := range s.ras {
		ra := o.RequestAuthentication
		targeted := ra.TargetRef != nil || len(ra.TargetRefs) > 0
		if gateway != "" && targeted {
			s.attachGatewayRA(cw, o, gateway, root)
			continue
		}
		if o.Namespace != w.Namespace && o.Namespace != root {
			continue
		}
		if targeted || gateway != "" && w.Waypoint {
			continue // targetRefs apply to gateways and waypoints only; waypoints never use selectors
		}
		if !selects(ra.GetSelector().GetMatchLabels(), w.Labels) {
			continue
		}
		cw.RequestAuthentications = append(cw.RequestAuthentications, o)
	}
	return cw
}

// attachGatewayRA attaches a targetRefs RequestAuthentication o to the gateway or
// waypoint cw when one of its references names it (§0): the Gateway in its namespace,
// GatewayClass istio-waypoint from the root namespace, or, for a waypoint, a Service or
// ServiceEntry (then only for requests to that Service).
func (s *Snapshot) attachGatewayRA(cw *CompiledWorkload, o *Object, gateway, root string) {
	ra := o.RequestAuthentication
	refs := ra.TargetRefs
	if len(refs) == 0 {
		refs = append(refs, ra.TargetRef)
	}
	w := cw.Workload
	for _, ref := range refs {
		switch {
		case ref.Namespace != "":
		case ref.Kind == "Gateway" && o.Namespace == w.Namespace && ref.Name == gateway,
			ref.Kind == "GatewayClass" && ref.Name == "istio-waypoint" && w.Waypoint && o.Namespace == root:
			cw.RequestAuthentications = append(cw.RequestAuthentications, o)
			return
		case (ref.Kind == "Service" || ref.Kind == "ServiceEntry") && w.Waypoint:
			k := ServiceRef{ref.Kind, o.Namespace, ref.Name}
			if cw.serviceRAs == nil {
				cw.serviceRAs = map[ServiceRef][]*Object{}
			}
			if l := cw.serviceRAs[k]; len(l) == 0 || l[len(l)-1] != o {
				cw.serviceRAs[k] = append(l, o)
			}
		}
	}
}

// RequestAuthenticationsFor returns the RequestAuthentications that apply to a request
// for Service svc (zero for none) at this workload: RequestAuthentications, and for a
// waypoint those whose targetRefs name svc.
func (w *CompiledWorkload) RequestAuthenticationsFor(svc ServiceRef) []*Object {
	extra := w.serviceRAs[svc]
	if len(extra) == 0 {
		return w.RequestAuthentications
	}
	return append(append([]*Object(nil), w.RequestAuthentications...), extra...)
}

func uniqNS(ns, root string) []string {
	if ns == root {
		return []string{ns}
	}
	return []string{ns, root}
}

// workloadSet returns the L4 and L7 policy sets for a workload in ns selected by the selector
// policies sel: mesh-wide, namespace-wide and selected policies merged into one set, so a
// decision probes one index. Workloads with the same namespace and selected policies share it.
func (s *Snapshot) workloadSet(ns, root string, sel []*Policy) [2]*policySet {
	var b strings.Builder
	b.WriteString(ns)
	b.WriteByte('|')
	for _, p := range sel {
		b.WriteString(strconv.Itoa(int(p.order)))
		b.WriteByte(',')
	}
	key := b.String()
	if set, ok := s.setCache[key]; ok {
		return *set
	}
	ps := append([]*Policy(nil), s.global...)
	if sc := s.nsScopes[ns]; sc != nil && ns != root {
		ps = append(ps, sc.wide...)
	}
	ps = append(ps, sel...)
	sort.Slice(ps, func(i, j int) bool { return ps[i].order < ps[j].order })
	set := &[2]*policySet{buildSet(ps, layerL4), buildSet(ps, layerL7)}
	s.setCache[key] = set
	return *set
}

// attachGateway applies ISTIO-SEMANTICS §0 "Attachment decision" for a Gateway API gateway or
// waypoint at L7. L4 (ztunnel) never enforces targetRefs policies.
func (s *Snapshot) attachGateway(cw *CompiledWorkload, gateway, root string) {
	w := cw.Workload
	var attached []*Policy
	if !w.Waypoint {
		// Other gateways keep selector policies (ENABLE_SELECTOR_BASED_K8S_GATEWAY_POLICY=true).
		for _, set := range cw.l7.sets {
			if set != nil {
				attached = append(attached, set.policies...)
			}
		}
	}
	byService := map[ServiceRef][]*Policy{}
	scopes := uniqNS(w.Namespace, root)
	if w.Waypoint {
		// A waypoint serves Services of other namespaces too, and a Service's policies live
		// in the Service's namespace (§2.3): every namespace's targetRefs count.
		scopes = scopes[:0:0]
		for ns := range s.nsScopes {
			scopes = append(scopes, ns)
		}
		sort.Strings(scopes)
	}
	for _, ns := range scopes {
		sc := s.nsScopes[ns]
		if sc == nil {
			continue
		}
		for _, p := range sc.targeted {
			ap := p.Object.AuthorizationPolicy
			refs := ap.TargetRefs
			if len(refs) == 0 {
				refs = append(refs, ap.TargetRef)
			}
			for _, ref := range refs {
				switch {
				case ref.Namespace != "":
					// cross-namespace references never match
				case ref.Kind == "Gateway" && p.Namespace == w.Namespace && ref.Name == gateway:
					attached = append(attached, p)
				case ref.Kind == "GatewayClass" && ref.Name == "istio-waypoint" && w.Waypoint && p.Namespace == root:
					attached = append(attached, p)
				case (ref.Kind == "Service" || ref.Kind == "ServiceEntry") && w.Waypoint:
					// Each Service reference attaches the policy for that Service: look at
					// the others too (§0: any one reference matches, per Service).
					k := ServiceRef{ref.Kind, p.Namespace, ref.Name}
					byService[k] = append(byService[k], p)
					continue
				default:
					continue
				}
				break
			}
		}
	}
	sort.Slice(attached, func(i, j int) bool { return attached[i].order < attached[j].order })
	cw.l7.sets = [3]*policySet{buildSet(dedupPolicies(attached), layerL7)}
	if len(byService) > 0 {
		cw.services = map[ServiceRef]*policySet{}
		for k, ps := range byService {
			sort.Slice(ps, func(i, j int) bool { return ps[i].order < ps[j].order })
			cw.services[k] = buildSet(dedupPolicies(ps), layerL7)
		}
	}
}

func dedupPolicies(ps []*Policy) []*Policy {
	var out []*Policy
	for i, p := range ps {
		if i == 0 || ps[i-1] != p {
			out = append(out, p)
		}
	}
	return out
}

// Workload returns the compiled workload namespace/name, or nil.
func (s *Snapshot) Workload(namespace, name string) *CompiledWorkload {
	return s.workloads[WorkloadKey{namespace, name}]
}

// WorkloadByIP returns the compiled workload that owns ip, or nil. It does not allocate.
func (s *Snapshot) WorkloadByIP(ip netip.Addr) *CompiledWorkload {
	return s.byIP[ip.Unmap()]
}

// EvaluateL4 decides an inbound connection to the workload that owns c.DstIP (see
// CompiledWorkload.EvaluateL4). An unknown destination is denied (ReasonUnknownWorkload). It
// takes no lock and does not allocate.
func (s *Snapshot) EvaluateL4(c *Conn) Decision {
	w := s.byIP[c.DstIP.Unmap()]
	if w == nil {
		return Decision{Reason: ReasonUnknownWorkload}
	}
	return w.EvaluateL4(c)
}

// Objects returns the snapshot's objects sorted by namespace, name, kind. Do not modify.
func (s *Snapshot) Objects() []*Object { return s.objects }

// Policies returns the compiled AuthorizationPolicies by namespace then name. Do not modify.
func (s *Snapshot) Policies() []*Policy { return s.policies }

// Options returns the options the snapshot was compiled with.
func (s *Snapshot) Options() Options { return s.opts }

func sortStrings(s []string) { sort.Strings(s) }
