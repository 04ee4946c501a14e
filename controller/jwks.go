package controller

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"reflect"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/veilmesh/veil/policy"
	"google.golang.org/protobuf/proto"
	securityv1beta1 "istio.io/api/security/v1beta1"
)

// Defaults of JWKSResolver: istiod's (pilot/pkg/model/jwks_resolver.go,
// PILOT_JWT_PUB_KEY_REFRESH_INTERVAL).
const (
	// DefaultJWKSRefreshInterval is how often every cached JWKS is fetched again.
	DefaultJWKSRefreshInterval = 20 * time.Minute
	// DefaultJWKSRefreshIntervalOnFailure is the interval after a cycle with a failure; it
	// doubles after each further failed cycle, up to DefaultJWKSMaxRefreshInterval.
	DefaultJWKSRefreshIntervalOnFailure = time.Minute
	// DefaultJWKSMaxRefreshInterval caps the interval after failed cycles.
	DefaultJWKSMaxRefreshInterval = 60 * time.Minute
	// DefaultJWKSRetries is how many times a background fetch is retried.
	DefaultJWKSRetries = 7
	// DefaultJWKSRetryInterval is the pause between a background fetch's attempts.
	DefaultJWKSRetryInterval = time.Second
	// DefaultJWKSEviction: a JWKS not served, or not fetched successfully, for this long is
	// dropped from the cache.
	DefaultJWKSEviction = 7 * 24 * time.Hour
	// DefaultJWKSTimeout is a fetch's time limit when the rule sets no timeout.
	DefaultJWKSTimeout = 5 * time.Second
	// MaxJWKSSize is the largest JWKS (or OpenID discovery document) read.
	MaxJWKSSize = 1 << 20
)

// openIDSuffix is appended to an issuer to find its OpenID discovery document.
const openIDSuffix = "/.well-known/openid-configuration"

// maxParallelFetches bounds the fetches one Inline or refresh cycle runs at once.
const maxParallelFetches = 8

// JWKSResolver gives RequestAuthentication rules their keys as istiod does with
// PILOT_JWT_ENABLE_REMOTE_JWKS=false (ISTIO-SEMANTICS §3.7): the controller fetches each
// rule's jwksUri (or, without one, the jwks_uri of the issuer's OpenID discovery document)
// and inlines the keys into the policy it pushes, so proxies never fetch.
//
// The first fetch of a key set happens on the push path (Inline) with a single attempt
// bounded by the rule's timeout (5s by default). A failure (a network error, a non-2xx
// status, or a body that is not a JSON object with a "keys" array) gives the rule a key
// whose private half was discarded, so every token of the issuer fails while requests
// without a token pass, and queues the key set for a background fetch. Run refreshes every
// cached key set every RefreshInterval, each fetch retried up to Retries times; after a
// cycle with a failure the interval is RefreshIntervalOnFailure, doubling after each
// further failed cycle up to MaxRefreshInterval, and back to RefreshInterval after a clean
// one. A failed refresh keeps the last good keys. When keys change (compared with the keys
// in kid order), OnChange is called: the controller pushes again. Key sets not served for
// Eviction, or without a successful fetch for Eviction, are dropped.
//
// Connections go only to the address actually dialled after DNS resolution, and never to
// link-local addresses, cloud metadata services, or BlockedCIDRs; redirects are checked
// the same way. Environment proxies are not used. The zero value is usable; fields must
// be set before first use. Safe for concurrent use.
type JWKSResolver struct {
	// BlockedCIDRs are refused besides link-local and cloud metadata addresses (istiod's
	// BLOCKED_CIDRS_IN_JWKS_URIS).
	BlockedCIDRs []netip.Prefix
	// RootCAs verify https servers; nil means the system roots. See JWKSRoots.
	RootCAs *x509.CertPool
	// InsecureSkipVerify turns https verification off (istiod's
	// JWKS_RESOLVER_INSECURE_SKIP_VERIFY).
	InsecureSkipVerify bool
	// OnChange is called, from Run's goroutine, after a refresh changed keys that are
	// served (or dropped keys that were): wire it to ConfigServer.Republish.
	OnChange func()

	// Timings; zero means the Default* value.
	RefreshInterval          time.Duration
	RefreshIntervalOnFailure time.Duration
	MaxRefreshInterval       time.Duration
	RetryInterval            time.Duration
	// Retries is how many times a background fetch is retried; zero means
	// DefaultJWKSRetries, negative none.
	Retries  int
	Eviction time.Duration
	// Now is the clock of the cache's bookkeeping; nil means time.Now.
	Now func() time.Time
	Log *slog.Logger

	once   sync.Once
	client *http.Client
	queued chan struct{} // a push-path fetch failed: fetch what has no keys

	// mu guards entries and inUse.
	mu      sync.Mutex
	entries map[jwksKey]*jwksEntry
	// inUse are the key sets the last Inline served.
	inUse map[jwksKey]bool
}

