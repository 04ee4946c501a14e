package policy

import (
	"encoding/json"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

// Limits from the CRD schemas (ISTIO-SEMANTICS §2.1, §2.2, §3.1).
const (
	maxRules           = 512
	maxFrom            = 512
	maxTargetRefs      = 16
	maxServiceAccounts = 16
	maxServiceAccount  = 320
	maxJWTRules        = 4096
	maxJWKSURI         = 2048
)

// Validate checks o as Istio's admission webhook and CRD rules do (ISTIO-SEMANTICS §0, §1.2,
// §2.2, §3.1). It returns warnings for input that is accepted but probably not what was meant,
// and an error joining one *ObjectError per problem; the object must be rejected if err != nil.
// Validate only reads o and is safe for concurrent use.
func Validate(o *Object, opts Options) (warnings []string, err error) {
	v := &validator{o: o, root: opts.rootNamespace()}
	switch o.Kind {
	case KindPeerAuthentication:
		if o.PeerAuthentication != nil {
			v.peerAuthentication(o.PeerAuthentication)
		}
	case KindAuthorizationPolicy:
		if o.AuthorizationPolicy != nil {
			v.authorizationPolicy(o.AuthorizationPolicy)
		}
	case KindRequestAuthentication:
		if o.RequestAuthentication != nil {
			v.requestAuthentication(o.RequestAuthentication)
		}
	default:
		v.errorf("kind", "unknown kind %d", o.Kind)
	}
	if o.Name == "" {
		v.errorf("metadata.name", "required")
	}
	return v.warnings, joinErrors(v.errs)
}

type validator struct {
	o        *Object
	root     string
	errs     []error
	warnings []string
}

func (v *validator) errorf(path, format string, args ...any) {
	v.errs = append(v.errs, &ObjectError{Source: v.o.Source, Kind: v.o.Kind, Namespace: v.o.Namespace, Name: v.o.Name,
		Path: path, Err: &kindError{ErrInvalid, fmt.Sprintf(format, args...)}})
}

func (v *validator) warnf(path, format string, args ...any) {
	e := &ObjectError{Source: v.o.Source, Kind: v.o.Kind, Namespace: v.o.Namespace, Name: v.o.Name,
		Path: path, Err: fmt.Errorf(format, args...)}
	v.warnings = append(v.warnings, e.Error())
}

func (v *validator) selector(sel *typev1beta1.WorkloadSelector, path string) {
	if sel == nil {
		return
	}
	if len(sel.MatchLabels) == 0 {
		v.warnf(path+".matchLabels", "empty selector matches every workload in scope")
	}
	for _, k := range sortedKeys(sel.MatchLabels) {
		val := sel.MatchLabels[k]
		switch {
		case k == "":
			v.errorf(path+".matchLabels", "empty key is not supported in selector")
		case strings.Contains(k, "*") || strings.Contains(val, "*"):
			v.errorf(path+".matchLabels["+k+"]", "wildcard is not supported in selector")
		}
	}
}

// targeting checks selector, targetRef and targetRefs (ISTIO-SEMANTICS §0).
func (v *validator) targeting(sel *typev1beta1.WorkloadSelector, ref *typev1beta1.PolicyTargetReference, refs []*typev1beta1.PolicyTargetReference) {
	n := 0
	if sel != nil {
		n++
	}
	if ref != nil {
		n++
	}
	if len(refs) > 0 {
		n++
	}
	if n > 1 {
		v.errorf("spec", "only one of selector, targetRef or targetRefs may be set")
	}
	v.selector(sel, "spec.selector")
	if len(refs) > maxTargetRefs {
		v.errorf("spec.targetRefs", "at most %d entries are allowed, got %d", maxTargetRefs, len(refs))
	}
	if ref != nil {
		v.targetRef(ref, "spec.targetRef")
	}
	for i, r := range refs {
		v.targetRef(r, fmt.Sprintf("spec.targetRefs[%d]", i))
	}
}

func (v *validator) targetRef(r *typev1beta1.PolicyTargetReference, path string) {
	if r == nil {
		v.errorf(path, "must not be null")
		return
	}
	if r.Name == "" {
		v.errorf(path+".name", "required")
	}
	if r.Namespace != "" {
		v.errorf(path+".namespace", "cross-namespace references are not supported; leave namespace empty")
	}
	switch {
	case r.Group == "gateway.networking.k8s.io" && r.Kind == "Gateway":
	case r.Group == "gateway.networking.k8s.io" && r.Kind == "GatewayClass":
		if v.o.Namespace != v.root {
			v.errorf(path, "a GatewayClass reference is only allowed in the root namespace %q", v.root)
		}
	case (r.Group == "" || r.Group == "core") && r.Kind == "Service":
	case r.Group == "networking.istio.io" && r.Kind == "ServiceEntry":
	default:
		v.errorf(path, "group %q kind %q is not supported; use gateway.networking.k8s.io/Gateway, gateway.networking.k8s.io/GatewayClass, core/Service or networking.istio.io/ServiceEntry", r.Group, r.Kind)
	}
}

func (v *validator) peerAuthentication(pa *securityv1beta1.PeerAuthentication) {
	v.selector(pa.Selector, "spec.selector")
	if pa.PortLevelMtls != nil {
		if pa.Selector == nil || len(pa.Selector.MatchLabels) == 0 {
			v.errorf("spec.portLevelMtls", "mesh/namespace peer authentication cannot have port level mTLS (portLevelMtls requires selector)")
		}
		for _, p := range sortedPorts(pa.PortLevelMtls) {
			if p == 0 || p > 65535 {
				v.errorf(fmt.Sprintf("spec.portLevelMtls[%d]", p), "port must be in 1..65535")
			}
		}
	}
}

func (v *validator) authorizationPolicy(ap *securityv1beta1.AuthorizationPolicy) {
	v.targeting(ap.Selector, ap.TargetRef, ap.TargetRefs)
	action := ap.Action
	// istio.io/dry-run is read with strconv.ParseBool, and only ALLOW and DENY can be
	// dry-run (as Istio's webhook checks).
	if val, ok := v.o.Annotations[dryRunAnnotation]; ok {
		if _, err := strconv.ParseBool(val); err != nil {
			v.errorf("metadata.annotations["+dryRunAnnotation+"]", "%q is not a boolean", val)
		} else if action != securityv1beta1.AuthorizationPolicy_ALLOW && action != securityv1beta1.AuthorizationPolicy_DENY {
			v.errorf("metadata.annotations["+dryRunAnnotation+"]", "dry-run applies only to ALLOW and DENY policies, not %s", action)
		}
	}
	switch action {
	case securityv1beta1.AuthorizationPolicy_DENY:
		if len(ap.Rules) == 0 {
			v.errorf("spec.rules", "a DENY policy must have rules; add rules: [{}] to deny everything")
		}
	case securityv1beta1.AuthorizationPolicy_CUSTOM:
		if len(ap.Rules) == 0 {
			v.errorf("spec.rules", "a CUSTOM policy must have rules")
		}
		if ap.GetProvider().GetName() == "" {
			v.errorf("spec.provider.name", "required with action CUSTOM")
		}
	}
	if ap.GetProvider() != nil && action != securityv1beta1.AuthorizationPolicy_CUSTOM {
		v.errorf("spec.provider", "only allowed with action CUSTOM")
	}
	if len(ap.Rules) > maxRules {
		v.errorf("spec.rules", "at most %d rules are allowed, got %d", maxRules, len(ap.Rules))
	}
	custom := action == securityv1beta1.AuthorizationPolicy_CUSTOM
	for i, r := range ap.Rules {
		p := fmt.Sprintf("spec.rules[%d]", i)
		if r == nil {
			v.errorf(p, "rule must not be null")
			continue
		}
		v.rule(r, p, custom)
		if action == securityv1beta1.AuthorizationPolicy_DENY && ruleOnlyHTTP(r) {
			v.warnf(p, "this DENY rule uses only HTTP attributes: a sidecar denies all TCP traffic in its scope, ztunnel (and veil at L4) ignores it")
		}
	}
}

func (v *validator) rule(r *securityv1beta1.Rule, path string, custom bool) {
	if len(r.From) > maxFrom {
		v.errorf(path+".from", "at most %d entries are allowed, got %d", maxFrom, len(r.From))
	}
	for j, f := range r.From {
		p := fmt.Sprintf("%s.from[%d].source", path, j)
		if f == nil || f.Source == nil {
			v.errorf(p, "required")
			continue
		}
		v.source(f.Source, p, custom)
	}
	for j, t := range r.To {
		p := fmt.Sprintf("%s.to[%d].operation", path, j)
		if t == nil || t.Operation == nil {
			v.errorf(p, "required")
			continue
		}
		v.operation(t.Operation, p)
	}
	for j, c := range r.When {
		p := fmt.Sprintf("%s.when[%d]", path, j)
		if c == nil {
			v.errorf(p, "must not be null")
			continue
		}
		v.condition(c, p, custom)
	}
}

func (v *validator) nonEmpty(list []string, path string) {
	for i, s := range list {
		if s == "" {
			v.errorf(fmt.Sprintf("%s[%d]", path, i), "empty string is not allowed")
		}
	}
}

func (v *validator) source(s *securityv1beta1.Source, path string, custom bool) {
	lists := []struct {
		name string
		vals []string
	}{
		{"principals", s.Principals}, {"notPrincipals", s.NotPrincipals},
		{"requestPrincipals", s.RequestPrincipals}, {"notRequestPrincipals", s.NotRequestPrincipals},
		{"namespaces", s.Namespaces}, {"notNamespaces", s.NotNamespaces},
		{"serviceAccounts", s.ServiceAccounts}, {"notServiceAccounts", s.NotServiceAccounts},
		{"ipBlocks", s.IpBlocks}, {"notIpBlocks", s.NotIpBlocks},
		{"remoteIpBlocks", s.RemoteIpBlocks}, {"notRemoteIpBlocks", s.NotRemoteIpBlocks},
		{"trustDomains", s.TrustDomains}, {"notTrustDomains", s.NotTrustDomains},
	}
	set := 0
	for _, l := range lists {
		if len(l.vals) > 0 {
			set++
		}
		v.nonEmpty(l.vals, path+"."+l.name)
	}
	if set == 0 {
		v.errorf(path, "must set at least one field")
	}
	for _, l := range []struct {
		name string
		vals []string
	}{lists[8], lists[9], lists[10], lists[11]} {
		for i, b := range l.vals {
			if b == "" {
				continue
			}
			if _, err := parseIPBlock(b); err != nil {
				v.errorf(fmt.Sprintf("%s.%s[%d]", path, l.name, i), "%q is not an IP address or CIDR", b)
			}
		}
	}
	if (len(s.ServiceAccounts) > 0 || len(s.NotServiceAccounts) > 0) &&
		(len(s.Principals) > 0 || len(s.NotPrincipals) > 0 || len(s.Namespaces) > 0 || len(s.NotNamespaces) > 0) {
		v.errorf(path, "serviceAccounts cannot be combined with principals or namespaces")
	}
	for _, l := range []struct {
		name string
		vals []string
	}{lists[6], lists[7]} {
		if len(l.vals) > maxServiceAccounts {
			v.errorf(path+"."+l.name, "at most %d values are allowed, got %d", maxServiceAccounts, len(l.vals))
		}
		for i, sa := range l.vals {
			p := fmt.Sprintf("%s.%s[%d]", path, l.name, i)
			switch {
			case len(sa) > maxServiceAccount:
				v.errorf(p, "longer than %d characters", maxServiceAccount)
			case strings.Contains(sa, "*"):
				v.errorf(p, "%q: wildcards are not supported in serviceAccounts", sa)
			case strings.Count(sa, "/") > 1 || strings.HasPrefix(sa, "/") || strings.HasSuffix(sa, "/"):
				v.errorf(p, "%q must be <namespace>/<serviceaccount> or <serviceaccount>", sa)
			}
		}
	}
	for _, l := range []struct {
		name string
		vals []string
	}{lists[12], lists[13]} {
		for i, td := range l.vals {
			if err := checkTrustDomainPattern(td); err != nil {
				v.errorf(fmt.Sprintf("%s.%s[%d]", path, l.name, i), "%q: %v", td, err)
			}
		}
	}
	if custom {
		for _, l := range append(lists[0:8:8], lists[12], lists[13]) {
			if len(l.vals) > 0 {
				v.errorf(path+"."+l.name, "not supported with action CUSTOM")
			}
		}
	}
}

func checkTrustDomainPattern(td string) error {
	if strings.Contains(td, "/") {
		return fmt.Errorf("must not contain /")
	}
	n := strings.Count(td, "*")
	if n > 1 || (n == 1 && !strings.HasPrefix(td, "*") && !strings.HasSuffix(td, "*")) {
		return fmt.Errorf("at most one *, only at the start or the end")
	}
	return nil
}

func (v *validator) operation(o *securityv1beta1.Operation, path string) {
	lists := []struct {
		name string
		vals []string
	}{
		{"hosts", o.Hosts}, {"notHosts", o.NotHosts}, {"ports", o.Ports}, {"notPorts", o.NotPorts},
		{"methods", o.Methods}, {"notMethods", o.NotMethods}, {"paths", o.Paths}, {"notPaths", o.NotPaths},
	}
	set := 0
	for _, l := range lists {
		if len(l.vals) > 0 {
			set++
		}
		v.nonEmpty(l.vals, path+"."+l.name)
	}
	if set == 0 {
		v.errorf(path, "must set at least one field")
	}
	for _, l := range lists[2:4] {
		for i, p := range l.vals {
			if _, ok := parsePort(p); !ok && p != "" {
				v.errorf(fmt.Sprintf("%s.%s[%d]", path, l.name, i), "%q is not a port", p)
			}
		}
	}
	for _, l := range lists[6:8] {
		for i, p := range l.vals {
			if err := checkPathTemplate(p); err != nil {
				v.errorf(fmt.Sprintf("%s.%s[%d]", path, l.name, i), "%q: %v", p, err)
			}
		}
	}
}

// parsePort parses a decimal port 0..65535.
func parsePort(s string) (uint16, bool) {
	n, err := strconv.ParseUint(s, 10, 16)
	return uint16(n), err == nil
}

// checkPathTemplate validates {*} and {**} path templates (ISTIO-SEMANTICS §2.1).
func checkPathTemplate(p string) error {
	if !strings.ContainsAny(p, "{}") {
		return nil
	}
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("a path template must start with /")
	}
	segs := strings.Split(p[1:], "/")
	for i, s := range segs {
		switch {
		case s == "{*}":
		case s == "{**}":
			if i != len(segs)-1 {
				return fmt.Errorf("{**} must be the last segment")
			}
		case strings.ContainsAny(s, "{}*"):
			return fmt.Errorf("segment %q: a template segment must be exactly {*} or {**}, and no other * is allowed", s)
		}
	}
	return nil
}

