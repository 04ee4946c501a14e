package controller

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/veilmesh/veil/api"
	"github.com/veilmesh/veil/policy"
	"google.golang.org/protobuf/proto"
)

const (
	keysV1 = `{"keys":[{"kty":"oct","kid":"a","k":"c2VjcmV0LWE"},{"kty":"oct","kid":"b","k":"c2VjcmV0LWI"}]}`
	// keysV1Reordered holds the keys of keysV1 in another order.
	keysV1Reordered = `{"keys":[{"kid":"b","kty":"oct","k":"c2VjcmV0LWI"},{"kty":"oct","kid":"a","k":"c2VjcmV0LWE"}]}`
	keysV2          = `{"keys":[{"kty":"oct","kid":"c","k":"c2VjcmV0LWM"}]}`
)

// keyServer is a JWKS server on 127.0.0.1 whose answer tests change, counting requests and
// connections.
type keyServer struct {
	*httptest.Server
	mu     sync.Mutex
	status int
	body   string
	delay  time.Duration
	hits   atomic.Int32
	conns  atomic.Int32
}

func newKeyServer(t *testing.T, body string) *keyServer {
	t.Helper()
	ks := &keyServer{status: 200, body: body}
	ks.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ks.hits.Add(1)
		ks.mu.Lock()
		status, body, delay := ks.status, ks.body, ks.delay
		ks.mu.Unlock()
		if delay > 0 {
			select {
			case <-time.After(delay):
			case <-r.Context().Done():
				return
			}
		}
		if r.URL.Path == "/.well-known/openid-configuration" {
			json.NewEncoder(w).Encode(map[string]string{"jwks_uri": ks.URL + "/jwks.json"})
			return
		}
		w.WriteHeader(status)
		io.WriteString(w, body)
	}))
	ks.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			ks.conns.Add(1)
		}
	}
	ks.Start()
	t.Cleanup(ks.Close)
	return ks
}

func (ks *keyServer) set(status int, body string) {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	ks.status, ks.body = status, body
}

// raDoc is a RequestAuthentication with one rule per line of rules (YAML flow mappings).
func raDoc(name string, rules ...string) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: %s, namespace: ns}
spec:
  jwtRules:
  - %s
`, name, strings.Join(rules, "\n  - "))
}

func parsePolicies(t *testing.T, docs ...string) []*policy.Object {
	t.Helper()
	m := policy.Parse("test.yaml", []byte(strings.Join(docs, "\n---\n")))
	if len(m.Errors) > 0 {
		t.Fatal(m.Errors)
	}
	for _, o := range m.Objects {
		if _, err := policy.Validate(o, policy.Options{}); err != nil {
			t.Fatal(err)
		}
	}
	return m.Objects
}

// jwksOfRules returns the jwks of every rule of the RequestAuthentications in objs.
func jwksOfRules(objs []*policy.Object) (out []string) {
	for _, o := range objs {
		if o.RequestAuthentication == nil {
			continue
		}
		for _, r := range o.RequestAuthentication.JwtRules {
			out = append(out, r.Jwks)
		}
	}
	return out
}

func TestJWKSInline(t *testing.T) {
	ks := newKeyServer(t, keysV1)
	uri := ks.URL + "/jwks.json"
	objs := parsePolicies(t,
		raDoc("two-rules", "{issuer: https://a.example, jwksUri: '"+uri+"'}", "{issuer: https://b.example, jwksUri: '"+uri+"', timeout: 2s}"),
		raDoc("same-key", "{issuer: https://a.example, jwksUri: '"+uri+"'}"),
		raDoc("inline", `{issuer: https://c.example, jwks: '{"keys":[]}'}`),
		"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap, namespace: ns}\nspec: {}")
	before := make([]proto.Message, len(objs))
	for i, o := range objs {
		if o.RequestAuthentication != nil {
			before[i] = proto.Clone(o.RequestAuthentication)
		}
	}
	r := &JWKSResolver{}
	out := r.Inline(objs)
	if got := jwksOfRules(out); strings.Join(got, "|") != strings.Join([]string{keysV1, keysV1, keysV1, `{"keys":[]}`}, "|") {
		t.Fatalf("jwks %q", got)
	}
	for i, o := range out {
		if before[i] != nil && !proto.Equal(before[i], objs[i].RequestAuthentication) {
			t.Fatalf("%s: the input was modified", objs[i].Key())
		}
		if o.RequestAuthentication != nil {
			for _, rule := range o.RequestAuthentication.JwtRules {
				if rule.JwksUri != "" {
					t.Fatalf("%s: jwksUri kept next to jwks", o.Key())
				}
			}
			if _, err := policy.Validate(o, policy.Options{}); err != nil {
				t.Fatalf("the pushed object does not validate: %v", err)
			}
		}
	}
	if out[2] != objs[2] || out[3] != objs[3] {
		t.Fatal("objects without rules to resolve were copied")
	}
	// (a.example, uri) and (b.example, uri) are two cache entries, each fetched once.
	if n := ks.hits.Load(); n != 2 {
		t.Fatalf("%d fetches, want 2", n)
	}
	r.Inline(objs)
	if n := ks.hits.Load(); n != 2 {
		t.Fatalf("%d fetches after a second Inline, want 2 (cached)", n)
	}
}

