package jwtauth

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"hash"
	"math/big"
	"strings"
)

// key is one usable key of a JWKS, with the fields verification matches on.
type key struct {
	kty, kid, alg string

	rsa  *rsa.PublicKey
	ec   *ecdsa.PublicKey
	hmac []byte
	ed   ed25519.PublicKey
}

// Largest RSA modulus accepted, as BoringSSL's RSA_check_key.
const maxRSABits = 16 * 1024

// parseJWKS reads a JSON Web Key Set as jwt_verify_lib's Jwks::createFrom(JWKS): members of
// "keys" that are not objects are ignored, a key that does not parse is skipped (and
// reported in skipped), and the set is unusable (err) only when no key is left. A JSON
// object without "keys" whose members are all PEM certificates is Google's X.509 form,
// each certificate's RSA key named by its member name.
func parseJWKS(s string) (keys []*key, skipped []error, err error) {
	var set map[string]any
	if m, ok := jsonObject([]byte(s)); ok {
		set = m
	} else {
		return nil, nil, errors.New("not a JSON object")
	}
	raw, present := set["keys"]
	if !present {
		if x509Form(set) {
			keys, err := parseX509Form(set)
			return keys, nil, err
		}
		return nil, nil, errors.New(`no "keys" member`)
	}
	list, ok := raw.([]any)
	if !ok {
		return nil, nil, errors.New(`"keys" is not an array`)
	}
	for i, v := range list {
		m, ok := v.(map[string]any)
		if !ok {
			continue
		}
		k, err := parseJWK(m)
		if err != nil {
			skipped = append(skipped, fmt.Errorf("keys[%d]: %w", i, err))
			continue
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, skipped, errors.New("no valid key")
	}
	return keys, skipped, nil
}

// field reads an optional string member: ok is false when it is present but not a string.
func field(m map[string]any, name string) (v string, present, ok bool) {
	raw, present := m[name]
	if !present {
		return "", false, true
	}
	v, ok = raw.(string)
	return v, true, ok
}

// required reads a string member that must be present.
func required(m map[string]any, name, kind string) (string, error) {
	v, present, ok := field(m, name)
	switch {
	case !present:
		return "", fmt.Errorf("%s key: %q is missing", kind, name)
	case !ok:
		return "", fmt.Errorf("%s key: %q is not a string", kind, name)
	}
	return v, nil
}

func parseJWK(m map[string]any) (*key, error) {
	kty, present, ok := field(m, "kty")
	switch {
	case !present:
		return nil, errors.New(`"kty" is missing`)
	case !ok:
		return nil, errors.New(`"kty" is not a string`)
	}
	k := &key{kty: kty}
	// kid and alg are optional; a member of another type counts as absent.
	k.kid, _, _ = field(m, "kid")
	k.alg, _, _ = field(m, "alg")
	var err error
	switch kty {
	case "RSA":
		err = k.parseRSA(m)
	case "EC":
		err = k.parseEC(m)
	case "oct":
		err = k.parseOct(m)
	case "OKP":
		err = k.parseOKP(m)
	default:
		err = fmt.Errorf("kty %q is not supported (RSA, EC, oct, OKP)", kty)
	}
	if err != nil {
		return nil, err
	}
	return k, nil
}

func (k *key) parseRSA(m map[string]any) error {
	if k.alg != "" && !strings.HasPrefix(k.alg, "RS") && !strings.HasPrefix(k.alg, "PS") {
		return fmt.Errorf("RSA key: alg %q is not RS* or PS*", k.alg)
	}
	n, err := required(m, "n", "RSA")
	if err != nil {
		return err
	}
	e, err := required(m, "e", "RSA")
	if err != nil {
		return err
	}
	nb, ok1 := decodeBase64URL(n)
	eb, ok2 := decodeBase64URL(e)
	if !ok1 || !ok2 {
		return errors.New("RSA key: n or e is not base64url")
	}
	N, E := new(big.Int).SetBytes(nb), new(big.Int).SetBytes(eb)
	switch {
	case !E.IsInt64() || (E.Int64() != 3 && E.Int64() != 65537):
		return errors.New("RSA key: e is neither 3 nor 65537")
	case N.BitLen() > maxRSABits:
		return fmt.Errorf("RSA key: modulus longer than %d bits", maxRSABits)
	case N.Bit(0) == 0 || N.Cmp(E) <= 0:
		return errors.New("RSA key: n is not a valid modulus")
	}
	k.rsa = &rsa.PublicKey{N: N, E: int(E.Int64())}
	return nil
}

func (k *key) parseEC(m map[string]any) error {
	if k.alg != "" && !strings.HasPrefix(k.alg, "ES") {
		return fmt.Errorf("EC key: alg %q is not ES*", k.alg)
	}
	crv, _, ok := field(m, "crv")
	if !ok {
		return errors.New(`EC key: "crv" is not a string`)
	}
	if k.alg != "" && crv != "" && !(k.alg == "ES256" && crv == "P-256" ||
		k.alg == "ES384" && crv == "P-384" || k.alg == "ES512" && crv == "P-521") {
		return fmt.Errorf("EC key: crv %q does not go with alg %q", crv, k.alg)
	}
	var curve elliptic.Curve
	switch {
	case k.alg == "" && crv == "", k.alg == "ES256", crv == "P-256":
		curve = elliptic.P256()
	case k.alg == "ES384", crv == "P-384":
		curve = elliptic.P384()
	case k.alg == "ES512", crv == "P-521":
		curve = elliptic.P521()
	default:
		return fmt.Errorf("EC key: crv %q / alg %q is not supported", crv, k.alg)
	}
	x, err := required(m, "x", "EC")
	if err != nil {
		return err
	}
	y, err := required(m, "y", "EC")
	if err != nil {
		return err
	}
	xb, ok1 := decodeBase64URL(x)
	yb, ok2 := decodeBase64URL(y)
	if !ok1 || !ok2 {
		return errors.New("EC key: x or y is not base64url")
	}
	size := (curve.Params().BitSize + 7) / 8
	X, Y := new(big.Int).SetBytes(xb), new(big.Int).SetBytes(yb)
	if X.BitLen() > size*8 || Y.BitLen() > size*8 {
		return errors.New("EC key: x or y is not a point of the curve")
	}
	point := make([]byte, 1+2*size)
	point[0] = 4
	X.FillBytes(point[1 : 1+size])
	Y.FillBytes(point[1+size:])
	pub, err := ecdsa.ParseUncompressedPublicKey(curve, point)
	if err != nil {
		return errors.New("EC key: x or y is not a point of the curve")
	}
	k.ec = pub
	return nil
}

func (k *key) parseOct(m map[string]any) error {
	if k.alg != "" && k.alg != "HS256" && k.alg != "HS384" && k.alg != "HS512" {
		return fmt.Errorf("oct key: alg %q is not HS256, HS384 or HS512", k.alg)
	}
	s, err := required(m, "k", "oct")
	if err != nil {
		return err
	}
	b, ok := decodeBase64URL(s)
	if !ok || len(b) == 0 {
		return errors.New("oct key: k is not base64url, or empty")
	}
	k.hmac = b
	return nil
}

func (k *key) parseOKP(m map[string]any) error {
	if k.alg != "" && k.alg != "EdDSA" {
		return fmt.Errorf("OKP key: alg %q is not EdDSA", k.alg)
	}
	crv, err := required(m, "crv", "OKP")
	if err != nil {
		return err
	}
	if crv != "Ed25519" {
		return fmt.Errorf("OKP key: crv %q is not supported (Ed25519)", crv)
	}
	x, err := required(m, "x", "OKP")
	if err != nil {
		return err
	}
	b, ok := decodeBase64URL(x)
	if !ok {
		return errors.New("OKP key: x is not base64url")
	}
	if len(b) != ed25519.PublicKeySize {
		return fmt.Errorf("OKP key: x is %d bytes, want %d", len(b), ed25519.PublicKeySize)
	}
	k.ed = ed25519.PublicKey(b)
	return nil
}

const (
	certPrefix = "-----BEGIN CERTIFICATE-----\n"
	certSuffix = "\n-----END CERTIFICATE-----\n"
)

// x509Form reports whether a JWKS without "keys" is a map of key id to PEM certificate.
func x509Form(set map[string]any) bool {
	if len(set) == 0 {
		return false
	}
	for name, v := range set {
		s, ok := v.(string)
		if name == "" || !ok || !strings.HasPrefix(s, certPrefix) || !strings.HasSuffix(s, certSuffix) {
			return false
		}
	}
	return true
}

// parseX509Form reads the X.509 form; one bad certificate makes the whole set unusable.
func parseX509Form(set map[string]any) ([]*key, error) {
	var keys []*key
	for kid, v := range set {
		b, _ := pem.Decode([]byte(v.(string)))
		if b == nil || b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%q: not a PEM certificate", kid)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", kid, err)
		}
		pub, ok := c.PublicKey.(*rsa.PublicKey)
		if !ok {
			return nil, fmt.Errorf("%q: the certificate's key is not RSA", kid)
		}
		keys = append(keys, &key{kty: "RSA", kid: kid, rsa: pub})
	}
	return keys, nil
}

