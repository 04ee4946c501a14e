package policy

import (
	"net/netip"
	"regexp"
	"strconv"
	"strings"

	securityv1beta1 "istio.io/api/security/v1beta1"
)

// Action is an AuthorizationPolicy action.
type Action = securityv1beta1.AuthorizationPolicy_Action

// The AuthorizationPolicy actions.
const (
	ActionAllow  = securityv1beta1.AuthorizationPolicy_ALLOW
	ActionDeny   = securityv1beta1.AuthorizationPolicy_DENY
	ActionAudit  = securityv1beta1.AuthorizationPolicy_AUDIT
	ActionCustom = securityv1beta1.AuthorizationPolicy_CUSTOM
)

const spiffePrefix = "spiffe://"

// Peer is the authenticated identity of the client, from its certificate's URI SAN. The zero
// Peer means no identity: plaintext, non-mesh traffic.
type Peer struct {
	// URI is the full SAN, spiffe://<td>/ns/<ns>/sa/<sa>.
	URI string
	// TrustDomain, Namespace and ServiceAccount are parsed from URI; all empty when URI is not an
	// Istio identity (exactly five segments, §4).
	TrustDomain, Namespace, ServiceAccount string
}

// ParsePeer parses a SPIFFE ID. It never fails: an ID that is not of Istio's form keeps only
// URI. It does not allocate.
func ParsePeer(uri string) Peer {
	p := Peer{URI: uri}
	rest, ok := strings.CutPrefix(uri, spiffePrefix)
	if !ok {
		return p
	}
	td, rest, ok1 := strings.Cut(rest, "/")
	k1, rest, ok2 := strings.Cut(rest, "/")
	ns, rest, ok3 := strings.Cut(rest, "/")
	k2, sa, ok4 := strings.Cut(rest, "/")
	if !ok1 || !ok2 || !ok3 || !ok4 || k1 != "ns" || k2 != "sa" || td == "" || ns == "" || sa == "" || strings.Contains(sa, "/") {
		return p
	}
	p.TrustDomain, p.Namespace, p.ServiceAccount = td, ns, sa
	return p
}

// principal returns the identity as AuthorizationPolicy spells it, without spiffe://. As in
// ztunnel, an identity that does not start with spiffe:// is no identity.
func (p *Peer) principal() (string, bool) {
	s, ok := strings.CutPrefix(p.URI, spiffePrefix)
	return s, ok && s != ""
}

func (p *Peer) uriTrustDomain() string {
	s, ok := strings.CutPrefix(p.URI, spiffePrefix)
	if !ok {
		return ""
	}
	td, _, _ := strings.Cut(s, "/")
	return td
}

// Conn is an inbound L4 connection as the destination's agent sees it.
type Conn struct {
	Peer  Peer       // zero for plaintext
	SrcIP netip.Addr // the peer's address
	DstIP netip.Addr // the destination workload's address
	// DstPort is the target (container) port, not 15008.
	DstPort uint16
}

// Request is an HTTP request on a connection. Fields left zero are missing attributes.
type Request struct {
	Conn
	// RemoteIP is the original client from X-Forwarded-For/PROXY; zero means SrcIP.
	RemoteIP netip.Addr
	SNI      string
	Host     string // :authority
	Method   string
	Path     string // may include a query, which is ignored
	// Headers has lower-case names.
	Headers map[string][]string
	// JWT is the verified token, nil when the request carried none.
	JWT *JWT
	// Service is the Service or ServiceEntry a waypoint is serving; it decides which targetRefs
	// policies apply. Zero for non-waypoint enforcement.
	Service ServiceRef

	tcp tcpMode // see EvaluateTCP
}

// ServiceRef names a Service (Kind "Service") or ServiceEntry (Kind "ServiceEntry").
type ServiceRef struct{ Kind, Namespace, Name string }

// JWT is a verified JSON Web Token.
type JWT struct {
	Issuer, Subject string
	// Claims is the decoded payload (aud, azp, scope, nested objects...).
	Claims map[string]any
	// SpaceDelimited lists the top-level claims that the RequestAuthentication rule which
	// verified the token names in spaceDelimitedClaims: like scope and permission, their
	// string values are split on spaces before matching (ISTIO-SEMANTICS §2.6).
	SpaceDelimited []string
}