func TestJWKSInlineOpenIDDiscovery(t *testing.T) {
	ks := newKeyServer(t, keysV1)
	// The issuer's trailing slash is dropped before the well-known path is added.
	out := (&JWKSResolver{}).Inline(parsePolicies(t, raDoc("ra", "{issuer: '"+ks.URL+"/'}")))
	if got := jwksOfRules(out); len(got) != 1 || got[0] != keysV1 {
		t.Fatalf("jwks %q", got)
	}
}

func TestJWKSInlineFailuresRejectEveryToken(t *testing.T) {
	pub := publicOnlyJWKS()
	var k struct {
		Keys []map[string]string
	}
	if err := json.Unmarshal([]byte(pub), &k); err != nil || len(k.Keys) != 1 || k.Keys[0]["kty"] != "RSA" || k.Keys[0]["n"] == "" || k.Keys[0]["d"] != "" || k.Keys[0]["kid"] != "" {
		t.Fatalf("public-only JWKS %s", pub)
	}
	closed := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return "http://" + l.Addr().String() + "/jwks.json"
	}()
	for _, tc := range []struct {
		name   string
		status int
		body   string
		uri    string
	}{
		{name: "status 500", status: 500, body: keysV1},
		{name: "status 302 without location", status: 302, body: keysV1},
		{name: "not JSON", status: 200, body: "<html>"},
		{name: "no keys", status: 200, body: `{"issuer":"x"}`},
		{name: "keys not an array", status: 200, body: `{"keys":{}}`},
		{name: "null", status: 200, body: `null`},
		{name: "too large", status: 200, body: `{"keys":[],"pad":"` + strings.Repeat("x", MaxJWKSSize) + `"}`},
		{name: "connection refused", uri: closed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			uri := tc.uri
			if uri == "" {
				ks := newKeyServer(t, tc.body)
				ks.set(tc.status, tc.body)
				uri = ks.URL + "/jwks.json"
			}
			out := (&JWKSResolver{}).Inline(parsePolicies(t, raDoc("ra", "{issuer: https://a.example, jwksUri: '"+uri+"'}")))
			if got := jwksOfRules(out); len(got) != 1 || got[0] != pub {
				t.Fatalf("jwks %q, want the public-only key", got)
			}
		})
	}
	t.Run("timeout, fetches in parallel", func(t *testing.T) {
		var rules []string
		for i := range 3 {
			ks := newKeyServer(t, keysV1)
			ks.delay = 5 * time.Second
			rules = append(rules, fmt.Sprintf("{issuer: https://%d.example, jwksUri: '%s/jwks.json', timeout: 0.3s}", i, ks.URL))
		}
		start := time.Now()
		out := (&JWKSResolver{}).Inline(parsePolicies(t, raDoc("ra", rules...)))
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("Inline took %v with three 300ms timeouts", d)
		}
		for _, got := range jwksOfRules(out) {
			if got != pub {
				t.Fatalf("jwks %q, want the public-only key", got)
			}
		}
	})
}

// runResolver runs r until the test ends.
func runResolver(t *testing.T, r *JWKSResolver) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

func TestJWKSBackgroundFetchAfterFailure(t *testing.T) {
	ks := newKeyServer(t, keysV1)
	ks.set(503, "unavailable")
	changed := make(chan struct{}, 10)
	r := &JWKSResolver{RefreshInterval: time.Hour, Retries: 50, RetryInterval: 20 * time.Millisecond,
		OnChange: func() { changed <- struct{}{} }}
	objs := parsePolicies(t, raDoc("ra", "{issuer: https://a.example, jwksUri: '"+ks.URL+"/jwks.json'}"))
	if got := jwksOfRules(r.Inline(objs)); got[0] != publicOnlyJWKS() {
		t.Fatalf("jwks %q", got)
	}
	runResolver(t, r) // the failure queued a background fetch
	time.Sleep(100 * time.Millisecond)
	ks.set(200, keysV1)
	select {
	case <-changed:
	case <-time.After(5 * time.Second):
		t.Fatal("no OnChange after the JWKS server recovered")
	}
	if got := jwksOfRules(r.Inline(objs)); got[0] != keysV1 {
		t.Fatalf("jwks %q after recovery", got)
	}
}

