package jwtauth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/veilmesh/veil/policy"
)

// Tokens and key sets in these tests are made with lestrrat-go/jwx, an implementation
// independent of the one under test.

// testKey is a signing key and its public JWK.
type testKey struct {
	alg  jwa.SignatureAlgorithm
	priv any // what jws.Sign takes
	pub  any // the raw public key (the secret for HMAC)
	kid  string
	// noAlg leaves "alg" out of the JWK.
	noAlg bool
}

var testKeys = sync.OnceValue(func() map[string]*testKey {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	ec := func(c elliptic.Curve) *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(c, rand.Reader)
		if err != nil {
			panic(err)
		}
		return k
	}
	p256, p384, p521 := ec(elliptic.P256()), ec(elliptic.P384()), ec(elliptic.P521())
	edPub, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	ks := map[string]*testKey{}
	add := func(name string, alg jwa.SignatureAlgorithm, priv, pub any) {
		ks[name] = &testKey{alg: alg, priv: priv, pub: pub, kid: name}
	}
	for _, a := range []jwa.SignatureAlgorithm{jwa.RS256, jwa.RS384, jwa.RS512, jwa.PS256, jwa.PS384, jwa.PS512} {
		add(string(a), a, rsaKey, &rsaKey.PublicKey)
	}
	add("ES256", jwa.ES256, p256, &p256.PublicKey)
	add("ES384", jwa.ES384, p384, &p384.PublicKey)
	add("ES512", jwa.ES512, p521, &p521.PublicKey)
	add("EdDSA", jwa.EdDSA, edPriv, edPub)
	for _, a := range []jwa.SignatureAlgorithm{jwa.HS256, jwa.HS384, jwa.HS512} {
		add(string(a), a, secret, secret)
	}
	return ks
})

// tkey returns a test key by name (its algorithm).
func tkey(name string) *testKey {
	k := testKeys()[name]
	if k == nil {
		panic("no test key " + name)
	}
	return k
}

// jwksOf is the JSON Web Key Set of the keys' public halves (the secret for HMAC keys),
// each with its kid and alg.
func jwksOf(t testing.TB, keys ...*testKey) string {
	t.Helper()
	set := jwk.NewSet()
	for _, k := range keys {
		j, err := jwk.FromRaw(k.pub)
		if err != nil {
			t.Fatal(err)
		}
		if err := j.Set(jwk.KeyIDKey, k.kid); err != nil {
			t.Fatal(err)
		}
		if !k.noAlg {
			if err := j.Set(jwk.AlgorithmKey, k.alg); err != nil {
				t.Fatal(err)
			}
		}
		if err := set.AddKey(j); err != nil {
			t.Fatal(err)
		}
	}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// sign makes a compact JWS of claims with k, its header carrying k's kid (unless kid is
// overridden through hdr) and any other members of hdr.
func sign(t testing.TB, k *testKey, claims map[string]any, hdr ...map[string]any) string {
	t.Helper()
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	h := jws.NewHeaders()
	if err := h.Set(jws.KeyIDKey, k.kid); err != nil {
		t.Fatal(err)
	}
	for _, m := range hdr {
		for name, v := range m {
			if err := h.Set(name, v); err != nil {
				t.Fatal(err)
			}
		}
	}
	out, err := jws.Sign(payload, jws.WithKey(k.alg, k.priv, jws.WithProtectedHeaders(h)))
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// claims for issuer iss and subject sub, valid from an hour ago for an hour, with extra
// members.
func claims(iss, sub string, extra ...any) map[string]any {
	now := time.Now().Unix()
	c := map[string]any{"iss": iss, "sub": sub, "iat": now - 3600, "exp": now + 3600}
	for i := 0; i+1 < len(extra); i += 2 {
		c[extra[i].(string)] = extra[i+1]
	}
	return c
}

// objects parses and validates RequestAuthentication (and other policy) YAML.
func objects(t testing.TB, yaml string) []*policy.Object {
	t.Helper()
	m := policy.Parse("test.yaml", []byte(yaml))
	for _, err := range m.Errors {
		t.Fatalf("parse: %v", err)
	}
	for _, o := range m.Objects {
		if _, err := policy.Validate(o, policy.Options{}); err != nil {
			t.Fatalf("validate: %v", err)
		}
	}
	return m.Objects
}

// parsed parses policy YAML without validating it, for what validation would refuse but a
// peer could still send.
func parsed(t testing.TB, yaml string) []*policy.Object {
	t.Helper()
	m := policy.Parse("test.yaml", []byte(yaml))
	for _, err := range m.Errors {
		t.Fatalf("parse: %v", err)
	}
	return m.Objects
}

// raYAML is a RequestAuthentication named name whose jwtRules are given as YAML (each line
// indented by four spaces under jwtRules).
func raYAML(name, rules string) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: %s, namespace: ns}
spec:
  jwtRules:
%s
`, name, indent(rules, "  "))
}

func indent(s, by string) string {
	lines := strings.Split(strings.Trim(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = by + l
	}
	return strings.Join(lines, "\n")
}

// inlineJWKS is a jwks: member for YAML.
func inlineJWKS(s string) string {
	b, _ := json.Marshal(s)
	return "jwks: " + string(b)
}

// mustNew compiles ras.
func mustNew(t testing.TB, ras []*policy.Object) *Authenticator {
	t.Helper()
	a, err := New(ras)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// req builds a request as a server would have received it.
func req(method, target string, headers ...string) *http.Request {
	r, err := http.NewRequest(method, "http://svc.ns"+target, nil)
	if err != nil {
		panic(err)
	}
	r.RequestURI = target
	for i := 0; i+1 < len(headers); i += 2 {
		r.Header.Add(headers[i], headers[i+1])
	}
	return r
}

// outcome describes an Authenticate result: "ok iss/sub", "ok none" or "401 body".
func outcome(j *policy.JWT, f *Failure) string {
	switch {
	case f != nil:
		return fmt.Sprintf("%d %s", f.Status, f.Body)
	case j == nil:
		return "ok none"
	}
	return "ok " + j.Issuer + "/" + j.Subject
}

// selfSigned is a PEM certificate for k, as in Google's X.509 JWKS form.
func selfSigned(t testing.TB, k *rsa.PrivateKey) string {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "issuer"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}