// splits reports whether claim path key is space-delimited for this token.
func (j *JWT) splits(key []string, always bool) bool {
	if always {
		return true
	}
	if len(key) != 1 {
		return false
	}
	for _, c := range j.SpaceDelimited {
		if c == key[0] {
			return true
		}
	}
	return false
}

func (r *Request) header(name string) ([]string, bool) {
	switch name {
	case ":method":
		return []string{r.Method}, r.Method != ""
	case ":path":
		return []string{r.Path}, r.Path != ""
	case ":authority", "host":
		if r.Host != "" {
			return []string{r.Host}, true
		}
	}
	if v, ok := r.Headers[name]; ok {
		return v, true
	}
	for k, v := range r.Headers {
		if strings.EqualFold(k, name) {
			return v, true
		}
	}
	return nil, false
}

// Policy is a compiled AuthorizationPolicy, or a DENY policy derived from PeerAuthentication.
// It is immutable; a Decision points at it.
type Policy struct {
	Namespace, Name string
	Action          Action
	// Provider is the CUSTOM action's provider name.
	Provider string
	// DryRun is the istio.io/dry-run annotation: evaluated and reported, never enforced.
	DryRun bool
	// Origin is the object it was compiled from (a PeerAuthentication for derived policies; zero
	// for the static strict policy).
	Origin Key
	Object *Object
	// Notes say what compilation changed, such as HTTP rules dropped for L4 enforcement.
	Notes []string

	order     int32
	l4, l7    []rule
	l4Skipped bool // not enforced at L4 at all (CUSTOM, AUDIT, targetRefs)
	targeted  bool // has targetRef(s)
}

func (p *Policy) String() string { return p.Namespace + "/" + p.Name + " (" + p.Action.String() + ")" }

type match struct{ preds []pred }

// clause matches if it has no matches, or if any of its matches does; never is set when every
// match was emptied by L4 conversion (ztunnel skips empty matches, §2.8).
type clause struct {
	matches []match
	never   bool
}

// rule matches if all of its clauses do.
type rule struct{ clauses []clause }

func (m *match) eval(r *Request) bool {
	for i := range m.preds {
		if !m.preds[i].eval(r) {
			return false
		}
	}
	return true
}

func (c *clause) eval(r *Request) bool {
	if c.never {
		return false
	}
	if len(c.matches) == 0 {
		return true
	}
	for i := range c.matches {
		if c.matches[i].eval(r) {
			return true
		}
	}
	return false
}

func (ru *rule) eval(r *Request) bool {
	for i := range ru.clauses {
		if !ru.clauses[i].eval(r) {
			return false
		}
	}
	return true
}

func (ru *rule) canMatch() bool {
	for _, c := range ru.clauses {
		if c.never {
			return false
		}
	}
	return true
}

// layer selects the enforcement point whose semantics compilation follows.
type layer uint8

const (
	// layerL4 follows ztunnel (istiod's conversion plus rbac.rs).
	layerL4 layer = iota
	// layerL7 follows Envoy's RBAC filter on an HTTP chain (sidecar or waypoint).
	layerL7
)

// compiler turns AuthorizationPolicies into rules.
type compiler struct {
	opts    Options
	domains []string // trust domain then aliases, for Envoy principal expansion
}

func newCompiler(opts Options) *compiler {
	c := &compiler{opts: opts}
	c.domains = append([]string{opts.trustDomain()}, opts.TrustDomainAliases...)
	return c
}