func TestJWKSRefresh(t *testing.T) {
	ks := newKeyServer(t, keysV1)
	var changes atomic.Int32
	r := &JWKSResolver{Retries: 2, RetryInterval: 10 * time.Millisecond, OnChange: func() { changes.Add(1) }}
	objs := parsePolicies(t, raDoc("ra", "{issuer: https://a.example, jwksUri: '"+ks.URL+"/jwks.json'}"))
	current := func() string { return jwksOfRules(r.Inline(objs))[0] }
	if current() != keysV1 {
		t.Fatal("first fetch")
	}
	ctx := context.Background()

	ks.set(200, keysV1Reordered)
	if r.Refresh(ctx, false) || changes.Load() != 0 {
		t.Fatalf("the same keys in another order: changes %d", changes.Load())
	}
	ks.set(200, keysV2)
	if r.Refresh(ctx, false) || changes.Load() != 1 || current() != keysV2 {
		t.Fatalf("new keys: changes %d, served %s", changes.Load(), current())
	}
	ks.set(500, "")
	hits := ks.hits.Load()
	if !r.Refresh(ctx, false) {
		t.Fatal("a failing refresh reported no failure")
	}
	if n := ks.hits.Load() - hits; n != 3 {
		t.Fatalf("%d attempts, want 1 + 2 retries", n)
	}
	if changes.Load() != 1 || current() != keysV2 {
		t.Fatalf("after a failed refresh: changes %d, served %s; want the last good keys", changes.Load(), current())
	}
	ks.set(200, `{"keys":"x"}`)
	if !r.Refresh(ctx, false) || current() != keysV2 {
		t.Fatal("a refresh returning something that is not a JWKS replaced the keys")
	}
	// Only the key sets without keys are fetched on the push path's queue.
	hits = ks.hits.Load()
	r.Refresh(ctx, true)
	if ks.hits.Load() != hits {
		t.Fatal("a queued fetch fetched a key set that has keys")
	}
}

func TestJWKSRefreshSchedule(t *testing.T) {
	r := &JWKSResolver{}
	cur := DefaultJWKSRefreshInterval
	var got []time.Duration
	last := false
	for _, failed := range []bool{true, true, true, true, true, true, true, true, false, true, false} {
		cur = r.nextInterval(cur, failed, last)
		last = failed
		got = append(got, cur)
	}
	want := []time.Duration{time.Minute, 2 * time.Minute, 4 * time.Minute, 8 * time.Minute, 16 * time.Minute, 32 * time.Minute,
		time.Hour, time.Hour, 20 * time.Minute, time.Minute, 20 * time.Minute}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("intervals %v, want %v", got, want)
	}

	t.Run("Run follows it", func(t *testing.T) {
		ks := newKeyServer(t, keysV1)
		r := &JWKSResolver{RefreshInterval: 40 * time.Millisecond, RefreshIntervalOnFailure: time.Hour, Retries: -1}
		r.Inline(parsePolicies(t, raDoc("ra", "{issuer: https://a.example, jwksUri: '"+ks.URL+"/jwks.json'}")))
		runResolver(t, r)
		waitFor(t, "three refreshes", func() bool { return ks.hits.Load() >= 4 })
		ks.set(500, "")
		n := ks.hits.Load()
		waitFor(t, "a failed refresh", func() bool { return ks.hits.Load() > n })
		n = ks.hits.Load()
		time.Sleep(300 * time.Millisecond)
		if m := ks.hits.Load(); m != n {
			t.Fatalf("%d refreshes within 300ms after a failed one; the next is due in an hour", m-n)
		}
	})
}