// jwksKey identifies a cached key set: istiod's (issuer, jwksUri); the URI is empty when
// the rule names only an issuer.
type jwksKey struct{ issuer, uri string }

type jwksEntry struct {
	keys                    string // the fetched JWKS; "" until a fetch succeeds
	lastRefreshed, lastUsed time.Time
	timeout                 time.Duration
}

func (r *JWKSResolver) init() {
	r.once.Do(func() {
		r.queued = make(chan struct{}, 1)
		r.entries = map[jwksKey]*jwksEntry{}
		dialer := &net.Dialer{Timeout: 30 * time.Second, Control: r.control}
		r.client = &http.Client{Transport: &http.Transport{
			DialContext:       dialer.DialContext,
			DisableKeepAlives: true,
			TLSClientConfig: &tls.Config{
				RootCAs:            r.RootCAs,
				InsecureSkipVerify: r.InsecureSkipVerify, //nolint:gosec // the operator asked for it
				MinVersion:         tls.VersionTLS12,
			},
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: 30 * time.Second,
		}}
	})
}

func (r *JWKSResolver) log() *slog.Logger {
	if r.Log == nil {
		return slog.Default()
	}
	return r.Log
}

func (r *JWKSResolver) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// cloudMetadata are instance metadata addresses outside the link-local ranges (Alibaba
// Cloud's, AWS's IPv6 one), as istiod refuses them.
var cloudMetadata = []netip.Prefix{
	netip.MustParsePrefix("100.100.100.200/32"),
	netip.MustParsePrefix("fd00:ec2::/32"),
}

// nat64 is the well-known NAT64 prefix: its addresses reach the IPv4 address they embed.
var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// ErrJWKSAddressBlocked is returned (wrapped) for a fetch refused because of the address it
// would connect to.
var ErrJWKSAddressBlocked = errors.New("address blocked")

// Blocked reports why connecting to ip to fetch a JWKS is refused, nil if it is not.
func (r *JWKSResolver) Blocked(ip netip.Addr) error {
	ip = ip.Unmap()
	if nat64.Contains(ip) {
		b := ip.As16()
		ip = netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
	}
	switch {
	case ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast():
		return fmt.Errorf("%w: %s is link-local", ErrJWKSAddressBlocked, ip)
	}
	for _, p := range cloudMetadata {
		if p.Contains(ip) {
			return fmt.Errorf("%w: %s is a cloud metadata address", ErrJWKSAddressBlocked, ip)
		}
	}
	for _, p := range r.BlockedCIDRs {
		if p.Contains(ip) {
			return fmt.Errorf("%w: %s is in the blocked range %s", ErrJWKSAddressBlocked, ip, p)
		}
	}
	return nil
}

// control checks the address a connection is about to be made to, after name resolution.
func (r *JWKSResolver) control(_, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("%w: cannot read the address %q", ErrJWKSAddressBlocked, address)
	}
	return r.Blocked(ap.Addr())
}

// JWKSRoots returns the system roots plus the PEM certificates of file (istiod's
// /cacerts/extra.pem), for JWKSResolver.RootCAs.
func JWKSRoots(file string) (*x509.CertPool, error) {
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("controller: jwks extra roots: %w", err)
	}
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("controller: jwks extra roots %s: no PEM certificate", file)
	}
	return pool, nil
}

