package jwtauth

import (
	"encoding/base64"
	"encoding/json"
	"math"
	"strings"
)

// token is a parsed JWT, as jwt_verify_lib's Jwt::parseFromString leaves it.
type token struct {
	// header and payload are the first two base64url sections as they appear in the token;
	// signed is what the signature covers (header + "." + payload).
	header, payload, signed string
	alg, kid                string
	iss, sub                string
	nbf, exp                uint64
	aud                     []string
	claims                  map[string]any
	sig                     []byte
}

// implementedAlgs are the algorithms Envoy verifies.
func implementedAlg(alg string) bool {
	switch alg {
	case "ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
		"PS256", "PS384", "PS512", "EdDSA":
		return true
	}
	return false
}

// sections splits s on '.', skipping empty sections as absl::StrSplit(s, '.',
// absl::SkipEmpty()) does: "a..b.c" has the three sections a, b and c. It reports false
// unless there are exactly three, and returns each section's start offset.
func sections(s string) (sec [3]string, at [3]int, ok bool) {
	n := 0
	start := 0
	for i := 0; i <= len(s); i++ {
		if i < len(s) && s[i] != '.' {
			continue
		}
		if i > start {
			if n == 3 {
				return sec, at, false
			}
			sec[n], at[n] = s[start:i], start
			n++
		}
		start = i + 1
	}
	return sec, at, n == 3
}

// parseToken parses a compact JWT in jwt_verify_lib's order, returning the first failure.
func parseToken(s string) (*token, status) {
	sec, at, ok := sections(s)
	if !ok {
		return nil, statusBadFormat
	}
	t := &token{header: sec[0], payload: sec[1]}
	if at[0] == 0 && at[1] == len(sec[0])+1 {
		t.signed = s[:at[1]+len(sec[1])]
	} else {
		t.signed = sec[0] + "." + sec[1]
	}

	hdr, ok := decodeBase64URL(sec[0])
	if !ok {
		return nil, statusHeaderBadBase64
	}
	h, ok := jsonObject(hdr)
	if !ok {
		return nil, statusHeaderBadJSON
	}
	alg, ok := h["alg"].(string)
	if !ok {
		return nil, statusHeaderBadAlg
	}
	if !implementedAlg(alg) {
		return nil, statusHeaderNotImplementedAlg
	}
	t.alg = alg
	if v, present := h["kid"]; present {
		if t.kid, ok = v.(string); !ok {
			return nil, statusHeaderBadKid
		}
	}

	pl, ok := decodeBase64URL(sec[1])
	if !ok {
		return nil, statusPayloadBadBase64
	}
	if t.claims, ok = jsonObject(pl); !ok {
		return nil, statusPayloadBadJSON
	}
	var st status
	if t.iss, st = stringClaim(t.claims, "iss", statusIssNotString); st != statusOK {
		return nil, st
	}
	if t.sub, st = stringClaim(t.claims, "sub", statusSubNotString); st != statusOK {
		return nil, st
	}
	if _, st = uintClaim(t.claims, "iat", statusIatNotInteger, statusIatOutOfRange); st != statusOK {
		return nil, st
	}
	if t.nbf, st = uintClaim(t.claims, "nbf", statusNbfNotInteger, statusNbfOutOfRange); st != statusOK {
		return nil, st
	}
	if t.exp, st = uintClaim(t.claims, "exp", statusExpNotInteger, statusExpOutOfRange); st != statusOK {
		return nil, st
	}
	if _, st = stringClaim(t.claims, "jti", statusJtiNotString); st != statusOK {
		return nil, st
	}
	switch aud := t.claims["aud"].(type) {
	case nil:
		if _, present := t.claims["aud"]; present {
			return nil, statusAudNotString
		}
	case string:
		t.aud = []string{aud}
	case []any:
		t.aud = make([]string, 0, len(aud))
		for _, a := range aud {
			s, ok := a.(string)
			if !ok {
				return nil, statusAudNotString
			}
			t.aud = append(t.aud, s)
		}
	default:
		return nil, statusAudNotString
	}

	if t.sig, ok = decodeBase64URL(sec[2]); !ok {
		return nil, statusSignatureBadBase64
	}
	return t, statusOK
}

// stringClaim reads an optional string claim.
func stringClaim(m map[string]any, name string, wrongType status) (string, status) {
	v, present := m[name]
	if !present {
		return "", statusOK
	}
	s, ok := v.(string)
	if !ok {
		return "", wrongType
	}
	return s, statusOK
}

// uintClaim reads an optional numeric claim as jwt_verify_lib's GetUInt64: any JSON number
// in [0, 2^64), truncated.
func uintClaim(m map[string]any, name string, wrongType, outOfRange status) (uint64, status) {
	v, present := m[name]
	if !present {
		return 0, statusOK
	}
	f, ok := v.(float64)
	if !ok {
		return 0, wrongType
	}
	if f < 0 || f >= math.MaxUint64 || math.IsNaN(f) {
		return 0, outOfRange
	}
	return uint64(f), statusOK
}

// jsonObject decodes a JSON object; anything else (an array, null, a number) fails, as a
// protobuf Struct would.
func jsonObject(b []byte) (map[string]any, bool) {
	i := 0
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	if i == len(b) || b[i] != '{' {
		return nil, false
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, false
	}
	return m, true
}

// isSpace is absl::ascii_isspace.
func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'
}

func isBase64URL(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_'
}

// decodeBase64URL decodes as absl::WebSafeBase64Unescape: the URL-safe alphabet, padding
// optional but, when present, exactly what completes the last group; ASCII whitespace is
// skipped.
func decodeBase64URL(s string) ([]byte, bool) {
	clean := true
	for i := 0; i < len(s); i++ {
		if !isBase64URL(s[i]) {
			clean = false
			break
		}
	}
	if !clean {
		var b strings.Builder
		b.Grow(len(s))
		i := 0
		for ; i < len(s); i++ {
			c := s[i]
			if isBase64URL(c) {
				b.WriteByte(c)
			} else if !isSpace(c) {
				break
			}
		}
		pad := 0
		for ; i < len(s); i++ {
			switch c := s[i]; {
			case c == '=' || c == '.':
				pad++
			case isSpace(c):
			default:
				return nil, false
			}
		}
		data := b.String()
		if pad != 0 && (data == "" || len(data)%4 == 0 || pad != 4-len(data)%4) {
			return nil, false
		}
		s = data
	}
	out, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil, false
	}
	return out, true
}