func TestJWKSEviction(t *testing.T) {
	a, b := newKeyServer(t, keysV1), newKeyServer(t, keysV2)
	now := time.Now()
	var changes atomic.Int32
	r := &JWKSResolver{Retries: -1, Now: func() time.Time { return now }, OnChange: func() { changes.Add(1) }}
	ruleA := "{issuer: https://a.example, jwksUri: '" + a.URL + "/jwks.json'}"
	ruleB := "{issuer: https://b.example, jwksUri: '" + b.URL + "/jwks.json'}"
	r.Inline(parsePolicies(t, raDoc("ra", ruleA, ruleB)))
	onlyA := parsePolicies(t, raDoc("ra", ruleA))
	r.Inline(onlyA) // b is no longer served

	now = now.Add(DefaultJWKSEviction - time.Minute)
	r.Refresh(context.Background(), false)
	if len(r.entries) != 2 {
		t.Fatalf("%d entries before the eviction time, want 2", len(r.entries))
	}
	// a is served, so in use, and refreshes; b is not and goes.
	now = now.Add(2 * time.Minute)
	r.Refresh(context.Background(), false)
	if _, ok := r.entries[jwksKey{"https://b.example", b.URL + "/jwks.json"}]; ok || len(r.entries) != 1 || changes.Load() != 0 {
		t.Fatalf("entries %v, changes %d: want only a's, no push", r.entries, changes.Load())
	}
	// a stops refreshing: a week later it goes too, and the config is pushed again.
	a.set(500, "")
	now = now.Add(DefaultJWKSEviction)
	r.Refresh(context.Background(), false)
	if len(r.entries) != 0 || changes.Load() != 1 {
		t.Fatalf("entries %v, changes %d: want none, one push", r.entries, changes.Load())
	}
	if got := jwksOfRules(r.Inline(onlyA)); got[0] != publicOnlyJWKS() {
		t.Fatalf("served %q after eviction while the server fails", got)
	}
}

func TestJWKSBlockedAddresses(t *testing.T) {
	r := &JWKSResolver{BlockedCIDRs: []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}}
	for addr, blocked := range map[string]bool{
		"169.254.169.254":        true,
		"169.254.1.1":            true,
		"fe80::1":                true,
		"::ffff:169.254.169.254": true,
		"64:ff9b::a9fe:a9fe":     true, // NAT64 of 169.254.169.254
		"100.100.100.200":        true,
		"fd00:ec2::254":          true,
		"10.96.0.10":             true,
		"10.0.0.1":               false,
		"127.0.0.1":              false,
		"192.168.1.1":            false,
		"2001:db8::1":            false,
	} {
		err := r.Blocked(netip.MustParseAddr(addr))
		if (err != nil) != blocked || (err != nil && !errors.Is(err, ErrJWKSAddressBlocked)) {
			t.Errorf("%s: %v, want blocked %v", addr, err, blocked)
		}
	}

	t.Run("the address dialled is checked", func(t *testing.T) {
		ks := newKeyServer(t, keysV1)
		_, port, _ := net.SplitHostPort(ks.Listener.Addr().String())
		r := &JWKSResolver{BlockedCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}}
		r.init()
		// By address, and by a name that resolves to it.
		for _, uri := range []string{ks.URL + "/jwks.json", "http://localhost:" + port + "/jwks.json"} {
			_, err := r.fetchKeys(context.Background(), jwksKey{"https://a.example", uri}, time.Second, 0)
			if !errors.Is(err, ErrJWKSAddressBlocked) {
				t.Errorf("%s: %v, want blocked", uri, err)
			}
		}
		if n := ks.conns.Load(); n != 0 {
			t.Fatalf("the server saw %d connections", n)
		}
	})
	t.Run("redirects are checked", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.2:0")
		if err != nil {
			t.Fatalf("cannot listen on 127.0.0.2 (Linux routes all of 127.0.0.0/8 to lo): %v", err)
		}
		target := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, keysV1) }))
		target.Listener.Close()
		target.Listener = l
		var conns atomic.Int32
		target.Config.ConnState = func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				conns.Add(1)
			}
		}
		target.Start()
		defer target.Close()
		redirect := httptest.NewServer(http.RedirectHandler(target.URL+"/jwks.json", http.StatusFound))
		defer redirect.Close()
		r := &JWKSResolver{}
		out := r.Inline(parsePolicies(t, raDoc("ra", "{issuer: https://a.example, jwksUri: '"+redirect.URL+"'}")))
		if got := jwksOfRules(out); got[0] != keysV1 {
			t.Fatalf("an allowed redirect: %q", got)
		}
		conns.Store(0)
		r = &JWKSResolver{BlockedCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}}
		out = r.Inline(parsePolicies(t, raDoc("ra", "{issuer: https://a.example, jwksUri: '"+redirect.URL+"'}")))
		if got := jwksOfRules(out); got[0] != publicOnlyJWKS() || conns.Load() != 0 {
			t.Fatalf("a redirect to a blocked address: jwks %q, %d connections", got, conns.Load())
		}
	})
}

