package policy

import (
	"errors"
	"net/netip"
	"regexp"
	"strings"
)

// strKind is how a policy value matches a string (ISTIO-SEMANTICS §2.6).
type strKind uint8

const (
	strExact    strKind = iota
	strPrefix           // "foo*"
	strSuffix           // "*foo"
	strPresence         // "*": any non-empty value
)

// strMatch matches one string attribute. fold makes it case-insensitive (hosts).
type strMatch struct {
	kind strKind
	fold bool
	s    string
}

// newStrMatch compiles an Istio string value: only a leading or trailing * is special.
func newStrMatch(v string) strMatch {
	switch {
	case v == "*":
		return strMatch{kind: strPresence}
	case strings.HasPrefix(v, "*"):
		return strMatch{kind: strSuffix, s: v[1:]}
	case strings.HasSuffix(v, "*"):
		return strMatch{kind: strPrefix, s: v[:len(v)-1]}
	}
	return strMatch{kind: strExact, s: v}
}

// namespaceRegexps compiles namespace values as Envoy does (ISTIO-SEMANTICS §2.6): the
// regex .*/ns/<v>/.* over the peer's URI SAN, each * in v a .*, everything else literal.
// A wildcard may so span path segments, and a non-Istio URI can match too. [Envoy]
func namespaceRegexps(vals []string) []*regexp.Regexp {
	out := make([]*regexp.Regexp, 0, len(vals))
	for _, v := range vals {
		parts := strings.Split(v, "*")
		for i := range parts {
			parts[i] = regexp.QuoteMeta(parts[i])
		}
		out = append(out, regexp.MustCompile("^.*/ns/"+strings.Join(parts, ".*")+"/.*$"))
	}
	return out
}

func (m *strMatch) match(v string) bool {
	switch m.kind {
	case strPresence:
		return v != ""
	case strExact:
		if m.fold {
			return strings.EqualFold(v, m.s)
		}
		return v == m.s
	case strPrefix:
		if m.fold {
			return len(v) >= len(m.s) && strings.EqualFold(v[:len(m.s)], m.s)
		}
		return strings.HasPrefix(v, m.s)
	case strSuffix:
		if m.fold {
			return len(v) >= len(m.s) && strings.EqualFold(v[len(v)-len(m.s):], m.s)
		}
		return strings.HasSuffix(v, m.s)
	}
	return false
}

// attr names a connection or request attribute.
type attr uint8

const (
	attrPrincipal        attr = iota + 1 // peer identity without spiffe://
	attrNamespace                        // ztunnel: peer namespace from the identity
	attrNamespaceE                       // Envoy: regex .*/ns/<v>/.* over the URI SAN
	attrServiceAccountZ                  // ztunnel: exact namespace + service account
	attrServiceAccountE                  // Envoy: regex over the URI SAN
	attrTrustDomain                      // peer trust domain (Envoy only)
	attrSourceIP                         // direct peer address
	attrRemoteIP                         // XFF/PROXY client address (HTTP)
	attrDestIP                           // local address
	attrDestPort                         // target port
	attrRequestPrincipal                 // JWT iss/sub
	attrHost                             // :authority
	attrMethod                           // :method
	attrPath                             // path without query
	attrHeader                           // request.headers[name]
	attrClaim                            // request.auth.claims[a][b]
	attrAudience                         // aud claim
	attrPresenter                        // azp claim
	attrSNI                              // connection.sni
	attrUnavailable                      // experimental.envoy.filters.*: never present in veil
)

// httpOnly reports whether an attribute exists only in an HTTP request (Envoy on a TCP
// chain has none of them).
func (a attr) httpOnly() bool {
	switch a {
	case attrRequestPrincipal, attrHost, attrMethod, attrPath, attrHeader, attrClaim, attrAudience, attrPresenter:
		return true
	}
	return false
}

// tcpMode marks a Request decided with Envoy's TCP semantics, and which rules are being
// matched.
type tcpMode uint8

const (
	tcpNone     tcpMode = iota
	tcpDenying          // matching DENY rules: HTTP fields are dropped (they match)
	tcpAllowing         // matching ALLOW rules: a rule with an HTTP field never matches
)

// pred is one field of a Source, Operation or Condition: "any value matches", or with not set,
// "no value matches". A missing attribute fails a positive pred and satisfies a negated one.
type pred struct {
	attr  attr
	not   bool
	strs  []strMatch
	cidrs []netip.Prefix
	ports []uint16
	sas   []saMatch
	res   []*regexp.Regexp // attrNamespaceE
	reqs  []reqPrincipalMatch
	paths []pathMatch
	key   []string // header name (lower case) or claim path
	split bool     // claim values are space-delimited (scope, permission)
}

