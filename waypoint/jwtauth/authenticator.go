package jwtauth

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/veilmesh/veil/policy"
	securityv1beta1 "istio.io/api/security/v1beta1"
)

// ClockSkew is how far nbf and exp may be off: Envoy's default, which Istio does not change.
const ClockSkew = 60 * time.Second

// maxRealmPath is how much of the path the WWW-Authenticate realm carries (Envoy's
// MaximumUriLength).
const maxRealmPath = 256

// Authenticator is the compiled jwtRules of the RequestAuthentications that apply to one
// decision. It is immutable and safe for concurrent use; Authenticate takes no lock.
type Authenticator struct {
	providers []*provider
	// sanitize lists every provider's output headers, deleted from each request first.
	sanitize []string
	// Warnings name the rules whose inline jwks has keys that could not be used (skipped
	// keys, or no usable key at all: that rule then rejects every token of its issuer).
	Warnings []string
}

// provider is one jwtRule, as the Envoy JwtProvider istiod generates from it.
type provider struct {
	issuer    string
	audiences []string // normalized; empty: any audience
	// keys verify signatures; when there are none, noKeys is the status every token of
	// the issuer gets once its claims pass.
	keys   []*key
	noKeys status
	loc    locations
	// forward keeps the token in the request (forwardOriginalToken).
	forward        bool
	payloadHeader  string // canonical, "" for none
	claims         []claimHeader
	outputs        []string // payloadHeader and the claim headers, deleted before extraction
	spaceDelimited []string
}

// claimHeader is an outputClaimToHeaders entry.
type claimHeader struct {
	header string // canonical
	path   []string
}

// ErrNotRequestAuthentication is returned by New for an object that is not a
// RequestAuthentication with a spec.
var ErrNotRequestAuthentication = errors.New("not a RequestAuthentication")

// New compiles the jwtRules of ras, the RequestAuthentications that apply to one decision
// (already selected by the caller), as the jwt_authn filter istiod generates: the rules of
// all of them concatenated, sorted by issuer (stably), each a provider OR'ed with
// allow_missing (ISTIO-SEMANTICS §3.2, §3.4). A rule with a jwksUri (or only an issuer) but
// no inline jwks has not been resolved by the controller: it rejects every token of its
// issuer, as istiod's fallback key does. A jwks without any usable key rejects them too, as
// Envoy does, and is reported in Warnings. New fails only on objects that are not
// RequestAuthentications or hold null rules; the objects are not modified.
func New(ras []*policy.Object) (*Authenticator, error) {
	type rule struct {
		r     *securityv1beta1.JWTRule
		where string
	}
	var rules []rule
	for _, o := range ras {
		if o == nil || o.Kind != policy.KindRequestAuthentication || o.RequestAuthentication == nil {
			what := "nil object"
			if o != nil {
				what = o.Key().String()
			}
			return nil, fmt.Errorf("jwtauth: %s: %w", what, ErrNotRequestAuthentication)
		}
		for i, r := range o.RequestAuthentication.JwtRules {
			where := fmt.Sprintf("%s/%s: spec.jwtRules[%d]", o.Namespace, o.Name, i)
			if r == nil {
				return nil, fmt.Errorf("jwtauth: RequestAuthentication %s: must not be null", where)
			}
			rules = append(rules, rule{r, where})
		}
	}
	sort.SliceStable(rules, func(i, j int) bool { return rules[i].r.Issuer < rules[j].r.Issuer })
	a := &Authenticator{}
	for _, r := range rules {
		p, warn := compile(r.r)
		if warn != "" {
			a.Warnings = append(a.Warnings, "RequestAuthentication "+r.where+".jwks: "+warn)
		}
		a.providers = append(a.providers, p)
		for _, h := range p.outputs {
			if !slices.Contains(a.sanitize, h) {
				a.sanitize = append(a.sanitize, h)
			}
		}
	}
	return a, nil
}