// compilePolicy compiles a valid AuthorizationPolicy for both layers.
func (c *compiler) compilePolicy(o *Object) *Policy {
	ap := o.AuthorizationPolicy
	p := &Policy{Namespace: o.Namespace, Name: o.Name, Action: ap.Action, Provider: ap.GetProvider().GetName(),
		DryRun: dryRun(o), Origin: o.Key(), Object: o,
		targeted: ap.TargetRef != nil || len(ap.TargetRefs) > 0}
	switch {
	case p.targeted:
		p.l4Skipped = true
		p.Notes = append(p.Notes, "has targetRefs: enforced only by waypoints and gateways, never at L4")
	case ap.Action == ActionAudit || ap.Action == ActionCustom:
		p.l4Skipped = true
		p.Notes = append(p.Notes, "ztunnel does not support the "+ap.Action.String()+" action: not enforced at L4")
	}
	var dropped []string
	for _, r := range ap.Rules {
		if r == nil {
			continue
		}
		p.l7 = append(p.l7, c.rule(r, o.Namespace, layerL7, nil))
		if p.l4Skipped {
			continue
		}
		var l7fields []string
		l4 := c.rule(r, o.Namespace, layerL4, &l7fields)
		switch {
		case len(l7fields) > 0 && ap.Action == ActionAllow:
			// ztunnel: an ALLOW rule with any HTTP attribute is dropped (fail closed).
			dropped = append(dropped, l7fields...)
		case !l4.canMatch():
			// ztunnel: a DENY rule whose clause lost every match can never match.
			dropped = append(dropped, l7fields...)
		default:
			if len(l7fields) > 0 {
				p.Notes = append(p.Notes, "a DENY rule is enforced at L4 without its HTTP attributes ("+strings.Join(uniq(l7fields), ", ")+"): this is more restrictive than requested")
			}
			p.l4 = append(p.l4, l4)
		}
	}
	if len(dropped) > 0 {
		if ap.Action == ActionAllow {
			p.Notes = append(p.Notes, "ztunnel does not support HTTP attributes (found: "+strings.Join(uniq(dropped), ", ")+"): within this ALLOW policy, rules matching HTTP attributes are omitted at L4; this is more restrictive than requested (use a waypoint)")
		} else {
			p.Notes = append(p.Notes, "DENY rules that use only HTTP attributes ("+strings.Join(uniq(dropped), ", ")+") have no effect at L4 (ztunnel); a sidecar would deny all TCP traffic instead")
		}
	}
	return p
}

func uniq(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	sortStrings(out)
	return out
}

// rule compiles one Rule. At L4, HTTP-only fields are left out and their names appended to
// l7fields; an entry left with no field becomes an empty match, which ztunnel skips.
func (c *compiler) rule(r *securityv1beta1.Rule, policyNS string, l layer, l7fields *[]string) rule {
	var out rule
	if len(r.From) > 0 {
		var cl clause
		for _, f := range r.From {
			if f == nil || f.Source == nil {
				continue
			}
			if m := c.source(f.Source, policyNS, l, l7fields); len(m.preds) > 0 {
				cl.matches = append(cl.matches, m)
			}
		}
		cl.never = len(cl.matches) == 0
		out.clauses = append(out.clauses, cl)
	}
	if len(r.To) > 0 {
		var cl clause
		for _, t := range r.To {
			if t == nil || t.Operation == nil {
				continue
			}
			if m := c.operation(t.Operation, l, l7fields); len(m.preds) > 0 {
				cl.matches = append(cl.matches, m)
			}
		}
		cl.never = len(cl.matches) == 0
		out.clauses = append(out.clauses, cl)
	}
	for _, w := range r.When {
		if w == nil {
			continue
		}
		m := c.condition(w, policyNS, l, l7fields)
		out.clauses = append(out.clauses, clause{matches: nonEmpty(m), never: len(m.preds) == 0})
	}
	return out
}

func nonEmpty(m match) []match {
	if len(m.preds) == 0 {
		return nil
	}
	return []match{m}
}

func strMatches(vals []string, mk func(string) strMatch) []strMatch {
	out := make([]strMatch, 0, len(vals))
	for _, v := range vals {
		out = append(out, mk(v))
	}
	return out
}

func cidrs(vals []string) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(vals))
	for _, v := range vals {
		if p, err := parseIPBlock(v); err == nil {
			out = append(out, p)
		}
	}
	return out
}

func ports(vals []string) []uint16 {
	out := make([]uint16, 0, len(vals))
	for _, v := range vals {
		if p, ok := parsePort(v); ok {
			out = append(out, p)
		}
	}
	return out
}

// addStr appends a string pred for vals (no-op when vals is empty).
func addPred(m *match, p pred, n int) {
	if n > 0 {
		m.preds = append(m.preds, p)
	}
}