type saMatch struct {
	ns, sa string
	re     *regexp.Regexp // Envoy form
}

// reqPrincipalMatch matches iss and sub separately (ISTIO-SEMANTICS §2.6 requestPrincipals).
type reqPrincipalMatch struct {
	whole    strMatch // used when the value has no '/' and no wildcard
	iss, sub strMatch
	split    bool
}

type pathMatch struct {
	str      strMatch
	template []string // "{*}", "{**}" or literal segments; nil if not a template
}

func (p *pred) eval(r *Request) bool {
	if r.tcp != tcpNone && p.attr.httpOnly() {
		// Envoy's RBAC on a TCP chain: a DENY rule is enforced without its HTTP fields,
		// an ALLOW rule with any is never met (istiod's TCP translation).
		return r.tcp == tcpDenying
	}
	m := p.anyMatch(r)
	if p.not {
		return !m
	}
	return m
}

// anyMatch reports whether the attribute is present and any value matches it.
func (p *pred) anyMatch(r *Request) bool {
	switch p.attr {
	case attrPrincipal:
		pr, ok := r.Peer.principal()
		return ok && matchAnyStr(p.strs, pr)
	case attrNamespace:
		return r.Peer.Namespace != "" && matchAnyStr(p.strs, r.Peer.Namespace)
	case attrNamespaceE:
		if r.Peer.URI == "" {
			return false
		}
		for _, re := range p.res {
			if re.MatchString(r.Peer.URI) {
				return true
			}
		}
		return false
	case attrTrustDomain:
		td := r.Peer.uriTrustDomain()
		return td != "" && matchAnyStr(p.strs, td)
	case attrServiceAccountZ:
		if r.Peer.ServiceAccount == "" {
			return false
		}
		for i := range p.sas {
			if p.sas[i].ns == r.Peer.Namespace && p.sas[i].sa == r.Peer.ServiceAccount {
				return true
			}
		}
		return false
	case attrServiceAccountE:
		if r.Peer.URI == "" {
			return false
		}
		for i := range p.sas {
			if p.sas[i].re.MatchString(r.Peer.URI) {
				return true
			}
		}
		return false
	case attrSourceIP:
		return matchAnyCIDR(p.cidrs, r.SrcIP)
	case attrRemoteIP:
		ip := r.RemoteIP
		if !ip.IsValid() {
			ip = r.SrcIP
		}
		return matchAnyCIDR(p.cidrs, ip)
	case attrDestIP:
		return matchAnyCIDR(p.cidrs, r.DstIP)
	case attrDestPort:
		for _, port := range p.ports {
			if port == r.DstPort {
				return true
			}
		}
		return false
	case attrRequestPrincipal:
		if r.JWT == nil {
			return false
		}
		for i := range p.reqs {
			if p.reqs[i].match(r.JWT.Issuer, r.JWT.Subject) {
				return true
			}
		}
		return false
	case attrHost:
		return r.Host != "" && matchAnyStr(p.strs, r.Host)
	case attrMethod:
		return r.Method != "" && matchAnyStr(p.strs, r.Method)
	case attrPath:
		if r.Path == "" {
			return false
		}
		path := r.Path
		if i := strings.IndexByte(path, '?'); i >= 0 {
			path = path[:i]
		}
		for i := range p.paths {
			if p.paths[i].match(path) {
				return true
			}
		}
		return false
	case attrHeader:
		vals, ok := r.header(p.key[0])
		if !ok {
			return false
		}
		for _, s := range p.strs {
			if s.kind == strPresence {
				return true // "*" means the header is present
			}
		}
		for _, v := range vals {
			if matchAnyStr(p.strs, v) {
				return true
			}
		}
		return false
	case attrClaim:
		if r.JWT == nil {
			return false
		}
		return matchClaim(p.strs, lookupClaim(r.JWT.Claims, p.key), r.JWT.splits(p.key, p.split))
	case attrAudience:
		return r.JWT != nil && matchClaim(p.strs, r.JWT.Claims["aud"], false)
	case attrPresenter:
		return r.JWT != nil && matchClaim(p.strs, r.JWT.Claims["azp"], false)
	case attrSNI:
		return r.SNI != "" && matchAnyStr(p.strs, r.SNI)
	}
	return false
}

func matchAnyStr(ms []strMatch, v string) bool {
	for i := range ms {
		if ms[i].match(v) {
			return true
		}
	}
	return false
}

