package jwtauth

import (
	"net/http"
	"net/url"
	"strings"
)

// headerLocation is a fromHeaders entry: the canonical header name and the value prefix.
type headerLocation struct {
	name, prefix string
}

// found is a token and where it was found.
type found struct {
	token string
	// header is the canonical name of the header it came from, "" for a query parameter
	// or a cookie.
	header string
}

// locations are one provider's token locations, in Envoy's extraction order: headers by
// lower-case name then prefix, then query parameters by name, then cookies by name;
// duplicates removed.
type locations struct {
	headers []headerLocation
	params  []string
	cookies []string
}

// extract appends the tokens found in r at the locations to out, as Envoy's Extractor
// does:
//   - a header location takes every value of the header; with a prefix, a value that does
//     not contain the prefix anywhere is skipped, and the token starts at the first
//     base64url or '.' character after it (the whole value if there is none);
//   - a query parameter takes its first value, percent-decoded;
//   - a cookie takes the first cookie of that name, without surrounding quotes.
func (l *locations) extract(r *http.Request, out []found) []found {
	for _, h := range l.headers {
		for _, v := range r.Header[h.name] {
			if h.prefix != "" {
				pos := strings.Index(v, h.prefix)
				if pos < 0 {
					continue
				}
				v = tokenAfter(v, pos+len(h.prefix))
			}
			out = append(out, found{token: v, header: h.name})
		}
	}
	if len(l.params) > 0 && r.URL != nil && r.URL.RawQuery != "" {
		for _, p := range l.params {
			if v, ok := firstParam(r.URL.RawQuery, p); ok {
				out = append(out, found{token: v})
			}
		}
	}
	if len(l.cookies) > 0 {
		lines := r.Header["Cookie"]
		for _, name := range l.cookies {
			if v, ok := firstCookie(lines, name); ok {
				out = append(out, found{token: v})
			}
		}
	}
	return out
}

// tokenAfter returns v from the first base64url or '.' character at or after i, or all of
// v when there is none (Envoy's extractJWT).
func tokenAfter(v string, i int) string {
	for ; i < len(v); i++ {
		if isBase64URL(v[i]) || v[i] == '.' {
			return v[i:]
		}
	}
	return v
}

// firstParam returns the first value of query parameter name, keys and values
// percent-decoded.
func firstParam(raw, name string) (string, bool) {
	for raw != "" {
		var part string
		part, raw, _ = strings.Cut(raw, "&")
		if part == "" {
			continue
		}
		k, v, _ := strings.Cut(part, "=")
		if unescape(k) == name {
			return unescape(v), true
		}
	}
	return "", false
}

func unescape(s string) string {
	if !strings.ContainsAny(s, "%+") {
		return s
	}
	if u, err := url.QueryUnescape(s); err == nil {
		return u
	}
	return s
}

// firstCookie returns the value of the first cookie called name in the Cookie header
// lines, without surrounding double quotes.
func firstCookie(lines []string, name string) (string, bool) {
	for _, line := range lines {
		for line != "" {
			var part string
			part, line, _ = strings.Cut(line, ";")
			part = strings.TrimLeft(part, " \t\n\v\f\r")
			k, v, ok := strings.Cut(part, "=")
			if !ok || k != name {
				continue
			}
			if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
				v = v[1 : len(v)-1]
			}
			return v, true
		}
	}
	return "", false
}
