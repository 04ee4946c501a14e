package jwtauth

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/controller"
	"github.com/veilmesh/veil/policy"
)

// jwksServer serves a JWKS at /jwks.json and an OpenID discovery document pointing at it,
// on 127.0.0.1; /bad serves something that is not a JWKS.
func jwksServer(t *testing.T, jwks string) *httptest.Server {
	t.Helper()
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/jwks.json":
			io.WriteString(w, jwks)
		case "/.well-known/openid-configuration":
			json.NewEncoder(w).Encode(map[string]string{"issuer": srv.URL, "jwks_uri": srv.URL + "/jwks.json"})
		case "/bad":
			io.WriteString(w, "<html>not keys</html>")
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// closedURL is an http URL on 127.0.0.1 where nothing listens.
func closedURL(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return "http://" + addr + "/jwks.json"
}

// waypointServer is an HTTP server on 127.0.0.1 doing what a waypoint does with a request:
// RequestAuthentication, then, when cw is set, the workload's authorization; a request
// that passes is answered as the backend would, with the headers it received (JSON).
func waypointServer(t *testing.T, a *Authenticator, cw *policy.CompiledWorkload) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		jwt, f := a.Authenticate(r, time.Now())
		if f != nil {
			f.ServeHTTP(w, r)
			return
		}
		if cw != nil {
			hdrs := map[string][]string{}
			for k, v := range r.Header {
				hdrs[strings.ToLower(k)] = v
			}
			d := cw.EvaluateHTTP(&policy.Request{Method: r.Method, Path: r.URL.RequestURI(), Host: r.Host, Headers: hdrs, JWT: jwt})
			if !d.Allowed() {
				w.Header().Set("Content-Type", "text/plain")
				w.WriteHeader(http.StatusForbidden)
				io.WriteString(w, "RBAC: access denied")
				return
			}
		}
		json.NewEncoder(w).Encode(r.Header)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// resolved runs the controller's JWKS resolver over the objects, as before a push.
func resolved(t *testing.T, objs []*policy.Object) []*policy.Object {
	t.Helper()
	out := (&controller.JWKSResolver{Retries: -1}).Inline(objs)
	for _, o := range out {
		if _, err := policy.Validate(o, policy.Options{}); err != nil {
			t.Fatalf("the resolved object does not validate: %v", err)
		}
	}
	return out
}

// call sends a request to srv and returns the status, body and the backend's view of the
// headers (nil unless 200).
func call(t *testing.T, srv *httptest.Server, method, target string, hdr ...string) (int, string, http.Header) {
	t.Helper()
	r, err := http.NewRequest(method, srv.URL+target, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Add(hdr[i], hdr[i+1])
	}
	resp, err := srv.Client().Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var seen http.Header
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(b, &seen); err != nil {
			t.Fatalf("backend answer %q: %v", b, err)
		}
	}
	return resp.StatusCode, string(b), seen
}

