package jwtauth

import (
	"encoding/json"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/veilmesh/veil/policy"
)

// fuzzSetup is an Authenticator with every test key under issuer-1, at the default
// locations, a header with a prefix, a header without, a query parameter and a cookie, and
// the tokens it was seeded with (by subject).
type fuzzSetup struct {
	a      *Authenticator
	tokens map[string]string // subject -> token
	claims map[string]map[string]any
}

var fuzzNow = time.Unix(1_900_000_000, 0)

var fuzzState = sync.OnceValues(func() (*fuzzSetup, error) {
	t := &testing.T{}
	var all []*testKey
	for _, k := range testKeys() {
		all = append(all, k)
	}
	rules := raYAML("ra", `- issuer: `+iss1+`
  `+inlineJWKS(jwksOf(t, all...))+`
  outputPayloadToHeader: x-payload
  outputClaimToHeaders: [{header: x-sub, claim: sub}]
- issuer: `+iss1+`
  `+inlineJWKS(jwksOf(t, all...))+`
  fromHeaders: [{name: x-jwt, prefix: "Token "}, {name: x-raw}]
  fromParams: [token]
  fromCookies: [session]`)
	a, err := New(policy.Parse("fuzz.yaml", []byte(rules)).Objects)
	if err != nil {
		return nil, err
	}
	s := &fuzzSetup{a: a, tokens: map[string]string{}, claims: map[string]map[string]any{}}
	for name, k := range testKeys() {
		c := map[string]any{"iss": iss1, "sub": "sub-" + name, "exp": fuzzNow.Unix() + 3600, "aud": "foo"}
		s.tokens["sub-"+name] = sign(t, k, c)
		b, _ := json.Marshal(c)
		var back map[string]any
		json.Unmarshal(b, &back)
		s.claims["sub-"+name] = back
	}
	return s, nil
})

func fuzzSetupOf(t testing.TB) *fuzzSetup {
	s, err := fuzzState()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// checkAccepted fails unless an accepted token is one of those signed by the test keys:
// its claims are exactly those of a seed token (the signature covers them).
func (s *fuzzSetup) checkAccepted(t *testing.T, j *policy.JWT) {
	if j == nil {
		return
	}
	want, ok := s.claims[j.Subject]
	if !ok || !reflect.DeepEqual(want, j.Claims) {
		t.Fatalf("accepted a token no test key signed: %+v", j)
	}
}

// independentlyVerified reports whether jwx verifies tok's signature with one of the test
// keys, using the algorithm family of the key and the hash of the token's alg, as Envoy.
func independentlyVerified(tok string) bool {
	var sec []string
	for _, p := range strings.Split(tok, ".") {
		if p != "" {
			sec = append(sec, p)
		}
	}
	if len(sec) != 3 {
		return false
	}
	hb, ok1 := decodeBase64URL(sec[0])
	sig, ok2 := decodeBase64URL(sec[2])
	var hdr struct{ Alg string }
	if !ok1 || !ok2 || json.Unmarshal(hb, &hdr) != nil {
		return false
	}
	for _, k := range testKeys() {
		if string(k.alg) != hdr.Alg {
			continue
		}
		v, err := jws.NewVerifier(jwa.SignatureAlgorithm(hdr.Alg))
		if err != nil {
			continue
		}
		if v.Verify([]byte(sec[0]+"."+sec[1]), sig, k.pub) == nil {
			return true
		}
	}
	return false
}

// FuzzAuthenticate feeds token strings through the Authorization header: parsing never
// panics, and only a token a test key signed is ever accepted, as an independent
// implementation (jwx) confirms.
func FuzzAuthenticate(f *testing.F) {
	s := fuzzSetupOf(f)
	for _, tok := range s.tokens {
		f.Add(tok)
		parts := strings.Split(tok, ".")
		f.Add(parts[0] + ".." + parts[1] + "." + parts[2])
		f.Add(parts[0] + "." + parts[1] + ".")
		f.Add(parts[0] + "=." + parts[1] + " ." + parts[2])
	}
	f.Add("a.b.c")
	f.Add("")
	f.Fuzz(func(t *testing.T, tok string) {
		r := &http.Request{Method: "GET", URL: &url.URL{Path: "/"}, RequestURI: "/", Header: http.Header{"Authorization": {"Bearer " + tok}}}
		j, f := s.a.Authenticate(r, fuzzNow)
		if j == nil && f == nil {
			return // no token found
		}
		s.checkAccepted(t, j)
		if j != nil && !independentlyVerified(tokenAfter("Bearer "+tok, len("Bearer "))) {
			t.Fatalf("accepted %q, which jwx does not verify", tok)
		}
	})
}

// FuzzExtract feeds header values, a query and a cookie line through every location:
// extraction never panics and never yields an accepted token that a test key did not sign.
func FuzzExtract(f *testing.F) {
	s := fuzzSetupOf(f)
	// HMAC keeps each run cheap: extraction, not signatures, is what varies here.
	tok := s.tokens["sub-HS256"]
	f.Add("Bearer "+tok, "x, Token "+tok, tok, "token="+tok+"&token=x", "a=b; session=\""+tok+"\"")
	f.Add("Bearer ", "Token", "", "access_token=%zz&=&&token", "session")
	f.Add("Basic abc", "Token .", ". . .", "token=a.b.c", "session=a.b.c; session=x")
	f.Fuzz(func(t *testing.T, auth, xjwt, xraw, query, cookie string) {
		r := &http.Request{Method: "GET", URL: &url.URL{Path: "/", RawQuery: query}, RequestURI: "/?" + query, Header: http.Header{}}
		for name, v := range map[string]string{"Authorization": auth, "X-Jwt": xjwt, "X-Raw": xraw, "Cookie": cookie, "X-Sub": "spoofed"} {
			if v != "" {
				r.Header[name] = []string{v, v}
			}
		}
		j, _ := s.a.Authenticate(r, fuzzNow)
		s.checkAccepted(t, j)
		if v := r.Header.Get("X-Sub"); v == "spoofed" {
			t.Fatal("a spoofed output header survived")
		}
	})
}

// FuzzParseJWKS: the JWKS parser never panics, and every key it returns is usable.
func FuzzParseJWKS(f *testing.F) {
	t := &testing.T{}
	for _, k := range testKeys() {
		f.Add(jwksOf(t, k))
	}
	f.Add(`{"keys":[{"kty":"EC","x":"AQ","y":"AQ"},{"kty":"oct","k":""},{"kty":"OKP","crv":"Ed25519","x":"AA"}]}`)
	f.Add(`{"k1":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}`)
	f.Fuzz(func(t *testing.T, s string) {
		keys, _, err := parseJWKS(s)
		if err == nil && len(keys) == 0 {
			t.Fatal("no error and no key")
		}
		for _, k := range keys {
			if k.rsa == nil && k.ec == nil && k.hmac == nil && k.ed == nil {
				t.Fatalf("key %+v has no material", k)
			}
		}
	})
}
