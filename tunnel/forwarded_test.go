package tunnel

import (
	"net/netip"
	"testing"
)

func TestParseForwarded(t *testing.T) {
	tests := []struct {
		name, in string
		want     string // "" means an error
	}{
		{"ipv4 quoted", `for="10.1.0.7:40000"`, "10.1.0.7:40000"},
		{"ipv6 quoted in brackets", `for="[fd00::7]:40000"`, "[fd00::7]:40000"},
		{"parameter name is case-insensitive", `For="10.1.0.7:1"`, "10.1.0.7:1"},
		{"other parameters around it", `by="10.0.0.1:15008";for="10.1.0.7:2";proto=https`, "10.1.0.7:2"},
		{"first element wins", `for="10.1.0.7:3", for="10.9.9.9:4"`, "10.1.0.7:3"},
		{"ipv4-mapped ipv6 is unmapped", `for="[::ffff:10.1.0.7]:5"`, "10.1.0.7:5"},
		{"unquoted node with a port", `for=10.1.0.7:6`, ""},
		{"no port", `for="10.1.0.7"`, ""},
		{"obfuscated identifier", `for=_hidden`, ""},
		{"unknown", `for=unknown`, ""},
		{"no for", `by="10.0.0.1:1"`, ""},
		{"empty", ``, ""},
		{"not name=value", `for`, ""},
		{"zoned ipv6", `for="[fe80::1%eth0]:7"`, ""},
		{"for only in second element", `by=x, for="10.1.0.7:8"`, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseForwarded(tc.in)
			if tc.want == "" {
				if err == nil {
					t.Fatalf("ParseForwarded(%q) = %v, want an error", tc.in, got)
				}
				return
			}
			if err != nil || got != netip.MustParseAddrPort(tc.want) {
				t.Fatalf("ParseForwarded(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
			}
		})
	}
}

func TestFormatForwardedRoundTrips(t *testing.T) {
	for _, s := range []string{"10.1.0.7:40000", "[fd00::7]:1"} {
		ap := netip.MustParseAddrPort(s)
		got, err := ParseForwarded(FormatForwarded(ap))
		if err != nil || got != ap {
			t.Fatalf("round trip of %s: %v, %v", s, got, err)
		}
	}
}

func FuzzParseForwarded(f *testing.F) {
	for _, s := range []string{`for="10.1.0.7:40000"`, `for="[fd00::7]:1";by=x`, `for=a, for="1.2.3.4:5"`, ``, `for="`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, h string) {
		ap, err := ParseForwarded(h)
		if err != nil {
			return
		}
		if !ap.IsValid() || ap.Addr().Is4In6() || ap.Addr().Zone() != "" {
			t.Fatalf("ParseForwarded(%q) accepted %v", h, ap)
		}
		// What we accept, we can also produce and read back the same.
		back, err := ParseForwarded(FormatForwarded(ap))
		if err != nil || back != ap {
			t.Fatalf("round trip of %v: %v, %v", ap, back, err)
		}
	})
}