// TestScenarios runs ISTIO-SEMANTICS §3.8 scenarios 1-6 and 8-11 through real HTTP servers:
// keys fetched by the controller's resolver from a JWKS server, a waypoint-like server
// authenticating requests from a real client.
func TestScenarios(t *testing.T) {
	rs := tkey("RS256")
	keys := jwksServer(t, jwksOf(t, rs, tkey("ES256")))
	now := time.Now().Unix()
	nested := map[string]any{"nested-2": map[string]any{"key2": "value2"}}
	valid := sign(t, rs, claims(iss1, "alice", "nested", nested, "aud", []string{"foo", "bar"}))
	expired := sign(t, rs, claims(iss1, "alice", "exp", now-3600, "iat", now-7200))
	issuer2 := sign(t, rs, claims("https://issuer-2.example", "bob"))
	rule := func(extra string) string {
		return "- issuer: " + iss1 + "\n  jwksUri: " + keys.URL + "/jwks.json\n" + extra
	}
	outputs := `  outputPayloadToHeader: x-test-payload
  outputClaimToHeaders:
  - {header: x-jwt-iss, claim: iss}
  - {header: x-jwt-iat, claim: iat}
  - {header: x-jwt-nested-claim, claim: nested.nested-2.key2}`
	a := mustNew(t, resolved(t, objects(t, raYAML("ra", rule(outputs)))))
	srv := waypointServer(t, a, nil)

	t.Run("1 valid token", func(t *testing.T) {
		code, body, seen := call(t, srv, "GET", "/headers", "Authorization", "Bearer "+valid)
		if code != 200 {
			t.Fatalf("%d %s", code, body)
		}
		if seen.Get("Authorization") != "" {
			t.Error("Authorization reached the backend")
		}
		iat := claimString(parseClaims(t, valid), []string{"iat"})
		for h, want := range map[string]string{"X-Test-Payload": strings.Split(valid, ".")[1], "X-Jwt-Iss": iss1, "X-Jwt-Iat": iat, "X-Jwt-Nested-Claim": "value2"} {
			if got := seen.Get(h); got != want {
				t.Errorf("%s = %q, want %q", h, got, want)
			}
		}
	})
	t.Run("2 expired token", func(t *testing.T) {
		if code, body, _ := call(t, srv, "GET", "/", "Authorization", "Bearer "+expired); code != 401 || body != "Jwt is expired" {
			t.Fatalf("%d %q", code, body)
		}
	})
	t.Run("3 no token", func(t *testing.T) {
		if code, body, _ := call(t, srv, "GET", "/"); code != 200 {
			t.Fatalf("%d %q", code, body)
		}
	})
	t.Run("4 CORS preflight", func(t *testing.T) {
		if code, body, _ := call(t, srv, "OPTIONS", "/", "Authorization", "Bearer "+expired, "Origin", "https://app.example", "Access-Control-Request-Method", "GET"); code != 200 {
			t.Fatalf("preflight: %d %q", code, body)
		}
		if code, body, _ := call(t, srv, "OPTIONS", "/", "Authorization", "Bearer "+expired, "Access-Control-Request-Method", "GET"); code != 401 || body != "Jwt is expired" {
			t.Fatalf("without Origin: %d %q", code, body)
		}
	})
	t.Run("5 with an ALLOW requiring a request principal", func(t *testing.T) {
		objs := resolved(t, objects(t, `apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: ns}
spec:
  selector: {matchLabels: {app: httpbin}}
  jwtRules:
`+indent(rule(""), "  ")+`
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: ns}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from:
    - source: {requestPrincipals: ["*"]}
`))
		w := &policy.Workload{Namespace: "ns", Name: "httpbin", Labels: map[string]string{"app": "httpbin"}, ServiceAccount: "httpbin"}
		snap := policy.Compile(objs, []*policy.Workload{w}, policy.Options{})
		cw := snap.Workload("ns", "httpbin")
		a := mustNew(t, cw.RequestAuthenticationsFor(policy.ServiceRef{}))
		srv := waypointServer(t, a, cw)
		for _, tc := range []struct {
			name, token string
			code        int
			body        string
		}{
			{"valid", valid, 200, ""},
			{"expired", expired, 401, "Jwt is expired"},
			{"none", "", 403, "RBAC: access denied"},
		} {
			var hdr []string
			if tc.token != "" {
				hdr = []string{"Authorization", "Bearer " + tc.token}
			}
			code, body, _ := call(t, srv, "GET", "/", hdr...)
			if code != tc.code || (tc.body != "" && body != tc.body) {
				t.Errorf("%s: %d %q, want %d %q", tc.name, code, body, tc.code, tc.body)
			}
		}
	})
	t.Run("6 forwardOriginalToken", func(t *testing.T) {
		a := mustNew(t, resolved(t, objects(t, raYAML("ra", rule("  forwardOriginalToken: true")))))
		code, body, seen := call(t, waypointServer(t, a, nil), "GET", "/", "Authorization", "Bearer "+valid)
		if code != 200 || seen.Get("Authorization") != "Bearer "+valid {
			t.Fatalf("%d %q; backend saw Authorization %q", code, body, seen.Get("Authorization"))
		}
	})
	t.Run("8 audiences", func(t *testing.T) {
		a := mustNew(t, resolved(t, objects(t, raYAML("ra", rule("  audiences: [foo]")))))
		srv := waypointServer(t, a, nil)
		noFoo := sign(t, rs, claims(iss1, "alice", "aud", "bar"))
		if code, body, _ := call(t, srv, "GET", "/", "Authorization", "Bearer "+noFoo); code != 403 || body != "Audiences in Jwt are not allowed" {
			t.Fatalf("without foo: %d %q", code, body)
		}
		if code, body, _ := call(t, srv, "GET", "/", "Authorization", "Bearer "+valid); code != 200 {
			t.Fatalf("with foo: %d %q", code, body)
		}
	})
	t.Run("9 unreachable or invalid jwksUri", func(t *testing.T) {
		for name, uri := range map[string]string{"unreachable": closedURL(t), "not a JWKS": keys.URL + "/bad", "404": keys.URL + "/nothing"} {
			objs := objects(t, raYAML("ra", "- issuer: "+iss1+"\n  jwksUri: "+uri))
			a := mustNew(t, resolved(t, objs))
			srv := waypointServer(t, a, nil)
			for _, tc := range []struct {
				what, token string
				code        int
				body        string
			}{
				{"valid", valid, 401, "Jwt verification fails"},
				{"expired", expired, 401, "Jwt is expired"},
				{"none", "", 200, ""},
			} {
				var hdr []string
				if tc.token != "" {
					hdr = []string{"Authorization", "Bearer " + tc.token}
				}
				code, body, _ := call(t, srv, "GET", "/", hdr...)
				if code != tc.code || (tc.code != 200 && body != tc.body) {
					t.Errorf("%s: %s token: %d %q, want %d %q", name, tc.what, code, body, tc.code, tc.body)
				}
			}
		}
	})
	t.Run("10 issuer not configured at that location", func(t *testing.T) {
		if code, body, _ := call(t, srv, "GET", "/", "Authorization", "Bearer "+issuer2); code != 401 || body != "Jwt issuer is not configured" {
			t.Fatalf("%d %q", code, body)
		}
	})
	t.Run("11 Basic credentials are no token", func(t *testing.T) {
		code, body, seen := call(t, srv, "GET", "/", "Authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l")
		if code != 200 || seen.Get("Authorization") != "Basic YWxhZGRpbjpvcGVuc2VzYW1l" {
			t.Fatalf("%d %q", code, body)
		}
	})
	t.Run("keys from the issuer's OpenID discovery", func(t *testing.T) {
		objs := objects(t, raYAML("ra", "- issuer: "+keys.URL+"/"))
		a := mustNew(t, resolved(t, objs))
		tok := sign(t, rs, claims(keys.URL+"/", "carol"))
		if code, body, _ := call(t, waypointServer(t, a, nil), "GET", "/", "Authorization", "Bearer "+tok); code != 200 {
			t.Fatalf("%d %q", code, body)
		}
	})
}

