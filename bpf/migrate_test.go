//go:build linux

package bpf

import (
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

// repin replaces the pinned map name with one of another layout (the same entries),
// as a previous release with other limits would have left it.
func repin(t *testing.T, pinDir, name string, change func(*ebpf.MapSpec)) {
	t.Helper()
	path := filepath.Join(pinDir, name)
	cur, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cur.Close()
	info, err := cur.Info()
	if err != nil {
		t.Fatal(err)
	}
	spec := &ebpf.MapSpec{Type: cur.Type(), KeySize: cur.KeySize(), ValueSize: cur.ValueSize(), MaxEntries: cur.MaxEntries(), Flags: cur.Flags()}
	_ = info
	change(spec)
	old, err := ebpf.NewMap(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if spec.KeySize == cur.KeySize() && spec.ValueSize == cur.ValueSize() && !perCPU(spec.Type) {
		if err := copyEntries(cur, old); err != nil {
			t.Fatal(err)
		}
	}
	if err := cur.Unpin(); err != nil {
		t.Fatal(err)
	}
	if err := old.Pin(path); err != nil {
		t.Fatal(err)
	}
}

// An upgrade that changes pinned maps' limits keeps capturing: the new release replaces
// the maps, carrying the enrollments over, and enrolled pods' connections still reach
// the agent.
func TestUpgradeAcrossAMapLayoutChange(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{})
	tp.enrollPod1(t, c)
	c.Close()
	repin(t, tp.pinDir, "veil_enrolled", func(s *ebpf.MapSpec) { s.MaxEntries = 1024 })
	repin(t, tp.pinDir, "veil_counters", func(s *ebpf.MapSpec) { s.MaxEntries = 4 })

	c = tp.load(t, Options{})
	pods, err := c.List()
	if err != nil || len(pods) != 1 || pods[0].IfIndex != tp.vp1 || len(pods[0].IPs) != 2 {
		t.Fatalf("enrollments after the upgrade: %v, %v; want pod1's two addresses", pods, err)
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(tp.pinDir, "veil_enrolled"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.MaxEntries() != 65536 {
		t.Fatalf("pinned veil_enrolled holds %d entries, want the new 65536", m.MaxEntries())
	}
	startAgent(t, tp, c)
	serve(t, tp.remote, "tcp", ":8080", "server", nil)
	dst := netip.AddrPortFrom(remoteV4, 8080)
	wantAnswer(t, mustAsk(t, tp.pod1, dst.String(), nil), "outbound", dst, pod1v4)
}

// A map whose entries changed shape cannot be carried over without a migration: the
// load is refused, naming the map, and the old pins stay as they were.
func TestUpgradeRefusesAnUnmigratableLayout(t *testing.T) {
	tp := newTopo(t)
	c := tp.load(t, Options{})
	tp.enrollPod1(t, c)
	c.Close()
	repin(t, tp.pinDir, "veil_enrolled", func(s *ebpf.MapSpec) { s.ValueSize += 4 })
	var err error
	tp.node.do(t, func() error {
		_, err = Load(Options{PinDir: tp.pinDir, Uplinks: []string{"up0"}})
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), "veil_enrolled changed its entry layout") {
		t.Fatalf("Load: %v; want a refusal naming veil_enrolled", err)
	}
}
