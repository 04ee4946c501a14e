package jwtauth

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
)

var b64 = base64.RawURLEncoding.EncodeToString

func b64JSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b64(b)
}

const iss1 = "https://issuer-1.example"

// rs256 is an Authenticator for issuer-1 with the RS256 test key and extra rule YAML.
func rs256(t testing.TB, extra string) *Authenticator {
	t.Helper()
	rule := "- issuer: " + iss1 + "\n  " + inlineJWKS(jwksOf(t, tkey("RS256"))) + "\n" + extra
	return mustNew(t, objects(t, raYAML("ra", rule)))
}

// TestVerificationTable checks every row of ISTIO-SEMANTICS §3.5: the status, and the body
// Envoy sends (jwt_verify_lib's current text).
func TestVerificationTable(t *testing.T) {
	a := rs256(t, "  audiences: [foo]")
	now := time.Now().Unix()
	rs := tkey("RS256")
	hdr := b64JSON(map[string]any{"alg": "RS256", "kid": "RS256"})
	pl := b64JSON(claims(iss1, "alice", "aud", "foo"))
	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	forged := &testKey{alg: jwa.RS256, priv: other, kid: "RS256"}
	for _, tc := range []struct {
		name, token, want string
	}{
		{"valid", sign(t, rs, claims(iss1, "alice", "aud", "foo")), "ok " + iss1 + "/alice"},
		{"one section", "abc", "401 Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"},
		{"two sections", hdr + "." + pl, "401 Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"},
		{"four sections", hdr + "." + pl + ".c.d", "401 Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"},
		{"header not base64", "e!!." + pl + ".c2ln", "401 Jwt header is an invalid Base64url encoded"},
		{"header not JSON", b64([]byte("alg")) + "." + pl + ".c2ln", "401 Jwt header is an invalid JSON"},
		{"header a JSON array", b64([]byte(`["alg"]`)) + "." + pl + ".c2ln", "401 Jwt header is an invalid JSON"},
		{"alg missing", b64JSON(map[string]any{"typ": "JWT"}) + "." + pl + ".c2ln", "401 Jwt header [alg] field is required and must be a string"},
		{"alg not a string", b64JSON(map[string]any{"alg": 256}) + "." + pl + ".c2ln", "401 Jwt header [alg] field is required and must be a string"},
		{"alg none", b64JSON(map[string]any{"alg": "none"}) + "." + pl + ".c2ln", "401 Jwt header [alg] is not supported"},
		{"alg ES256K", b64JSON(map[string]any{"alg": "ES256K"}) + "." + pl + ".c2ln", "401 Jwt header [alg] is not supported"},
		{"kid not a string", b64JSON(map[string]any{"alg": "RS256", "kid": 1}) + "." + pl + ".c2ln", "401 Jwt header [kid] field is not a string"},
		{"payload not base64", hdr + ".$$$.c2ln", "401 Jwt payload is an invalid Base64url encoded"},
		{"payload not JSON", hdr + "." + b64([]byte("iss")) + ".c2ln", "401 Jwt payload is an invalid JSON"},
		{"iss not a string", hdr + "." + b64JSON(map[string]any{"iss": 1}) + ".c2ln", "401 Jwt payload [iss] field is not a string"},
		{"exp not a number", hdr + "." + b64JSON(map[string]any{"iss": iss1, "exp": "soon"}) + ".c2ln", "401 Jwt payload [exp] field is not an integer"},
		{"exp negative", hdr + "." + b64JSON(map[string]any{"iss": iss1, "exp": -1}) + ".c2ln", "401 Jwt payload [exp] field is not a positive 64 bit integer"},
		{"aud a number", hdr + "." + b64JSON(map[string]any{"iss": iss1, "aud": 1}) + ".c2ln", "401 Jwt payload [aud] field is not a string or string list"},
		{"signature not base64", hdr + "." + pl + ".+/+", "401 Jwt signature is an invalid Base64url encoded"},
		{"issuer not configured", sign(t, rs, claims("https://issuer-2.example", "alice", "aud", "foo")), "401 Jwt issuer is not configured"},
		{"nbf beyond the skew", sign(t, rs, claims(iss1, "alice", "aud", "foo", "nbf", now+61)), "401 Jwt not yet valid"},
		{"nbf within the skew", sign(t, rs, claims(iss1, "alice", "aud", "foo", "nbf", now+50)), "ok " + iss1 + "/alice"},
		{"exp beyond the skew", sign(t, rs, claims(iss1, "alice", "aud", "foo", "exp", now-70)), "401 Jwt is expired"},
		{"exp within the skew", sign(t, rs, claims(iss1, "alice", "aud", "foo", "exp", now-50)), "ok " + iss1 + "/alice"},
		{"no exp: no expiry", sign(t, rs, map[string]any{"iss": iss1, "sub": "alice", "aud": "foo"}), "ok " + iss1 + "/alice"},
		{"audience not allowed", sign(t, rs, claims(iss1, "alice", "aud", "bar")), "403 Audiences in Jwt are not allowed"},
		{"no audience", sign(t, rs, claims(iss1, "alice")), "403 Audiences in Jwt are not allowed"},
		{"audience in a list, with a scheme and a slash", sign(t, rs, claims(iss1, "alice", "aud", []string{"bar", "https://foo/"})), "ok " + iss1 + "/alice"},
		{"no key with that kid", sign(t, rs, claims(iss1, "alice", "aud", "foo"), map[string]any{"kid": "other"}), "401 Jwks doesn't have key to match kid or alg from Jwt"},
		{"key's alg differs", sign(t, tkey("RS384"), claims(iss1, "alice", "aud", "foo"), map[string]any{"kid": "RS256"}), "401 Jwks doesn't have key to match kid or alg from Jwt"},
		{"signature invalid", sign(t, forged, claims(iss1, "alice", "aud", "foo")), "401 Jwt verification fails"},
		{"signature of another token", hdr + "." + pl + "." + strings.Split(sign(t, rs, claims(iss1, "bob", "aud", "foo")), ".")[2], "401 Jwt verification fails"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := req("GET", "/path?x=1", "Authorization", "Bearer "+tc.token)
			j, f := a.Authenticate(r, time.Unix(now, 0))
			if got := outcome(j, f); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
			if f != nil && f.WWWAuthenticate != `Bearer realm="http://svc.ns/path?x=1", error="invalid_token"` {
				t.Fatalf("WWW-Authenticate %q", f.WWWAuthenticate)
			}
		})
	}
	t.Run("no token", func(t *testing.T) {
		if got := outcome(a.Authenticate(req("GET", "/"), time.Now())); got != "ok none" {
			t.Fatalf("got %q: a request without a token passes (allow_missing)", got)
		}
	})
}