func parseClaims(t *testing.T, tok string) map[string]any {
	t.Helper()
	p, s := parseToken(tok)
	if s != statusOK {
		t.Fatal(s)
	}
	return p.claims
}

// TestFailureResponse checks the bytes of a failure on the wire: Envoy's status, content
// type, WWW-Authenticate, and the body without a trailing newline.
func TestFailureResponse(t *testing.T) {
	a := rs256(t, "")
	srv := waypointServer(t, a, nil)
	expired := sign(t, tkey("RS256"), claims(iss1, "alice", "exp", time.Now().Unix()-3600))
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /status/200?a=b HTTP/1.1\r\nHost: httpbin.foo:8000\r\nAuthorization: Bearer "+expired+"\r\nConnection: close\r\n\r\n")
	raw, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(string(raw))), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 401 || resp.Header.Get("Content-Type") != "text/plain" || resp.Header.Get("Content-Length") != "14" ||
		resp.Header.Get("Www-Authenticate") != `Bearer realm="http://httpbin.foo:8000/status/200?a=b", error="invalid_token"` {
		t.Fatalf("response:\n%s", raw)
	}
	if !strings.HasSuffix(string(raw), "\r\n\r\nJwt is expired") {
		t.Fatalf("body is not exactly the status text:\n%q", raw)
	}
}