// verify checks t's signature against keys as jwt_verify_lib's
// verifyJwtWithoutTimeChecking: a key is tried when its kid (if both have one) and its alg
// (if it has one) match the token's; the key's type, not the token's alg, picks the
// algorithm family, and the alg only the hash.
func verify(t *token, keys []*key) status {
	matched := false
	for _, k := range keys {
		if t.kid != "" && k.kid != "" && k.kid != t.kid {
			continue
		}
		if k.alg != "" && k.alg != t.alg {
			continue
		}
		matched = true
		switch k.kty {
		case "EC":
			h := crypto.SHA256
			switch t.alg {
			case "ES384":
				h = crypto.SHA384
			case "ES512":
				h = crypto.SHA512
			}
			n := len(t.sig) / 2
			r, s := new(big.Int).SetBytes(t.sig[:n]), new(big.Int).SetBytes(t.sig[n:2*n])
			if ecdsa.Verify(k.ec, digest(h, t.signed), r, s) {
				return statusOK
			}
		case "RSA":
			h := crypto.SHA256
			switch t.alg {
			case "RS384", "PS384":
				h = crypto.SHA384
			case "RS512", "PS512":
				h = crypto.SHA512
			}
			switch t.alg[:2] {
			case "RS":
				if rsa.VerifyPKCS1v15(k.rsa, h, digest(h, t.signed), t.sig) == nil {
					return statusOK
				}
			case "PS":
				if rsa.VerifyPSS(k.rsa, h, digest(h, t.signed), t.sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto}) == nil {
					return statusOK
				}
			}
		case "oct":
			var h func() hash.Hash
			switch t.alg {
			case "HS384":
				h = sha512.New384
			case "HS512":
				h = sha512.New
			default:
				h = sha256.New
			}
			mac := hmac.New(h, k.hmac)
			mac.Write([]byte(t.signed))
			if hmac.Equal(mac.Sum(nil), t.sig) {
				return statusOK
			}
		case "OKP":
			if len(t.sig) != ed25519.SignatureSize {
				return statusEd25519SignatureWrongLength
			}
			if ed25519.Verify(k.ed, []byte(t.signed), t.sig) {
				return statusOK
			}
		}
	}
	if matched {
		return statusVerificationFail
	}
	return statusJwksKidAlgMismatch
}

func digest(h crypto.Hash, s string) []byte {
	switch h {
	case crypto.SHA384:
		d := sha512.Sum384([]byte(s))
		return d[:]
	case crypto.SHA512:
		d := sha512.Sum512([]byte(s))
		return d[:]
	}
	d := sha256.Sum256([]byte(s))
	return d[:]
}
