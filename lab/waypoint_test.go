package lab

import (
	"bytes"
	"context"
	"testing"
	"time"
)

// withWaypoints builds the waypoint lab (WaypointSpec) instead of the default one.
func withWaypoints(s *Spec, _ *Options) {
	name := s.Name
	*s = *WaypointSpec()
	s.Name = name
	s.Family = FamilyIPv4
}

// TestWaypointDemo runs the waypoint scenarios of `make demo` end to end: the Istio
// docs' sidecar-era policies applied verbatim, enforced at the waypoint (veil's policy
// placement), and a bypass of the waypoint refused at the destination.
func TestWaypointDemo(t *testing.T) {
	l := upLab(t, withWaypoints)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out bytes.Buffer
	mismatches, err := RunWaypointDemo(ctx, l, &out)
	t.Log(out.String())
	if err != nil {
		t.Fatal(err)
	}
	if mismatches > 0 {
		t.Fatalf("%d probe(s) did not match", mismatches)
	}
	out.Reset()
	mismatches, err = RunWaypointDemoIstio(ctx, l, &out)
	t.Log(out.String())
	if err != nil {
		t.Fatal(err)
	}
	if mismatches > 0 {
		t.Fatalf("--policy-placement=istio: %d probe(s) did not match", mismatches)
	}
}