func matchAnyCIDR(cidrs []netip.Prefix, ip netip.Addr) bool {
	if !ip.IsValid() {
		return false
	}
	// An IPv4-mapped address is the IPv4 address it maps (a dual-stack socket reports
	// IPv4 clients so), and a zone only says which link a link-local address is on:
	// Prefix.Contains would match neither.
	ip = ip.Unmap().WithZone("")
	for _, c := range cidrs {
		if c.Contains(ip) {
			return true
		}
	}
	return false
}

func newReqPrincipalMatch(v string) reqPrincipalMatch {
	if v == "*" {
		return reqPrincipalMatch{split: true, iss: strMatch{kind: strPresence}, sub: strMatch{kind: strPresence}}
	}
	if i := strings.LastIndexByte(v, '/'); i >= 0 {
		return reqPrincipalMatch{split: true, iss: newStrMatch(v[:i]), sub: newStrMatch(v[i+1:])}
	}
	switch {
	case strings.HasSuffix(v, "*"): // iss prefix, any sub
		return reqPrincipalMatch{split: true, iss: strMatch{kind: strPrefix, s: v[:len(v)-1]}, sub: strMatch{kind: strPresence}}
	case strings.HasPrefix(v, "*"): // any iss, sub suffix
		return reqPrincipalMatch{split: true, iss: strMatch{kind: strPresence}, sub: strMatch{kind: strSuffix, s: v[1:]}}
	}
	return reqPrincipalMatch{whole: strMatch{kind: strExact, s: v}}
}

func (m *reqPrincipalMatch) match(iss, sub string) bool {
	if !m.split {
		// An exact value without '/' can only equal "iss/sub" if it contains one: never.
		return false
	}
	if sub == "" {
		return false // a JWT without sub never matches a request principal
	}
	if m.iss.kind == strPresence && m.iss.s == "" && iss == "" {
		return false
	}
	return m.iss.match(iss) && m.sub.match(sub)
}

func newPathMatch(v string) pathMatch {
	if strings.Contains(v, "{") {
		return pathMatch{template: strings.Split(v[1:], "/")}
	}
	return pathMatch{str: newStrMatch(v)}
}

func (m *pathMatch) match(path string) bool {
	if m.template == nil {
		return m.str.match(path)
	}
	if !strings.HasPrefix(path, "/") {
		return false
	}
	rest := path[1:]
	for i, seg := range m.template {
		if seg == "{**}" {
			return true // any remainder, including none
		}
		var cur string
		j := strings.IndexByte(rest, '/')
		if j < 0 {
			cur, rest = rest, ""
			if i != len(m.template)-1 {
				// more template segments than path segments
				return m.template[i+1] == "{**}" && (seg == "{*}" && cur != "" || seg == cur) && i+2 == len(m.template)
			}
		} else {
			cur, rest = rest[:j], rest[j+1:]
			if i == len(m.template)-1 {
				return false
			}
		}
		if seg == "{*}" {
			if cur == "" {
				return false
			}
		} else if seg != cur {
			return false
		}
	}
	return true
}

func lookupClaim(claims map[string]any, path []string) any {
	var cur any = claims
	for _, k := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur, ok = m[k]
		if !ok {
			return nil
		}
	}
	return cur
}

// matchClaim: a string claim matching any value, or a list with any string element matching.
// Non-string scalars never match. With split, string values are split on spaces first.
func matchClaim(ms []strMatch, v any, split bool) bool {
	switch c := v.(type) {
	case string:
		if split {
			for _, f := range strings.Fields(c) {
				if matchAnyStr(ms, f) {
					return true
				}
			}
			return false
		}
		return matchAnyStr(ms, c)
	case []any:
		for _, e := range c {
			if s, ok := e.(string); ok && matchClaim(ms, s, split) {
				return true
			}
		}
	case []string:
		for _, s := range c {
			if matchClaim(ms, s, split) {
				return true
			}
		}
	}
	return false
}

// parseIPBlock parses a single IP (as /32 or /128) or a CIDR.
func parseIPBlock(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		// An IPv4-mapped prefix covers IPv4 addresses only from /96 on: there it becomes
		// the IPv4 prefix 96 bits shorter. A shorter one stays IPv6 (and so matches no
		// IPv4 client), never a wider IPv4 range.
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96).Masked(), nil
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

var errNoAddr = errors.New("empty address")

func parseAddr(s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, errNoAddr
	}
	a, err := netip.ParseAddr(s)
	return a.Unmap(), err
}

func containsAddr(as []netip.Addr, a netip.Addr) bool {
	for _, x := range as {
		if x == a {
			return true
		}
	}
	return false
}