func compile(r *securityv1beta1.JWTRule) (*provider, string) {
	p := &provider{
		issuer:         r.Issuer,
		forward:        r.ForwardOriginalToken,
		spaceDelimited: slices.Clone(r.SpaceDelimitedClaims),
	}
	for _, a := range r.Audiences {
		p.audiences = append(p.audiences, normalizeAudience(a))
	}
	var warn string
	if r.Jwks == "" {
		p.noKeys = statusVerificationFail
	} else {
		keys, skipped, err := parseJWKS(r.Jwks)
		var msgs []string
		for _, e := range skipped {
			msgs = append(msgs, e.Error())
		}
		if err != nil {
			p.noKeys = statusJwksNoValidKeys
			msgs = append([]string{err.Error() + ": every token of issuer " + strconv.Quote(r.Issuer) + " is rejected"}, msgs...)
		} else if len(msgs) > 0 {
			msgs = append([]string{"keys left out"}, msgs...)
		}
		p.keys = keys
		warn = strings.Join(msgs, "; ")
	}

	if r.OutputPayloadToHeader != "" {
		p.payloadHeader = http.CanonicalHeaderKey(r.OutputPayloadToHeader)
		p.outputs = append(p.outputs, p.payloadHeader)
	}
	for _, c := range r.OutputClaimToHeaders {
		if c == nil || c.Header == "" {
			continue
		}
		h := claimHeader{header: http.CanonicalHeaderKey(c.Header), path: strings.Split(c.Claim, ".")}
		p.claims = append(p.claims, h)
		p.outputs = append(p.outputs, h.header)
	}

	// Locations, in Envoy's order: std::map keyed by lower-case header name + prefix.
	type hkey struct{ key, name, prefix string }
	var hs []hkey
	params, cookies := slices.Clone(r.FromParams), slices.Clone(r.FromCookies)
	for _, h := range r.FromHeaders {
		if h != nil && h.Name != "" {
			hs = append(hs, hkey{strings.ToLower(h.Name) + h.Prefix, h.Name, h.Prefix})
		}
	}
	if len(r.FromHeaders) == 0 && len(r.FromParams) == 0 && len(r.FromCookies) == 0 {
		hs = append(hs, hkey{"authorization" + "Bearer ", "Authorization", "Bearer "})
		params = []string{"access_token"}
	}
	sort.SliceStable(hs, func(i, j int) bool { return hs[i].key < hs[j].key })
	for i, h := range hs {
		if i > 0 && hs[i-1].key == h.key {
			continue
		}
		p.loc.headers = append(p.loc.headers, headerLocation{name: http.CanonicalHeaderKey(h.name), prefix: h.prefix})
	}
	slices.Sort(params)
	p.loc.params = slices.Compact(params)
	slices.Sort(cookies)
	p.loc.cookies = slices.Compact(cookies)
	return p, warn
}

// normalizeAudience drops an http:// or https:// prefix and one trailing '/', as
// jwt_verify_lib compares audiences.
func normalizeAudience(a string) string {
	if a == "" {
		return a
	}
	if s, ok := strings.CutPrefix(a, "http://"); ok {
		a = s
	} else if s, ok := strings.CutPrefix(a, "https://"); ok {
		a = s
	}
	return strings.TrimSuffix(a, "/")
}

// Failure is Envoy's answer to a request whose token failed: 401, or 403 when the token's
// audiences are not allowed, with the status text as body.
type Failure struct {
	Status int
	// Body is exactly Envoy's text, such as "Jwt is expired" or "Jwt issuer is not
	// configured", without a trailing newline.
	Body string
	// WWWAuthenticate is `Bearer realm="<original request URI>", error="invalid_token"`.
	WWWAuthenticate string
}

// ServeHTTP writes the failure as Envoy does: the status, Content-Type text/plain,
// WWW-Authenticate, and the body with no trailing newline.
func (f *Failure) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	h := w.Header()
	h.Set("Content-Type", "text/plain")
	h.Set("Www-Authenticate", f.WWWAuthenticate)
	h.Set("Content-Length", strconv.Itoa(len(f.Body)))
	w.WriteHeader(f.Status)
	io.WriteString(w, f.Body)
}