// Inline returns objs with every RequestAuthentication rule that has a jwksUri, or only an
// issuer, given its keys inline: the cached keys, or those of a fetch made now (one attempt,
// the fetches of different key sets in parallel), or on failure the key that rejects every
// token. Such rules come back as deep copies with jwks set and jwksUri cleared (the two
// are exclusive); other objects are returned as they are, and objs is not modified. It
// blocks while it fetches.
func (r *JWKSResolver) Inline(objs []*policy.Object) []*policy.Object {
	r.init()
	var want []jwksKey
	timeouts := map[jwksKey]time.Duration{}
	for _, o := range objs {
		for _, rule := range unresolved(o) {
			k := jwksKey{rule.Issuer, rule.JwksUri}
			if _, ok := timeouts[k]; !ok {
				want = append(want, k)
			}
			timeouts[k] = ruleTimeout(rule)
		}
	}
	keys := r.lookup(want, timeouts)
	out := make([]*policy.Object, len(objs))
	for i, o := range objs {
		if len(unresolved(o)) == 0 {
			out[i] = o
			continue
		}
		c := *o
		c.RequestAuthentication = proto.Clone(o.RequestAuthentication).(*securityv1beta1.RequestAuthentication)
		for _, rule := range unresolved(&c) {
			rule.Jwks = keys[jwksKey{rule.Issuer, rule.JwksUri}]
			rule.JwksUri = ""
		}
		out[i] = &c
	}
	return out
}

// unresolved lists the rules of o that need fetched keys.
func unresolved(o *policy.Object) []*securityv1beta1.JWTRule {
	if o == nil || o.Kind != policy.KindRequestAuthentication || o.RequestAuthentication == nil {
		return nil
	}
	var out []*securityv1beta1.JWTRule
	for _, rule := range o.RequestAuthentication.JwtRules {
		if rule != nil && rule.Jwks == "" && (rule.JwksUri != "" || rule.Issuer != "") {
			out = append(out, rule)
		}
	}
	return out
}

func ruleTimeout(rule *securityv1beta1.JWTRule) time.Duration {
	if rule.Timeout == nil {
		return DefaultJWKSTimeout
	}
	return rule.Timeout.AsDuration()
}

// lookup returns the keys to serve for want, fetching the key sets not cached.
func (r *JWKSResolver) lookup(want []jwksKey, timeouts map[jwksKey]time.Duration) map[jwksKey]string {
	now := r.now()
	out := make(map[jwksKey]string, len(want))
	var missing []jwksKey
	r.mu.Lock()
	r.inUse = make(map[jwksKey]bool, len(want))
	for _, k := range want {
		r.inUse[k] = true
		if e := r.entries[k]; e != nil {
			e.lastUsed, e.timeout = now, timeouts[k]
			out[k] = e.keys
		} else {
			missing = append(missing, k)
		}
	}
	r.mu.Unlock()

	results := r.fetchAll(context.Background(), missing, timeouts, 0)
	failed := false
	r.mu.Lock()
	for i, k := range missing {
		res := results[i]
		if res.err != nil {
			failed = true
			r.log().Warn("jwks: fetch failed; every token of the issuer is rejected until a background fetch succeeds",
				"issuer", k.issuer, "jwks_uri", k.uri, "err", res.err)
		}
		// Another Inline may have stored it meanwhile; the newest result wins.
		r.entries[k] = &jwksEntry{keys: res.keys, lastRefreshed: now, lastUsed: now, timeout: timeouts[k]}
		out[k] = res.keys
	}
	r.mu.Unlock()
	if failed {
		select {
		case r.queued <- struct{}{}:
		default:
		}
	}
	for k, v := range out {
		if v == "" {
			out[k] = publicOnlyJWKS()
		}
	}
	return out
}

type fetchResult struct {
	keys string
	err  error
}

// fetchAll fetches the key sets of ks, at most maxParallelFetches at once, each with its
// timeout and retries.
func (r *JWKSResolver) fetchAll(ctx context.Context, ks []jwksKey, timeouts map[jwksKey]time.Duration, retries int) []fetchResult {
	out := make([]fetchResult, len(ks))
	sem := make(chan struct{}, maxParallelFetches)
	var wg sync.WaitGroup
	for i, k := range ks {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			keys, err := r.fetchKeys(ctx, k, timeouts[k], retries)
			out[i] = fetchResult{keys, err}
		}()
	}
	wg.Wait()
	return out
}