// TestEveryAlgorithm: each algorithm Envoy supports verifies with a key of the right kind,
// given with and without kid and alg in the JWKS.
func TestEveryAlgorithm(t *testing.T) {
	algs := []string{"ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
	for _, alg := range algs {
		k := tkey(alg)
		bare := *k
		bare.noAlg, bare.kid = true, ""
		for name, jk := range map[string]*testKey{"kid and alg": k, "neither": &bare} {
			t.Run(alg+"/"+name, func(t *testing.T) {
				a := mustNew(t, objects(t, raYAML("ra", "- issuer: "+iss1+"\n  "+inlineJWKS(jwksOf(t, jk)))))
				tok := sign(t, k, claims(iss1, "alice"))
				if got := outcome(a.Authenticate(req("GET", "/", "Authorization", "Bearer "+tok), time.Now())); got != "ok "+iss1+"/alice" {
					t.Fatalf("got %q", got)
				}
				// The same token with its payload changed fails.
				parts := strings.Split(tok, ".")
				parts[1] = b64JSON(claims(iss1, "mallory"))
				if got := outcome(a.Authenticate(req("GET", "/", "Authorization", "Bearer "+strings.Join(parts, ".")), time.Now())); got != "401 Jwt verification fails" {
					t.Fatalf("tampered token: got %q", got)
				}
			})
		}
	}
}

// TestKeyMatching: kid and alg select the keys tried (§3.5); the key's type picks the
// algorithm.
func TestKeyMatching(t *testing.T) {
	rs, es := tkey("RS256"), tkey("ES256")
	noKid := *rs
	noKid.kid = ""
	tok := sign(t, rs, claims(iss1, "alice"))
	for _, tc := range []struct {
		name string
		jwks string
		tok  string
		want string
	}{
		{"same kid", jwksOf(t, es, rs), tok, "ok " + iss1 + "/alice"},
		{"key without kid matches any kid", jwksOf(t, &noKid), tok, "ok " + iss1 + "/alice"},
		{"token without kid tries every key", jwksOf(t, es, rs), sign(t, &noKid, claims(iss1, "alice")), "ok " + iss1 + "/alice"},
		{"only other kids", jwksOf(t, es), tok, "401 Jwks doesn't have key to match kid or alg from Jwt"},
		{"kid matches a key of another type", jwksOf(t, &testKey{alg: jwa.ES256, pub: es.pub, kid: "RS256", noAlg: true}), tok, "401 Jwt verification fails"},
		{"ED25519 signature of the wrong length", jwksOf(t, &testKey{alg: jwa.EdDSA, pub: tkey("EdDSA").pub, kid: "RS256", noAlg: true}), tok, "401 Jwt ED25519 signature is wrong length"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := mustNew(t, objects(t, raYAML("ra", "- issuer: "+iss1+"\n  "+inlineJWKS(tc.jwks))))
			if got := outcome(a.Authenticate(req("GET", "/", "Authorization", "Bearer "+tc.tok), time.Now())); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}

// TestJWKSForms: Google's X.509 form verifies; keys that do not parse are skipped and
// reported; a set with no usable key rejects every token (Envoy) and is reported.
func TestJWKSForms(t *testing.T) {
	rs := tkey("RS256")
	tok := sign(t, rs, claims(iss1, "alice"))
	good := strings.TrimSuffix(strings.TrimPrefix(jwksOf(t, rs), `{"keys":[`), `]}`)
	for _, tc := range []struct {
		name, jwks, want, warning string
	}{
		{"bad keys skipped", `{"keys":[1,{"kty":"RSA","n":"AQAB"},{"kty":"XYZ"},{"kid":"x"},` + good + `]}`, "ok " + iss1 + "/alice", `keys left out; keys[1]: RSA key: "e" is missing; keys[2]: kty "XYZ" is not supported (RSA, EC, oct, OKP); keys[3]: "kty" is missing`},
		{"no usable key", `{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}`, "401 Jwks doesn't have any valid public key", "no valid key: every token of issuer"},
		{"not JSON", `keys`, "401 Jwks doesn't have any valid public key", "not a JSON object"},
		{"keys not an array", `{"keys":{}}`, "401 Jwks doesn't have any valid public key", `"keys" is not an array`},
		{"e is not 3 or 65537", `{"keys":[{"kty":"RSA","n":"` + b64(rs.pub.(*rsa.PublicKey).N.Bytes()) + `","e":"` + b64([]byte{1, 0, 3}) + `"}]}`, "401 Jwks doesn't have any valid public key", "e is neither 3 nor 65537"},
		{"EC point off the curve", `{"keys":[{"kty":"EC","crv":"P-256","x":"AQ","y":"AQ"}]}`, "401 Jwks doesn't have any valid public key", "not a point of the curve"},
		{"EC alg and crv disagree", `{"keys":[{"kty":"EC","alg":"ES256","crv":"P-384","x":"AQ","y":"AQ"}]}`, "401 Jwks doesn't have any valid public key", "does not go with"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := mustNew(t, parsed(t, raYAML("ra", "- issuer: "+iss1+"\n  "+inlineJWKS(tc.jwks))))
			if got := outcome(a.Authenticate(req("GET", "/", "Authorization", "Bearer "+tok), time.Now())); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
			if len(a.Warnings) != 1 || !strings.Contains(a.Warnings[0], tc.warning) || !strings.HasPrefix(a.Warnings[0], "RequestAuthentication ns/ra: spec.jwtRules[0].jwks: ") {
				t.Fatalf("warnings %q, want one containing %q", a.Warnings, tc.warning)
			}
		})
	}
	t.Run("X.509 form", func(t *testing.T) {
		cert := selfSigned(t, testKeys()["RS256"].priv.(*rsa.PrivateKey))
		jwks, _ := json.Marshal(map[string]string{"RS256": cert})
		a := mustNew(t, objects(t, raYAML("ra", "- issuer: "+iss1+"\n  "+inlineJWKS(string(jwks)))))
		if got := outcome(a.Authenticate(req("GET", "/", "Authorization", "Bearer "+tok), time.Now())); got != "ok "+iss1+"/alice" {
			t.Fatalf("got %q", got)
		}
	})
	t.Run("not resolved", func(t *testing.T) {
		// A jwksUri the controller did not inline (it is cleared when it does): fail closed.
		a := mustNew(t, objects(t, raYAML("ra", "- issuer: "+iss1+"\n  jwksUri: https://keys.example/jwks.json")))
		if got := outcome(a.Authenticate(req("GET", "/", "Authorization", "Bearer "+tok), time.Now())); got != "401 Jwt verification fails" {
			t.Fatalf("got %q", got)
		}
		if got := outcome(a.Authenticate(req("GET", "/"), time.Now())); got != "ok none" {
			t.Fatalf("without a token: got %q", got)
		}
	})
}

// TestExtraction covers §3.3: where tokens are looked for.
func TestExtraction(t *testing.T) {
	rs, es := tkey("RS256"), tkey("ES256")
	both := inlineJWKS(jwksOf(t, rs, es))
	iss2 := "https://issuer-2.example"
	a := mustNew(t, objects(t, raYAML("ra", `
- issuer: `+iss1+`
  `+both+`
  fromHeaders: [{name: x-jwt, prefix: "Token "}, {name: x-raw}]
  fromParams: [token]
  fromCookies: [session]
- issuer: `+iss2+`
  `+both)))
	t1 := sign(t, rs, claims(iss1, "alice"))
	t2 := sign(t, es, claims(iss2, "bob"))
	for _, tc := range []struct {
		name   string
		r      *http.Request
		want   string
		remain string // the header that must still be there, if any
	}{
		{"prefix at the start", req("GET", "/", "X-Jwt", "Token "+t1), "ok " + iss1 + "/alice", ""},
		{"prefix anywhere", req("GET", "/", "X-Jwt", "foo, Token "+t1), "ok " + iss1 + "/alice", ""},
		{"value without the prefix: no token", req("GET", "/", "X-Jwt", t1), "ok none", "X-Jwt"},
		{"token starts at the first base64url character", req("GET", "/", "X-Jwt", "Token  ,"+t1), "ok " + iss1 + "/alice", ""},
		{"no prefix: the whole value", req("GET", "/", "X-Raw", t1), "ok " + iss1 + "/alice", ""},
		{"every value of the header", req("GET", "/", "X-Jwt", "Token "+t1, "X-Jwt", "Token garbage"), "401 Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections", ""},
		{"query parameter", req("GET", "/?token="+t1), "ok " + iss1 + "/alice", ""},
		{"first value of the parameter", req("GET", "/?token="+t1+"&token=garbage"), "ok " + iss1 + "/alice", ""},
		{"cookie", req("GET", "/", "Cookie", "a=b; session="+t1), "ok " + iss1 + "/alice", "Cookie"},
		{"quoted cookie", req("GET", "/", "Cookie", `session="`+t1+`"`), "ok " + iss1 + "/alice", "Cookie"},
		{"issuer-1's location only takes issuer-1", req("GET", "/", "X-Jwt", "Token "+t2), "401 Jwt issuer is not configured", ""},
		{"default locations of issuer-2", req("GET", "/", "Authorization", "Bearer "+t2), "ok " + iss2 + "/bob", ""},
		{"default query parameter", req("GET", "/?access_token="+t2), "ok " + iss2 + "/bob", ""},
		{"issuer-1 at issuer-2's location", req("GET", "/", "Authorization", "Bearer "+t1), "401 Jwt issuer is not configured", ""},
		{"Basic credentials: no token", req("GET", "/", "Authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l"), "ok none", "Authorization"},
		{"Bearer without a token", req("GET", "/", "Authorization", "Bearer "), "401 Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j, f := a.Authenticate(tc.r, time.Now())
			if got := outcome(j, f); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
			if tc.remain != "" && tc.r.Header.Get(tc.remain) == "" {
				t.Fatalf("%s was removed", tc.remain)
			}
		})
	}
}

// TestOutputs covers §3.6: output headers, anti-spoofing, and removal of the token.
func TestOutputs(t *testing.T) {
	rs := tkey("RS256")
	rule := `
  outputPayloadToHeader: x-jwt-payload
  outputClaimToHeaders:
  - {header: x-jwt-iss, claim: iss}
  - {header: x-jwt-iat, claim: iat}
  - {header: x-jwt-nested, claim: nested.key2}
  - {header: x-jwt-bool, claim: admin}
  - {header: x-jwt-float, claim: ratio}
  - {header: x-jwt-list, claim: groups}
  - {header: x-jwt-missing, claim: nope}
  - {header: x-jwt-object, claim: nested}`
	a := rs256(t, rule)
	c := claims(iss1, "alice", "nested", map[string]any{"key2": "value2"}, "admin", true, "ratio", 1.5, "groups", []string{"a", "b"})
	tok := sign(t, rs, c)
	r := req("GET", "/", "Authorization", "Bearer "+tok, "X-Jwt-Iss", "spoofed", "X-Jwt-Missing", "spoofed", "X-Jwt-Payload", "spoofed")
	if got := outcome(a.Authenticate(r, time.Now())); got != "ok "+iss1+"/alice" {
		t.Fatal(got)
	}
	want := map[string]string{
		"X-Jwt-Payload": strings.Split(tok, ".")[1],
		"X-Jwt-Iss":     iss1,
		"X-Jwt-Iat":     itoa(c["iat"].(int64)),
		"X-Jwt-Nested":  "value2",
		"X-Jwt-Bool":    "true",
		"X-Jwt-Float":   "1.500000",
	}
	for h, v := range want {
		if got := r.Header.Values(h); len(got) != 1 || got[0] != v {
			t.Errorf("%s = %q, want %q", h, got, v)
		}
	}
	for _, h := range []string{"X-Jwt-List", "X-Jwt-Missing", "X-Jwt-Object", "Authorization"} {
		if v, ok := r.Header[h]; ok {
			t.Errorf("%s = %q, want no header", h, v)
		}
	}

	t.Run("spoofed headers are removed without a token", func(t *testing.T) {
		r := req("GET", "/", "X-Jwt-Iss", "spoofed", "X-Jwt-Payload", "spoofed")
		if got := outcome(a.Authenticate(r, time.Now())); got != "ok none" {
			t.Fatal(got)
		}
		if len(r.Header) != 0 {
			t.Fatalf("headers left: %v", r.Header)
		}
	})
	t.Run("forwardOriginalToken keeps the header", func(t *testing.T) {
		a := rs256(t, "  forwardOriginalToken: true")
		r := req("GET", "/", "Authorization", "Bearer "+tok)
		if got := outcome(a.Authenticate(r, time.Now())); got != "ok "+iss1+"/alice" {
			t.Fatal(got)
		}
		if r.Header.Get("Authorization") != "Bearer "+tok {
			t.Fatal("Authorization removed")
		}
	})
	t.Run("a token in the query stays", func(t *testing.T) {
		r := req("GET", "/?access_token="+tok)
		if got := outcome(a.Authenticate(r, time.Now())); got != "ok "+iss1+"/alice" {
			t.Fatal(got)
		}
		if r.URL.Query().Get("access_token") != tok {
			t.Fatal("query token removed")
		}
	})
	t.Run("claims and space-delimited claims reach the policy engine", func(t *testing.T) {
		a := rs256(t, "  spaceDelimitedClaims: [roles]")
		j, f := a.Authenticate(req("GET", "/", "Authorization", "Bearer "+tok), time.Now())
		if f != nil {
			t.Fatal(f.Body)
		}
		if j.Claims["nested"].(map[string]any)["key2"] != "value2" || !slices.Equal(j.SpaceDelimited, []string{"roles"}) {
			t.Fatalf("JWT %+v", j)
		}
	})
}

func itoa(v int64) string { b, _ := json.Marshal(v); return string(b) }

// TestCORSPreflight covers §3.4: a preflight is not checked; without Origin it is.
func TestCORSPreflight(t *testing.T) {
	a := rs256(t, "")
	expired := sign(t, tkey("RS256"), claims(iss1, "alice", "exp", time.Now().Unix()-3600))
	r := req("OPTIONS", "/", "Authorization", "Bearer "+expired, "Origin", "https://app.example", "Access-Control-Request-Method", "POST")
	if got := outcome(a.Authenticate(r, time.Now())); got != "ok none" {
		t.Fatalf("preflight: %s", got)
	}
	r = req("OPTIONS", "/", "Authorization", "Bearer "+expired, "Access-Control-Request-Method", "POST")
	if got := outcome(a.Authenticate(r, time.Now())); got != "401 Jwt is expired" {
		t.Fatalf("OPTIONS without Origin: %s", got)
	}
}

// TestSeveralRules covers §3.2 and §3.4 with several providers.
func TestSeveralRules(t *testing.T) {
	rs, es := tkey("RS256"), tkey("ES256")
	iss2 := "https://issuer-2.example"
	t.Run("policies are combined", func(t *testing.T) {
		// Istio's integration test verify-policies-are-combined: the same issuer with and
		// without audiences accepts a token only the one without would.
		objs := objects(t, raYAML("with-aud", "- issuer: "+iss1+"\n  audiences: [foo]\n  "+inlineJWKS(jwksOf(t, rs)))+"---\n"+
			raYAML("without-aud", "- issuer: "+iss1+"\n  "+inlineJWKS(jwksOf(t, rs))))
		a := mustNew(t, objs)
		if got := outcome(a.Authenticate(req("GET", "/", "Authorization", "Bearer "+sign(t, rs, claims(iss1, "alice", "aud", "bar"))), time.Now())); got != "ok "+iss1+"/alice" {
			t.Fatal(got)
		}
	})
	a := mustNew(t, objects(t, raYAML("ra", "- issuer: "+iss2+"\n  "+inlineJWKS(jwksOf(t, es))+"\n- issuer: "+iss1+"\n  "+inlineJWKS(jwksOf(t, rs)))))
	good1, good2 := sign(t, rs, claims(iss1, "alice")), sign(t, es, claims(iss2, "bob"))
	bad1 := sign(t, rs, claims(iss1, "alice", "exp", time.Now().Unix()-3600))
	for _, tc := range []struct {
		name   string
		tokens []string
		want   string
	}{
		{"issuer-1", []string{good1}, "ok " + iss1 + "/alice"},
		{"issuer-2", []string{good2}, "ok " + iss2 + "/bob"},
		{"expired issuer-1 token: its reason, not the other provider's", []string{bad1}, "401 Jwt is expired"},
		{"unknown issuer", []string{sign(t, rs, claims("https://issuer-3.example", "eve"))}, "401 Jwt issuer is not configured"},
		{"two good tokens of the same issuer: the first found is checked last", []string{good1, sign(t, rs, claims(iss1, "bob"))}, "ok " + iss1 + "/alice"},
		// Each provider requires every token at its locations to be its own.
		{"two good tokens of different issuers", []string{good1, good2}, "401 Jwt issuer is not configured"},
		{"a good and a bad token", []string{good1, bad1}, "401 Jwt is expired"},
		// Envoy lets this one through: issuer-1's verifier removes Authorization after
		// the good token, and the AND branch then finds no token. veil does not.
		{"a bad and a good token", []string{bad1, good1}, "401 Jwt is expired"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := req("GET", "/")
			for _, tok := range tc.tokens {
				r.Header.Add("Authorization", "Bearer "+tok)
			}
			if got := outcome(a.Authenticate(r, time.Now())); got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}

// TestRealm: the realm is the original URI, its path cut to 256 bytes.
func TestRealm(t *testing.T) {
	a := rs256(t, "")
	long := "/" + strings.Repeat("p", 300)
	_, f := a.Authenticate(req("GET", long, "Authorization", "Bearer x.y.z"), time.Now())
	if want := `Bearer realm="http://svc.ns` + long[:256] + `", error="invalid_token"`; f == nil || f.WWWAuthenticate != want {
		t.Fatalf("got %+v, want %s", f, want)
	}
}

func TestNewErrors(t *testing.T) {
	objs := objects(t, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ap, namespace: ns}
spec: {}`)
	if _, err := New(objs); err == nil || !strings.Contains(err.Error(), "AuthorizationPolicy ns/ap: not a RequestAuthentication") {
		t.Fatalf("err %v", err)
	}
	if a, err := New(nil); err != nil || outcome(a.Authenticate(req("GET", "/", "Authorization", "Bearer x"), time.Now())) != "ok none" {
		t.Fatalf("no rules: %v", err)
	}
}