// Error returns the body, so a Failure can be logged as an error.
func (f *Failure) Error() string { return f.Body }

// run is the state of one Authenticate call.
type run struct {
	r   *http.Request
	now uint64
	// jwt is the last token that verified.
	jwt *policy.JWT
	// ops are the header changes Envoy's verifiers make, in their order; they are applied
	// once the outcome is known, so that every verifier reads the tokens of the request
	// as received.
	ops    []headerOp
	buf    [4]found
	opsBuf [8]headerOp
}

var runs = sync.Pool{New: func() any { return new(run) }}

// release clears st, which holds the request and its tokens, and pools it.
func (st *run) release() {
	*st = run{}
	runs.Put(st)
}

// headerOp deletes a header, or adds a value to it.
type headerOp struct {
	name, value string
	del         bool
}

func (st *run) apply() {
	h := st.r.Header
	for _, op := range st.ops {
		if op.del {
			delete(h, op.name)
		} else {
			h[op.name] = append(h[op.name], op.value)
		}
	}
}

// Authenticate runs the filter on r at time now and returns the verified token (nil when
// the request carries none) or the Failure to answer with. It mutates r.Header as Envoy
// does: the providers' output headers are deleted first (so clients cannot spoof them),
// and on success the payload and claim headers are set and the token's header removed
// unless forwardOriginalToken (tokens in query parameters and cookies stay). A CORS
// preflight (OPTIONS with Origin and Access-Control-Request-Method) is not checked.
//
// With several tokens each provider checks every token at its locations, the last found
// first, and the outcome is Envoy's for Istio's requirement (P1 OR ... OR Pn OR AND(Pi OR
// allow_missing)); the token returned is the last one that verified. One deliberate
// difference: every provider reads the tokens of the request as received. Envoy's later
// verifiers read the request after an earlier one removed a token's header, which, when
// several rules apply, lets a request through with an invalid token next to a valid one.
func (a *Authenticator) Authenticate(r *http.Request, now time.Time) (*policy.JWT, *Failure) {
	if a == nil || len(a.providers) == 0 {
		return nil, nil
	}
	if r.Header == nil {
		r.Header = http.Header{}
	}
	for _, h := range a.sanitize {
		delete(r.Header, h)
	}
	if r.Method == http.MethodOptions && r.Header.Get("Origin") != "" && r.Header.Get("Access-Control-Request-Method") != "" {
		return nil, nil
	}
	st := runs.Get().(*run)
	defer st.release()
	st.r, st.ops = r, st.opsBuf[:0]
	if s := now.Unix(); s > 0 {
		st.now = uint64(s)
	}
	s := a.requirement(st)
	st.apply()
	if s != statusOK {
		return nil, failure(r, s)
	}
	return st.jwt, nil
}

// requirement evaluates istiod's requirement: for one provider, P OR allow_missing; for
// several, P1 OR ... OR Pn OR AND(P1 OR allow_missing, ..., Pn OR allow_missing), each
// child run in turn as Envoy's verifiers do, side effects included.
func (a *Authenticator) requirement(st *run) status {
	if len(a.providers) == 1 {
		if s := a.providers[0].verify(st); s != statusMissed {
			return s
		}
		return statusOK
	}
	// Envoy's RequiresAny: the first OK wins; otherwise the reason is the last child's that
	// is neither "missing" nor "unknown issuer", else "unknown issuer", else "missing".
	final := statusMissed
	fail := func(s status) {
		if (s != statusMissed && s != statusUnknownIssuer) || final == statusMissed {
			final = s
		}
	}
	for _, p := range a.providers {
		s := p.verify(st)
		if s == statusOK {
			return statusOK
		}
		fail(s)
	}
	for _, p := range a.providers {
		s := p.verify(st)
		if s != statusOK && s != statusMissed {
			fail(s)
			return final
		}
	}
	return statusOK
}

