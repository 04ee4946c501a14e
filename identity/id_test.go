package identity

import (
	"errors"
	"testing"
)

func TestParseID(t *testing.T) {
	tests := []struct {
		name, in string
		ns, sa   string
		wantErr  error
	}{
		{name: "istio workload identity", in: "spiffe://cluster.local/ns/bookinfo/sa/reviews", ns: "bookinfo", sa: "reviews"},
		{name: "other trust domain is still a workload identity", in: "spiffe://example.org/ns/a/sa/b", ns: "a", sa: "b"},
		{name: "missing sa segment", in: "spiffe://cluster.local/ns/bookinfo", wantErr: ErrNotWorkloadID},
		{name: "extra segment", in: "spiffe://cluster.local/ns/bookinfo/sa/reviews/x", wantErr: ErrNotWorkloadID},
		{name: "segments swapped", in: "spiffe://cluster.local/sa/reviews/ns/bookinfo", wantErr: ErrNotWorkloadID},
		{name: "trust domain only", in: "spiffe://cluster.local", wantErr: ErrNotWorkloadID},
		{name: "not spiffe scheme", in: "https://cluster.local/ns/a/sa/b"},
		{name: "no scheme (policy spelling)", in: "cluster.local/ns/a/sa/b"},
		{name: "empty", in: ""},
		{name: "upper case trust domain", in: "spiffe://Cluster.Local/ns/a/sa/b"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, err := ParseID(tc.in)
			if tc.ns == "" {
				if err == nil {
					t.Fatalf("ParseID(%q) = %v, want an error", tc.in, id)
				}
				if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
					t.Fatalf("ParseID(%q) error %v, want %v", tc.in, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseID(%q): %v", tc.in, err)
			}
			ns, sa, err := Parts(id)
			if err != nil || ns != tc.ns || sa != tc.sa {
				t.Fatalf("Parts(%v) = %q, %q, %v; want %q, %q", id, ns, sa, err, tc.ns, tc.sa)
			}
			if id.String() != tc.in {
				t.Fatalf("round trip: %q != %q", id, tc.in)
			}
		})
	}
}

func TestNewID(t *testing.T) {
	id, err := NewID(testTD, "bookinfo", "productpage")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := id.String(), "spiffe://cluster.local/ns/bookinfo/sa/productpage"; got != want {
		t.Fatalf("NewID = %q, want %q", got, want)
	}
	for _, bad := range [][2]string{{"", "sa"}, {"ns", ""}, {"a/b", "sa"}, {"ns", "s a"}} {
		if id, err := NewID(testTD, bad[0], bad[1]); err == nil {
			t.Errorf("NewID(%q, %q) = %v, want an error", bad[0], bad[1], id)
		}
	}
}
