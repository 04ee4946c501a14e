package waypoint

import (
	"errors"
	"testing"
)

// Envoy's own cases (test/common/http/path_utility_test.cc) and Istio's normalization
// page, then where veil refuses what Envoy lets through.
func TestNormalizePath(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		// Envoy's PathUtilityTest.
		{"/xyz", "/xyz"},
		{"/x/y/z", "/x/y/z"},
		{"/a/b/../c", "/a/c"},
		{"/a/b/./c", "/a/b/c"},
		{"/a/b/../../../../c", "/c"},
		{"/a/..\\c", "/c"},
		{"/%c0%af", "/%c0%af"},
		{"/%5c%25", "/%5c%25"},
		{"/a/b/%2E%2E/c", "/a/c"},
		{"/a/b/%2E./c", "/a/c"},
		{"/a/b/%2E/c", "/a/b/c"},
		{"/../a/b", "/a/b"},
		{"/./a/b", "/a/b"},
		{"/A/B/C", "/A/B/C"},
		{"/a/b/%2e%2e/c", "/a/c"},
		{"/a/%2F%2f/c", "/a/%2F%2f/c"},
		// Istio's normalization table: unreserved escapes decoded, others kept.
		{"/%2d%2D%30%39%41%5a%5f%61%7a%7e", "/--09AZ_az~"},
		{"/a%2fb%5cc", "/a%2fb%5cc"},
		{"/%20%3F%23%0a", "/%20%3F%23%0a"},
		// Dots, slashes and their ends.
		{"/", "/"},
		{"/.", "/"},
		{"/..", "/"},
		{"/a/.", "/a/"},
		{"/a/..", "/"},
		{"/a/b/..", "/a/"},
		{"//..", "/"},
		{"/a//b", "/a//b"},
		{"/a/.b/..c/...", "/a/.b/..c/..."},
		{"/a.b/c.", "/a.b/c."},
		{"/a/..%2e", "/a/..."},
		{"\\", ""},
		{"/\\a", "//a"},
		{"/a\\b", "/a/b"},
		// Bytes Chromium escapes.
		{"/a\"b<c>d^e`f{g|h}i", "/a%22b%3Cc%3Ed%5Ee%60f%7Bg%7Ch%7Di"},
		{"/caf\xc3\xa9", "/caf%C3%A9"},
		{"/!$&'()*+,;=:@[]", "/!$&'()*+,;=:@[]"},
	} {
		got, err := NormalizePath(tc.in)
		if tc.want == "" {
			if err == nil {
				t.Errorf("%q: %q, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%q: %q %v, want %q", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{"", "a/b", "*", "%2fa", "/a%", "/a%2", "/a%zz", "/a%%2e", "/%00", "/a\x00", "/a b", "/a\tb", "/a\x7f", "/a#b", "/a?b"} {
		if got, err := NormalizePath(in); !errors.Is(err, ErrBadPath) {
			t.Errorf("%q: %q %v, want ErrBadPath", in, got, err)
		}
	}
}

// A path already normal costs no allocation.
func TestNormalizePathFastPath(t *testing.T) {
	if n := testing.AllocsPerRun(100, func() { NormalizePath("/api/v1/reviews/1.json") }); n != 0 {
		t.Errorf("%v allocations", n)
	}
}