func TestJWKSTLS(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, keysV1) }))
	defer srv.Close()
	objs := parsePolicies(t, raDoc("ra", "{issuer: https://a.example, jwksUri: '"+srv.URL+"/jwks.json'}"))
	if got := jwksOfRules((&JWKSResolver{}).Inline(objs)); got[0] != publicOnlyJWKS() {
		t.Fatal("a server the roots do not vouch for was trusted")
	}
	file := filepath.Join(t.TempDir(), "extra.pem")
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	pool, err := JWKSRoots(file)
	if err != nil {
		t.Fatal(err)
	}
	if got := jwksOfRules((&JWKSResolver{RootCAs: pool}).Inline(objs)); got[0] != keysV1 {
		t.Fatalf("with the extra roots: %q", got)
	}
	if got := jwksOfRules((&JWKSResolver{InsecureSkipVerify: true}).Inline(objs)); got[0] != keysV1 {
		t.Fatalf("insecure: %q", got)
	}
	if _, err := JWKSRoots(filepath.Join(t.TempDir(), "missing.pem")); err == nil {
		t.Fatal("a missing roots file was accepted")
	}
	empty := filepath.Join(t.TempDir(), "empty.pem")
	os.WriteFile(empty, []byte("no certificates"), 0o600)
	if _, err := JWKSRoots(empty); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Fatalf("a roots file without certificates: %v", err)
	}
}

// pushedJWKS returns the jwks of the rules of RequestAuthentication ns/name in push p.
func pushedJWKS(t *testing.T, p *api.Push, name string) []string {
	t.Helper()
	for _, r := range p.Resources {
		_, d, err := r.Decode()
		if err != nil {
			t.Fatal(err)
		}
		if d.Policy != nil && d.Policy.Kind == policy.KindRequestAuthentication && d.Policy.Name == name {
			if _, err := policy.Validate(d.Policy, policy.Options{}); err != nil {
				t.Fatalf("the pushed RequestAuthentication does not validate: %v", err)
			}
			return jwksOfRules([]*policy.Object{d.Policy})
		}
	}
	t.Fatalf("push %d has no RequestAuthentication %s (keys %v)", p.Version, name, keys(p))
	return nil
}

// TestConfigServerInlinesJWKS: what agents and waypoints receive carries the keys the
// controller fetched; a failing JWKS server gives keys that reject every token; when it
// recovers, the good keys are pushed.
func TestConfigServerInlinesJWKS(t *testing.T) {
	good := newKeyServer(t, keysV1)
	failing := newKeyServer(t, keysV2)
	failing.set(503, "")
	res := &JWKSResolver{RefreshInterval: 50 * time.Millisecond, RefreshIntervalOnFailure: 50 * time.Millisecond, Retries: -1}
	cfg := &ConfigServer{JWKS: res}
	res.OnChange = cfg.Republish
	s := startStreamServer(t, cfg)
	runResolver(t, res)
	if _, err := cfg.Set(testConfig(t,
		raDoc("good", "{issuer: https://a.example, jwksUri: '"+good.URL+"/jwks.json'}"),
		raDoc("failing", "{issuer: https://b.example, jwksUri: '"+failing.URL+"/jwks.json'}"))); err != nil {
		t.Fatal(err)
	}
	sub, err := s.subscribe(t, testTokens["node-1"], &api.Subscribe{Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	p := sub.recv()
	if got := pushedJWKS(t, p, "good"); got[0] != keysV1 {
		t.Fatalf("good: pushed %q", got)
	}
	if got := pushedJWKS(t, p, "failing"); got[0] != publicOnlyJWKS() {
		t.Fatalf("failing: pushed %q, want the public-only key", got)
	}
	sub.ack(p)

	failing.set(200, keysV2)
	p = sub.recv()
	if p.Full || len(p.Resources) != 1 {
		t.Fatalf("push %d: full %v, %v; want a delta of the recovered RequestAuthentication", p.Version, p.Full, keys(p))
	}
	if got := pushedJWKS(t, p, "failing"); got[0] != keysV2 {
		t.Fatalf("after recovery: pushed %q", got)
	}
	sub.ack(p)

	// A key rotation is pushed too.
	good.set(200, keysV2)
	p = sub.recv()
	if got := pushedJWKS(t, p, "good"); got[0] != keysV2 {
		t.Fatalf("after rotation: pushed %q", got)
	}
	sub.ack(p)
}