// fetchKeys fetches one key set: the issuer's discovery document first when the rule has
// no jwksUri. Each GET (with its retries) is bounded by timeout, as in istiod.
func (r *JWKSResolver) fetchKeys(ctx context.Context, k jwksKey, timeout time.Duration, retries int) (string, error) {
	uri := k.uri
	if uri == "" {
		doc, err := r.get(ctx, strings.TrimSuffix(k.issuer, "/")+openIDSuffix, timeout, retries)
		if err != nil {
			return "", err
		}
		var d map[string]any
		if err := json.Unmarshal(doc, &d); err != nil {
			return "", fmt.Errorf("openid discovery of %q: %w", k.issuer, err)
		}
		s, ok := d["jwks_uri"].(string)
		if !ok || s == "" {
			return "", fmt.Errorf("openid discovery of %q: no jwks_uri", k.issuer)
		}
		uri = s
	}
	body, err := r.get(ctx, uri, timeout, retries)
	if err != nil {
		return "", err
	}
	if err := checkJWKS(body); err != nil {
		return "", fmt.Errorf("%s: %w", uri, err)
	}
	return string(body), nil
}

// checkJWKS accepts a JSON object with a "keys" array; its keys are the proxies' business.
func checkJWKS(body []byte) error {
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(body, &doc); err != nil || doc == nil {
		return errors.New("not a JSON Web Key Set: not a JSON object")
	}
	var keys []json.RawMessage
	raw, ok := doc["keys"]
	if !ok {
		return errors.New(`not a JSON Web Key Set: no "keys"`)
	}
	if err := json.Unmarshal(raw, &keys); err != nil || keys == nil {
		return errors.New(`not a JSON Web Key Set: "keys" is not an array`)
	}
	return nil
}

// get GETs uri, retrying up to retries times RetryInterval apart, all within timeout.
func (r *JWKSResolver) get(ctx context.Context, uri string, timeout time.Duration, retries int) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for i := 0; ; i++ {
		b, err := r.getOnce(ctx, uri)
		if err == nil || i >= retries || errors.Is(err, ErrJWKSAddressBlocked) {
			return b, err
		}
		t := time.NewTimer(orDefault(r.RetryInterval, DefaultJWKSRetryInterval))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
	}
}

func (r *JWKSResolver) getOnce(ctx context.Context, uri string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, uri, nil)
	if err != nil {
		return nil, err
	}
	if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
		return nil, fmt.Errorf("%q: not an http or https URL", uri)
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxJWKSSize+1))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", uri, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		msg := string(body)
		if len(msg) > 100 {
			msg = msg[:100] + "..."
		}
		return nil, fmt.Errorf("GET %s: status %d: %q", uri, resp.StatusCode, msg)
	}
	if len(body) > MaxJWKSSize {
		return nil, fmt.Errorf("GET %s: larger than %d bytes", uri, MaxJWKSSize)
	}
	return body, nil
}

// Run refreshes the cached key sets until ctx ends, then returns nil. Run it once.
func (r *JWKSResolver) Run(ctx context.Context) error {
	r.init()
	interval := orDefault(r.RefreshInterval, DefaultJWKSRefreshInterval)
	lastFailed := false
	t := time.NewTimer(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.queued:
			// Only what has no keys yet; the schedule is left alone.
			r.Refresh(ctx, true)
		case <-t.C:
			failed := r.Refresh(ctx, false)
			interval = r.nextInterval(interval, failed, lastFailed)
			lastFailed = failed
			t.Reset(interval)
		}
	}
}

// nextInterval is the refresh schedule after a cycle.
func (r *JWKSResolver) nextInterval(cur time.Duration, failed, lastFailed bool) time.Duration {
	switch {
	case !failed:
		return orDefault(r.RefreshInterval, DefaultJWKSRefreshInterval)
	case !lastFailed:
		return orDefault(r.RefreshIntervalOnFailure, DefaultJWKSRefreshIntervalOnFailure)
	default:
		return min(cur*2, orDefault(r.MaxRefreshInterval, DefaultJWKSMaxRefreshInterval))
	}
}