func (c *compiler) source(s *securityv1beta1.Source, policyNS string, l layer, l7fields *[]string) match {
	var m match
	principal := newStrMatch
	princ := func(vals []string) []strMatch {
		if l == layerL7 {
			vals = c.expandPrincipals(vals)
		}
		return strMatches(vals, principal)
	}
	addPred(&m, pred{attr: attrPrincipal, strs: princ(s.Principals)}, len(s.Principals))
	addPred(&m, pred{attr: attrPrincipal, not: true, strs: princ(s.NotPrincipals)}, len(s.NotPrincipals))
	if l == layerL7 {
		// Envoy: a regex over the URI SAN, every * a wildcard.
		addPred(&m, pred{attr: attrNamespaceE, res: namespaceRegexps(s.Namespaces)}, len(s.Namespaces))
		addPred(&m, pred{attr: attrNamespaceE, not: true, res: namespaceRegexps(s.NotNamespaces)}, len(s.NotNamespaces))
	} else {
		// ztunnel: exact/prefix/suffix/presence on the parsed namespace; a middle * is literal.
		addPred(&m, pred{attr: attrNamespace, strs: strMatches(s.Namespaces, newStrMatch)}, len(s.Namespaces))
		addPred(&m, pred{attr: attrNamespace, not: true, strs: strMatches(s.NotNamespaces, newStrMatch)}, len(s.NotNamespaces))
	}
	addPred(&m, pred{attr: c.saAttr(l), sas: saMatches(s.ServiceAccounts, policyNS, l)}, len(s.ServiceAccounts))
	addPred(&m, pred{attr: c.saAttr(l), not: true, sas: saMatches(s.NotServiceAccounts, policyNS, l)}, len(s.NotServiceAccounts))
	addPred(&m, pred{attr: attrSourceIP, cidrs: cidrs(s.IpBlocks)}, len(s.IpBlocks))
	addPred(&m, pred{attr: attrSourceIP, not: true, cidrs: cidrs(s.NotIpBlocks)}, len(s.NotIpBlocks))
	if l == layerL4 {
		// ztunnel: trustDomains are silently dropped; these count as HTTP attributes.
		for _, f := range []struct {
			name string
			n    int
		}{{"requestPrincipals", len(s.RequestPrincipals)}, {"notRequestPrincipals", len(s.NotRequestPrincipals)},
			{"remoteIpBlocks", len(s.RemoteIpBlocks)}, {"notRemoteIpBlocks", len(s.NotRemoteIpBlocks)}} {
			if f.n > 0 {
				*l7fields = append(*l7fields, f.name)
			}
		}
		return m
	}
	addPred(&m, pred{attr: attrRequestPrincipal, reqs: reqMatches(s.RequestPrincipals)}, len(s.RequestPrincipals))
	addPred(&m, pred{attr: attrRequestPrincipal, not: true, reqs: reqMatches(s.NotRequestPrincipals)}, len(s.NotRequestPrincipals))
	addPred(&m, pred{attr: attrRemoteIP, cidrs: cidrs(s.RemoteIpBlocks)}, len(s.RemoteIpBlocks))
	addPred(&m, pred{attr: attrRemoteIP, not: true, cidrs: cidrs(s.NotRemoteIpBlocks)}, len(s.NotRemoteIpBlocks))
	addPred(&m, pred{attr: attrTrustDomain, strs: c.trustDomainMatches(s.TrustDomains)}, len(s.TrustDomains))
	addPred(&m, pred{attr: attrTrustDomain, not: true, strs: c.trustDomainMatches(s.NotTrustDomains)}, len(s.NotTrustDomains))
	return m
}

func (c *compiler) saAttr(l layer) attr {
	if l == layerL4 {
		return attrServiceAccountZ
	}
	return attrServiceAccountE
}