// Condition keys (ISTIO-SEMANTICS §2.7).
var conditionKeys = map[string]bool{
	"source.ip": true, "remote.ip": true, "source.namespace": true, "source.principal": true,
	"source.serviceAccount": true, "source.trustDomain": true, "request.auth.principal": true,
	"request.auth.audiences": true, "request.auth.presenter": true, "destination.ip": true,
	"destination.port": true, "connection.sni": true,
}

const (
	headerKeyPrefix = "request.headers"
	claimKeyPrefix  = "request.auth.claims"
	envoyKeyPrefix  = "experimental.envoy.filters."
)

// bracketArgs splits "prefix[a][b]" into [a b]; ok is false if the brackets are malformed.
func bracketArgs(key, prefix string) (args []string, ok bool) {
	rest := key[len(prefix):]
	for rest != "" {
		if rest[0] != '[' {
			return nil, false
		}
		end := strings.IndexByte(rest, ']')
		if end <= 1 || strings.IndexByte(rest[1:end], '[') >= 0 {
			return nil, false
		}
		args = append(args, rest[1:end])
		rest = rest[end+1:]
	}
	return args, len(args) > 0
}

func (v *validator) condition(c *securityv1beta1.Condition, path string, custom bool) {
	key := c.Key
	if key == "" {
		v.errorf(path+".key", "required")
		return
	}
	if len(c.Values) == 0 && len(c.NotValues) == 0 {
		v.errorf(path, "at least one of values or notValues is required")
	}
	v.nonEmpty(c.Values, path+".values")
	v.nonEmpty(c.NotValues, path+".notValues")
	switch {
	case conditionKeys[key]:
	case strings.HasPrefix(key, headerKeyPrefix):
		if args, ok := bracketArgs(key, headerKeyPrefix); !ok || len(args) != 1 {
			v.errorf(path+".key", "%q must have the form request.headers[name]", key)
		}
	case strings.HasPrefix(key, claimKeyPrefix):
		if _, ok := bracketArgs(key, claimKeyPrefix); !ok {
			v.errorf(path+".key", "%q must have the form request.auth.claims[name] (nested: [a][b])", key)
		}
	case strings.HasPrefix(key, envoyKeyPrefix):
		name, _, _ := strings.Cut(key[len(envoyKeyPrefix):], "[")
		if _, ok := bracketArgs(key, envoyKeyPrefix+name); name == "" || !ok {
			v.errorf(path+".key", "%q must have the form experimental.envoy.filters.<filter>[key]", key)
		}
	case strings.HasPrefix(key, "destination.labels"), key == "destination.name", key == "destination.namespace", key == "destination.user":
		v.errorf(path+".key", "%q is a legacy key and is not supported", key)
	default:
		v.errorf(path+".key", "unknown condition key %q", key)
	}
	if custom && (key == "source.namespace" || key == "source.serviceAccount" || key == "source.trustDomain" ||
		key == "source.principal" || strings.HasPrefix(key, "request.auth.")) {
		v.errorf(path+".key", "%q is not supported with action CUSTOM", key)
	}
	for _, l := range []struct {
		name string
		vals []string
	}{{"values", c.Values}, {"notValues", c.NotValues}} {
		for i, val := range l.vals {
			if val == "" {
				continue
			}
			p := fmt.Sprintf("%s.%s[%d]", path, l.name, i)
			switch key {
			case "source.ip", "remote.ip", "destination.ip":
				if _, err := parseIPBlock(val); err != nil {
					v.errorf(p, "%q is not an IP address or CIDR", val)
				}
			case "destination.port":
				if _, ok := parsePort(val); !ok {
					v.errorf(p, "%q is not a port", val)
				}
			case "source.trustDomain":
				if err := checkTrustDomainPattern(val); err != nil {
					v.errorf(p, "%q: %v", val, err)
				}
			}
		}
	}
}

