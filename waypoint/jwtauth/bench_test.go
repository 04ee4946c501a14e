package jwtauth

import (
	"net/http"
	"net/url"
	"testing"
	"time"
)

// BenchmarkAuthenticate measures one request through Authenticate: a valid token per
// algorithm (one rule, a JWKS of three keys), a request without a token, and a token with
// payload and claim outputs.
func BenchmarkAuthenticate(b *testing.B) {
	now := time.Now()
	for _, alg := range []string{"RS256", "ES256", "HS256", "EdDSA"} {
		k := tkey(alg)
		a := mustNew(b, objects(b, raYAML("ra", "- issuer: "+iss1+"\n  "+inlineJWKS(jwksOf(b, tkey("ES384"), k, tkey("PS256"))))))
		auth := "Bearer " + sign(b, k, claims(iss1, "alice", "aud", "foo", "scope", "read write"))
		b.Run(alg, func(b *testing.B) {
			benchmarkRequest(b, a, auth, now)
		})
	}
	a := mustNew(b, objects(b, raYAML("ra", "- issuer: "+iss1+"\n  "+inlineJWKS(jwksOf(b, tkey("RS256"))))))
	b.Run("no-token", func(b *testing.B) { benchmarkRequest(b, a, "", now) })
	a = rs256(b, `  outputPayloadToHeader: x-jwt-payload
  outputClaimToHeaders: [{header: x-jwt-sub, claim: sub}, {header: x-jwt-iat, claim: iat}]`)
	auth := "Bearer " + sign(b, tkey("RS256"), claims(iss1, "alice"))
	b.Run("RS256-outputs", func(b *testing.B) { benchmarkRequest(b, a, auth, now) })
}

func benchmarkRequest(b *testing.B, a *Authenticator, auth string, now time.Time) {
	u := &url.URL{Path: "/api/v1/items"}
	b.ReportAllocs()
	for b.Loop() {
		r := &http.Request{Method: "GET", URL: u, RequestURI: "/api/v1/items", Host: "svc", Header: http.Header{"Accept": {"*/*"}}}
		if auth != "" {
			r.Header["Authorization"] = []string{auth}
		}
		if _, f := a.Authenticate(r, now); f != nil {
			b.Fatal(f.Body)
		}
	}
}

// TestAuthenticateWithoutTokenDoesNotAllocate: the common case of a waypoint with
// RequestAuthentications, a request without a token, costs no allocation.
func TestAuthenticateWithoutTokenDoesNotAllocate(t *testing.T) {
	a := mustNew(t, objects(t, raYAML("ra", "- issuer: "+iss1+"\n  "+inlineJWKS(jwksOf(t, tkey("RS256")))+`
  outputPayloadToHeader: x-jwt-payload
- issuer: https://issuer-2.example
  `+inlineJWKS(jwksOf(t, tkey("ES256")))+`
  fromHeaders: [{name: x-token}]
  fromParams: [token]
  fromCookies: [session]`)))
	r := &http.Request{Method: "GET", URL: &url.URL{Path: "/items", RawQuery: "page=2&q=a%20b"}, RequestURI: "/items?page=2&q=a%20b", Host: "svc",
		Header: http.Header{"Accept": {"*/*"}, "Cookie": {"theme=dark; lang=en"}, "Authorization": {"Basic YWxhZGRpbjpvcGVuc2VzYW1l"}}}
	now := time.Now()
	if n := testing.AllocsPerRun(100, func() {
		if j, f := a.Authenticate(r, now); j != nil || f != nil {
			t.Fatal("want no token")
		}
	}); n != 0 {
		t.Fatalf("%v allocations per request without a token", n)
	}
}