// verify is one provider's verifier: it deletes the provider's output headers, extracts
// the tokens at its locations and checks them from the last found to the first, stopping
// at the first failure. No token is statusMissed.
func (p *provider) verify(st *run) status {
	for _, h := range p.outputs {
		st.ops = append(st.ops, headerOp{name: h, del: true})
	}
	toks := p.loc.extract(st.r, st.buf[:0])
	if len(toks) == 0 {
		return statusMissed
	}
	for i := len(toks) - 1; i >= 0; i-- {
		if s := p.check(st, toks[i]); s != statusOK {
			return s
		}
	}
	return statusOK
}

// check verifies one token in Envoy's order: parse, issuer, time, audiences, signature;
// then applies the outputs.
func (p *provider) check(st *run, f found) status {
	t, s := parseToken(f.token)
	if s != statusOK {
		return s
	}
	if p.issuer != "" && t.iss != p.issuer {
		return statusUnknownIssuer
	}
	const skew = uint64(ClockSkew / time.Second)
	if st.now+skew < t.nbf {
		return statusNotYetValid
	}
	if t.exp != 0 && st.now > t.exp+skew {
		return statusExpired
	}
	if !p.audienceAllowed(t.aud) {
		return statusAudienceNotAllowed
	}
	if len(p.keys) == 0 {
		return p.noKeys
	}
	if s := verify(t, p.keys); s != statusOK {
		return s
	}

	if p.payloadHeader != "" {
		st.ops = append(st.ops, headerOp{name: p.payloadHeader, value: t.payload})
	}
	for _, c := range p.claims {
		if v := claimString(t.claims, c.path); v != "" {
			st.ops = append(st.ops, headerOp{name: c.header, value: v})
		}
	}
	if !p.forward && f.header != "" {
		st.ops = append(st.ops, headerOp{name: f.header, del: true})
	}
	st.jwt = &policy.JWT{Issuer: t.iss, Subject: t.sub, Claims: t.claims, SpaceDelimited: p.spaceDelimited}
	return statusOK
}

func (p *provider) audienceAllowed(aud []string) bool {
	if len(p.audiences) == 0 {
		return true
	}
	for _, a := range aud {
		if slices.Contains(p.audiences, normalizeAudience(a)) {
			return true
		}
	}
	return false
}

// claimString is a claim as a header value: a string as is, a bool as true/false, a number
// as an integer when it is a whole number in [0, 2^64), else with six decimals; "" when
// the claim is missing or not a scalar. A path a.b looks into nested objects.
func claimString(claims map[string]any, path []string) string {
	var v any = claims
	for _, name := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return ""
		}
		if v, ok = m[name]; !ok {
			return ""
		}
	}
	switch v := v.(type) {
	case string:
		return v
	case bool:
		return strconv.FormatBool(v)
	case float64:
		if v >= 0 && v < 1<<64 && v == float64(uint64(v)) {
			return strconv.FormatUint(uint64(v), 10)
		}
		return strconv.FormatFloat(v, 'f', 6, 64)
	}
	return ""
}

// failure builds Envoy's local reply for s.
func failure(r *http.Request, s status) *Failure {
	code := http.StatusUnauthorized
	if s == statusAudienceNotAllowed {
		code = http.StatusForbidden
	}
	v := `Bearer realm="` + originalURI(r) + `"`
	if s != statusMissed {
		v += `, error="invalid_token"`
	}
	return &Failure{Status: code, Body: s.String(), WWWAuthenticate: v}
}

// originalURI is Envoy's buildOriginalUri: scheme://host followed by the request's path
// and query, cut to 256 bytes.
func originalURI(r *http.Request) string {
	scheme := "http"
	switch {
	case r.URL != nil && r.URL.Scheme != "":
		scheme = r.URL.Scheme
	case r.TLS != nil:
		scheme = "https"
	}
	path := r.RequestURI
	if !strings.HasPrefix(path, "/") && r.URL != nil {
		path = r.URL.RequestURI()
	}
	if len(path) > maxRealmPath {
		path = path[:maxRealmPath]
	}
	return scheme + "://" + r.Host + path
}