// saMatches compiles serviceAccounts values "ns/sa", or "sa" in the policy's namespace.
func saMatches(vals []string, policyNS string, l layer) []saMatch {
	out := make([]saMatch, 0, len(vals))
	for _, v := range vals {
		ns, sa, ok := strings.Cut(v, "/")
		if !ok {
			ns, sa = policyNS, v
		}
		m := saMatch{ns: ns, sa: sa}
		if l == layerL7 {
			// Envoy: trust-domain agnostic, tolerates extra key/value segments (§2.6).
			m.re = regexp.MustCompile(`^spiffe://.+/ns/` + regexp.QuoteMeta(ns) + `/(.+/|)sa/` + regexp.QuoteMeta(sa) + `(/.+)?$`)
		}
		out = append(out, m)
	}
	return out
}

func reqMatches(vals []string) []reqPrincipalMatch {
	out := make([]reqPrincipalMatch, 0, len(vals))
	for _, v := range vals {
		out = append(out, newReqPrincipalMatch(v))
	}
	return out
}

// trustDomainMatches: values equal to a known trust domain expand to the whole set (§2.11).
func (c *compiler) trustDomainMatches(vals []string) []strMatch {
	var out []strMatch
	for _, v := range vals {
		if v == "cluster.local" || containsString(c.domains, v) {
			for _, d := range c.domains {
				out = append(out, strMatch{kind: strExact, s: d})
			}
			continue
		}
		out = append(out, newStrMatch(v))
	}
	return out
}

