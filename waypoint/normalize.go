package waypoint

import (
	"errors"
	"fmt"
	"strings"
)

// Classes of a path byte, after Envoy's copy of Chromium's path canonicalizer
// (source/common/chromium_url/url_canon_path.cc, kPathCharLookup), which is what
// normalize_path (Istio's pathNormalization BASE, the default) runs.
const (
	pathPass     = iota // copied as is
	pathEscape          // written as %XX (upper-case hex) when raw; kept as is when escaped
	pathUnescape        // unreserved: %XX of it is decoded
	pathInvalid         // refused
)

var pathClass = func() (t [256]byte) {
	for c := range 256 {
		switch {
		case c == 0 || c < 0x20 || c == 0x7f || c == ' ':
			// Chromium escapes controls and fails on NUL; the HTTP/1 parser before it
			// refuses all of them. veil refuses them here too, for HTTP/2 paths.
			t[c] = pathInvalid
		case c >= 0x80:
			t[c] = pathEscape
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_', c == '~':
			t[c] = pathUnescape
		case strings.IndexByte("\"<>\\^`{|}", byte(c)) >= 0:
			t[c] = pathEscape
		case c == '#' || c == '?':
			// A fragment has no place in a request; the query was split off before.
			t[c] = pathInvalid
		default: // ! $ & ' ( ) * + , . / : ; = @ [ ] and %
			t[c] = pathPass
		}
	}
	return t
}()

// ErrBadPath is the error of NormalizePath for a path it refuses; the request is
// answered 400.
var ErrBadPath = errors.New("bad request path")

// NormalizePath normalizes a request path (the request-target without its query) as
// Envoy's normalize_path does, Istio's default (meshConfig pathNormalization BASE). The
// result is what authorization sees and what the endpoint receives.
//
//   - Dot segments are removed (RFC 3986 5.2.4); a ".." at the root stays at the root.
//     "%2e" and "%2E" are dots.
//   - A backslash is a slash.
//   - Escapes of unreserved characters (ALPHA DIGIT - . _ ~) are decoded; every other
//     escape is kept exactly as sent, hex case included ("%2f" stays "%2f", as in
//     Envoy: slashes are not decoded and not merged).
//   - The bytes " < > ^ ` { | } and those above 0x7f are percent-encoded in upper case.
//
// Where Envoy is lenient veil refuses (ErrBadPath, answered 400): a path that does not
// start with "/" (Envoy answers 404), an invalid escape such as "%zz" or a trailing "%"
// (Envoy passes it on), "#", and control bytes and spaces (the HTTP/1 parser refuses
// those before Envoy normalizes). %00 is refused, as in Envoy.
// The result is idempotent: NormalizePath of it is itself.
func NormalizePath(p string) (string, error) {
	if p == "" || p[0] != '/' {
		return "", fmt.Errorf("%w: %q does not start with /", ErrBadPath, p)
	}
	// Fast path: nothing to change.
	clean := true
	for i := 0; i < len(p) && clean; i++ {
		c := p[i]
		switch {
		case c == '.':
			clean = p[i-1] != '/' // i > 0: p[0] is '/'
		case c == '%':
			clean = false
		case pathClass[c] == pathPass || pathClass[c] == pathUnescape:
		default:
			clean = false
		}
	}
	if clean {
		return p, nil
	}
	out := make([]byte, 0, len(p)+8)
	for i := 0; i < len(p); {
		c := p[i]
		if n := dotAt(p, i); n > 0 {
			if out[len(out)-1] != '/' { // out starts with the '/' of p[0]
				out = append(out, '.') // part of a name
				i += n
				continue
			}
			j := i + n
			switch {
			case j == len(p):
				// "/." at the end: the directory itself.
				i = j
			case p[j] == '/' || p[j] == '\\':
				i = j + 1
			default:
				if m := dotAt(p, j); m > 0 && (j+m == len(p) || p[j+m] == '/' || p[j+m] == '\\') {
					out = backUp(out)
					i = j + m
					if i < len(p) {
						i++ // the slash after ".."
					}
				} else {
					out = append(out, '.') // ".x", "..x": a name
					i = j
				}
			}
			continue
		}
		switch {
		case c == '\\':
			out = append(out, '/')
			i++
		case c == '%':
			v, ok := unhex(p, i)
			if !ok {
				return "", fmt.Errorf("%w: invalid escape at %d in %q", ErrBadPath, i, p)
			}
			switch pathClass[v] {
			case pathUnescape:
				out = append(out, v)
			case pathInvalid:
				if v == 0 {
					return "", fmt.Errorf("%w: %%00 in %q", ErrBadPath, p)
				}
				out = append(out, p[i:i+3]...) // %20, %23, %3F, %0A: kept, as in Envoy
			default:
				out = append(out, p[i:i+3]...)
			}
			i += 3
		default:
			switch pathClass[c] {
			case pathInvalid:
				return "", fmt.Errorf("%w: byte %#02x at %d in %q", ErrBadPath, c, i, p)
			case pathEscape:
				const hexd = "0123456789ABCDEF"
				out = append(out, '%', hexd[c>>4], hexd[c&15])
			default:
				out = append(out, c)
			}
			i++
		}
	}
	return string(out), nil
}

// dotAt returns the length of the dot at p[i] ("." or "%2e"/"%2E"), or 0.
func dotAt(p string, i int) int {
	if p[i] == '.' {
		return 1
	}
	if p[i] == '%' && i+2 < len(p) && p[i+1] == '2' && (p[i+2] == 'e' || p[i+2] == 'E') {
		return 3
	}
	return 0
}

// backUp removes the last segment of out, which ends with '/', keeping that segment's
// leading slash; at the root it does nothing.
func backUp(out []byte) []byte {
	i := len(out) - 2
	for i >= 0 && out[i] != '/' {
		i--
	}
	if i < 0 {
		return out
	}
	return out[:i+1]
}

// unhex decodes the escape at p[i] ('%').
func unhex(p string, i int) (byte, bool) {
	if i+2 >= len(p) {
		return 0, false
	}
	hi, ok1 := fromHex(p[i+1])
	lo, ok2 := fromHex(p[i+2])
	return hi<<4 | lo, ok1 && ok2
}

func fromHex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}