// Refresh runs one refresh cycle (of only the key sets without keys when onlyMissing) and
// reports whether a fetch failed. Key sets past their eviction are dropped first. It calls
// OnChange when keys that are served changed. Run calls it; it blocks while it fetches.
func (r *JWKSResolver) Refresh(ctx context.Context, onlyMissing bool) (failed bool) {
	r.init()
	now := r.now()
	evict := orDefault(r.Eviction, DefaultJWKSEviction)
	var ks []jwksKey
	timeouts := map[jwksKey]time.Duration{}
	changed := false
	r.mu.Lock()
	for k, e := range r.entries {
		if onlyMissing && e.keys != "" {
			continue
		}
		used := e.lastUsed
		if r.inUse[k] {
			used = now // served by the config in force
		}
		if now.Sub(used) >= evict || now.Sub(e.lastRefreshed) >= evict {
			r.log().Info("jwks: dropped from the cache", "issuer", k.issuer, "jwks_uri", k.uri,
				"last_used", e.lastUsed, "last_refreshed", e.lastRefreshed)
			delete(r.entries, k)
			changed = changed || r.inUse[k]
			continue
		}
		ks = append(ks, k)
		timeouts[k] = e.timeout
	}
	r.mu.Unlock()
	sort.Slice(ks, func(i, j int) bool { return ks[i].issuer+" "+ks[i].uri < ks[j].issuer+" "+ks[j].uri })

	retries := r.Retries
	switch {
	case retries == 0:
		retries = DefaultJWKSRetries
	case retries < 0:
		retries = 0
	}
	results := r.fetchAll(ctx, ks, timeouts, retries)
	now = r.now()
	r.mu.Lock()
	for i, k := range ks {
		res := results[i]
		e := r.entries[k]
		if res.err != nil {
			failed = true
			r.log().Warn("jwks: refresh failed; the last good keys, if any, stay in use", "issuer", k.issuer, "jwks_uri", k.uri,
				"has_keys", e != nil && e.keys != "", "err", res.err)
			continue
		}
		if e == nil {
			continue // dropped meanwhile
		}
		e.lastRefreshed = now
		if !sameJWKS(e.keys, res.keys) {
			r.log().Info("jwks: keys changed", "issuer", k.issuer, "jwks_uri", k.uri)
			e.keys = res.keys
			changed = changed || r.inUse[k]
		}
	}
	r.mu.Unlock()
	if changed && r.OnChange != nil {
		r.OnChange()
	}
	return failed
}

// sameJWKS reports whether two key sets hold the same keys in any order: istiod compares
// them sorted by kid.
func sameJWKS(a, b string) bool {
	if a == b {
		return true
	}
	ka, ok1 := sortedKeys(a)
	kb, ok2 := sortedKeys(b)
	return ok1 && ok2 && reflect.DeepEqual(ka, kb)
}

// sortedKeys returns the members of a JWKS's "keys" ordered by kid, then by their JSON.
func sortedKeys(s string) ([]any, bool) {
	var m map[string]any
	if s == "" || json.Unmarshal([]byte(s), &m) != nil {
		return nil, false
	}
	keys, ok := m["keys"].([]any)
	if !ok {
		return nil, false
	}
	type entry struct {
		kid, enc string
		v        any
	}
	es := make([]entry, len(keys))
	for i, k := range keys {
		kid := ""
		if km, ok := k.(map[string]any); ok {
			kid, _ = km["kid"].(string)
		}
		enc, _ := json.Marshal(k)
		es[i] = entry{kid, string(enc), k}
	}
	sort.Slice(es, func(i, j int) bool {
		if es[i].kid != es[j].kid {
			return es[i].kid < es[j].kid
		}
		return es[i].enc < es[j].enc
	})
	for i := range es {
		keys[i] = es[i].v
	}
	return keys, true
}

// publicOnlyJWKS is the key served for a key set that could not be fetched: an RSA public
// key whose private key was discarded when it was made, so no token verifies against it.
var publicOnlyJWKS = sync.OnceValue(func() string {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	enc := base64.RawURLEncoding
	e := big.NewInt(int64(k.E)).Bytes()
	return `{"keys":[{"kty":"RSA","e":"` + enc.EncodeToString(e) + `","n":"` + enc.EncodeToString(k.N.Bytes()) + `"}]}`
})

// withKeys returns cfg with its RequestAuthentications' keys inline when s.JWKS is set.
func (s *ConfigServer) withKeys(cfg *Config) *Config {
	if s.JWKS == nil || cfg == nil {
		return cfg
	}
	c := *cfg
	c.Policies = s.JWKS.Inline(cfg.Policies)
	return &c
}

// Republish publishes again the config Set was last given, with the keys JWKS holds now:
// the JWKSResolver's OnChange. It does nothing before the first Set or after Close.
func (s *ConfigServer) Republish() {
	s.init()
	s.pub.Lock()
	defer s.pub.Unlock()
	if s.pub.last == nil {
		return
	}
	v, err := s.set(s.withKeys(s.pub.last))
	switch {
	case errors.Is(err, ErrClosed):
	case err != nil:
		for _, e := range unjoin(err) {
			s.log().Warn("config: object not served", "err", e)
		}
	default:
		s.log().Info("config: published again with new JWKS keys", "version", v)
	}
}