var headerNameRE = regexp.MustCompile(`^[-_A-Za-z0-9]+$`)

func (v *validator) requestAuthentication(ra *securityv1beta1.RequestAuthentication) {
	v.targeting(ra.Selector, ra.TargetRef, ra.TargetRefs)
	if len(ra.JwtRules) > maxJWTRules {
		v.errorf("spec.jwtRules", "at most %d rules are allowed, got %d", maxJWTRules, len(ra.JwtRules))
	}
	for i, r := range ra.JwtRules {
		p := fmt.Sprintf("spec.jwtRules[%d]", i)
		if r == nil {
			v.errorf(p, "must not be null")
			continue
		}
		if r.Issuer == "" && r.JwksUri == "" {
			v.errorf(p+".issuer", "issuer or jwksUri is required")
		}
		if r.JwksUri != "" {
			u, err := url.Parse(r.JwksUri)
			switch {
			case len(r.JwksUri) > maxJWKSURI:
				v.errorf(p+".jwksUri", "longer than %d characters", maxJWKSURI)
			case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
				v.errorf(p+".jwksUri", "%q must be an http or https URL", r.JwksUri)
			}
			if r.Jwks != "" {
				v.errorf(p, "jwks and jwksUri are mutually exclusive")
			}
		}
		if r.Jwks != "" {
			var set struct {
				Keys []map[string]any `json:"keys"`
			}
			if err := json.Unmarshal([]byte(r.Jwks), &set); err != nil {
				v.errorf(p+".jwks", "not a JSON Web Key Set: %v", err)
			}
			for _, k := range set.Keys {
				if _, private := k["d"]; private {
					v.warnf(p+".jwks", "contains private key material")
					break
				}
			}
		}
		v.nonEmpty(r.Audiences, p+".audiences")
		v.nonEmpty(r.FromParams, p+".fromParams")
		v.nonEmpty(r.FromCookies, p+".fromCookies")
		for j, h := range r.FromHeaders {
			if h == nil || h.Name == "" {
				v.errorf(fmt.Sprintf("%s.fromHeaders[%d].name", p, j), "required")
			}
		}
		for j, h := range r.OutputClaimToHeaders {
			hp := fmt.Sprintf("%s.outputClaimToHeaders[%d]", p, j)
			if h == nil {
				v.errorf(hp, "must not be null")
				continue
			}
			if !headerNameRE.MatchString(h.Header) {
				v.errorf(hp+".header", "%q must match %s", h.Header, headerNameRE)
			}
			if h.Claim == "" {
				v.errorf(hp+".claim", "required")
			}
		}
		if r.Timeout != nil && (r.Timeout.Seconds < 0 || r.Timeout.Nanos < 0) {
			v.errorf(p+".timeout", "must not be negative")
		}
	}
}

func sortedPorts[V any](m map[uint32]V) []uint32 {
	ports := make([]uint32, 0, len(m))
	for p := range m {
		ports = append(ports, p)
	}
	for i := 1; i < len(ports); i++ {
		for j := i; j > 0 && ports[j] < ports[j-1]; j-- {
			ports[j], ports[j-1] = ports[j-1], ports[j]
		}
	}
	return ports
}