func containsString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// expandPrincipals applies Envoy's trust-domain alias expansion (§2.11).
func (c *compiler) expandPrincipals(vals []string) []string {
	if len(c.domains) == 1 && c.domains[0] == DefaultTrustDomain {
		return vals
	}
	var out []string
	seen := map[string]bool{}
	add := func(s string) {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	for _, v := range vals {
		parts := strings.Split(v, "/")
		if len(parts) != 5 || parts[0] == "*" || parts[1] != "ns" || parts[3] != "sa" {
			add(v)
			continue
		}
		x, rest := parts[0], v[len(parts[0]):]
		known := x == DefaultTrustDomain
		for _, d := range c.domains {
			if tdMatch(x, d) || tdMatch(d, x) {
				known = true
			}
		}
		if !known {
			add(v) // kept unchanged (Istio warns)
			continue
		}
		wild := strings.Contains(x, "*")
		for _, d := range c.domains {
			if wild && tdMatch(x, d) {
				add(v)
			} else {
				add(d + rest)
			}
		}
	}
	return out
}

// tdMatch matches a trust domain against a pattern with a leading or trailing *.
func tdMatch(pattern, td string) bool {
	m := newStrMatch(pattern)
	if m.kind == strPresence {
		return true
	}
	return m.match(td)
}

func (c *compiler) operation(o *securityv1beta1.Operation, l layer, l7fields *[]string) match {
	var m match
	addPred(&m, pred{attr: attrDestPort, ports: ports(o.Ports)}, len(o.Ports))
	addPred(&m, pred{attr: attrDestPort, not: true, ports: ports(o.NotPorts)}, len(o.NotPorts))
	if l == layerL4 {
		for _, f := range []struct {
			name string
			n    int
		}{{"hosts", len(o.Hosts)}, {"notHosts", len(o.NotHosts)}, {"methods", len(o.Methods)},
			{"notMethods", len(o.NotMethods)}, {"paths", len(o.Paths)}, {"notPaths", len(o.NotPaths)}} {
			if f.n > 0 {
				*l7fields = append(*l7fields, f.name)
			}
		}
		return m
	}
	host := func(v string) strMatch { s := newStrMatch(v); s.fold = true; return s }
	addPred(&m, pred{attr: attrHost, strs: strMatches(o.Hosts, host)}, len(o.Hosts))
	addPred(&m, pred{attr: attrHost, not: true, strs: strMatches(o.NotHosts, host)}, len(o.NotHosts))
	addPred(&m, pred{attr: attrMethod, strs: strMatches(o.Methods, newStrMatch)}, len(o.Methods))
	addPred(&m, pred{attr: attrMethod, not: true, strs: strMatches(o.NotMethods, newStrMatch)}, len(o.NotMethods))
	addPred(&m, pred{attr: attrPath, paths: pathMatches(o.Paths)}, len(o.Paths))
	addPred(&m, pred{attr: attrPath, not: true, paths: pathMatches(o.NotPaths)}, len(o.NotPaths))
	return m
}

func pathMatches(vals []string) []pathMatch {
	out := make([]pathMatch, 0, len(vals))
	for _, v := range vals {
		out = append(out, newPathMatch(v))
	}
	return out
}

// l4ConditionKeys are the only when keys ztunnel enforces (§2.7).
var l4ConditionKeys = map[string]bool{
	"source.ip": true, "source.namespace": true, "source.principal": true,
	"destination.ip": true, "destination.port": true,
}

// condition compiles a when entry into one match: values (any) and notValues (none).
func (c *compiler) condition(w *securityv1beta1.Condition, policyNS string, l layer, l7fields *[]string) match {
	var m match
	if l == layerL4 && !l4ConditionKeys[w.Key] {
		*l7fields = append(*l7fields, w.Key)
		return m
	}
	for i, vals := range [][]string{w.Values, w.NotValues} {
		if len(vals) == 0 {
			continue
		}
		p := pred{not: i == 1}
		switch key := w.Key; {
		case key == "source.ip":
			p.attr, p.cidrs = attrSourceIP, cidrs(vals)
		case key == "remote.ip":
			p.attr, p.cidrs = attrRemoteIP, cidrs(vals)
		case key == "destination.ip":
			p.attr, p.cidrs = attrDestIP, cidrs(vals)
		case key == "destination.port":
			p.attr, p.ports = attrDestPort, ports(vals)
		case key == "source.principal":
			if l == layerL7 {
				vals = c.expandPrincipals(vals)
			}
			p.attr, p.strs = attrPrincipal, strMatches(vals, newStrMatch)
		case key == "source.namespace":
			if l == layerL7 {
				p.attr, p.res = attrNamespaceE, namespaceRegexps(vals)
			} else {
				p.attr, p.strs = attrNamespace, strMatches(vals, newStrMatch)
			}
		case key == "source.serviceAccount":
			p.attr, p.sas = attrServiceAccountE, saMatches(vals, policyNS, layerL7)
		case key == "source.trustDomain":
			p.attr, p.strs = attrTrustDomain, c.trustDomainMatches(vals)
		case key == "request.auth.principal":
			p.attr, p.reqs = attrRequestPrincipal, reqMatches(vals)
		case key == "request.auth.audiences":
			p.attr, p.strs = attrAudience, strMatches(vals, newStrMatch)
		case key == "request.auth.presenter":
			p.attr, p.strs = attrPresenter, strMatches(vals, newStrMatch)
		case key == "connection.sni":
			p.attr, p.strs = attrSNI, strMatches(vals, newStrMatch)
		case strings.HasPrefix(key, headerKeyPrefix):
			args, _ := bracketArgs(key, headerKeyPrefix)
			p.attr, p.strs, p.key = attrHeader, strMatches(vals, newStrMatch), []string{strings.ToLower(first(args))}
		case strings.HasPrefix(key, claimKeyPrefix):
			args, _ := bracketArgs(key, claimKeyPrefix)
			p.attr, p.strs, p.key = attrClaim, strMatches(vals, newStrMatch), args
			p.split = len(args) == 1 && (args[0] == "scope" || args[0] == "permission")
		default:
			// experimental.envoy.filters.*: Envoy dynamic metadata veil never has.
			p.attr = attrUnavailable
		}
		m.preds = append(m.preds, p)
	}
	return m
}

func first(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

// ruleOnlyHTTP reports whether a rule uses only HTTP attributes, for the DENY warning.
func ruleOnlyHTTP(r *securityv1beta1.Rule) bool {
	c := newCompiler(Options{})
	var l7 []string
	l4 := c.rule(r, "", layerL4, &l7)
	for _, cl := range l4.clauses {
		if !cl.never {
			return false
		}
	}
	return len(l7) > 0
}

// dryRun reads the istio.io/dry-run annotation as Istio does (strconv.ParseBool);
// Validate rejects a value that does not parse.
func dryRun(o *Object) bool {
	b, _ := strconv.ParseBool(o.Annotations[dryRunAnnotation])
	return b
}

const dryRunAnnotation = "istio.io/dry-run"
