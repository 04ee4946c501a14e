package agent

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/veilmesh/veil/bpf"
	"golang.org/x/sys/unix"
)

// nsCapture runs every capture call inside the node's namespace, where interface
// indexes, netlink and TCX resolve.
type nsCapture struct {
	ns *netNS
	c  *bpf.Capture
}

func (n nsCapture) Attach(i int) error { return n.ns.do(func() error { return n.c.Attach(i) }) }
func (n nsCapture) Detach(i int) error { return n.ns.do(func() error { return n.c.Detach(i) }) }
func (n nsCapture) Enroll(p bpf.Pod) error {
	return n.ns.do(func() error { return n.c.Enroll(p) })
}
func (n nsCapture) Unenroll(p bpf.Pod) error {
	return n.ns.do(func() error { return n.c.Unenroll(p) })
}
func (n nsCapture) SetListener(r bpf.Role, l syscall.Conn) error { return n.c.SetListener(r, l) }
func (n nsCapture) Counters() ([]bpf.Counter, error)             { return n.c.Counters() }

// loadCapture loads the real capture in a node namespace, pinned on a private bpffs,
// and uninstalls it when the test ends.
func loadCapture(t *testing.T, ns *netNS, uplink string) nsCapture {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "bpffs")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	pin := filepath.Join(dir, "veil")
	var c *bpf.Capture
	if err := ns.do(func() (err error) {
		c, err = bpf.Load(bpf.Options{PinDir: pin, Uplinks: []string{uplink}})
		return err
	}); err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		t.Fatalf("load capture in %s: %v", ns.name, err)
	}
	t.Cleanup(func() {
		c.Close()
		ns.do(func() error { return bpf.Uninstall(pin) })
		unix.Unmount(dir, unix.MNT_DETACH)
	})
	return nsCapture{ns: ns, c: c}
}

// plainDial is an unmodified client in a pod: it dials the real destination.
func (m *testMesh) plainDial(t *testing.T, pod string, dst netip.AddrPort) (net.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := m.net.pods[pod].dial(ctx, dst.String())
	if err == nil {
		c.SetDeadline(time.Now().Add(60 * time.Second))
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

func (m *testMesh) plainWhoami(t *testing.T, pod string, dst netip.AddrPort) (string, error) {
	t.Helper()
	c, err := m.plainDial(t, pod, dst)
	if err != nil {
		return "", err
	}
	return ask(c, "whoami")
}

// TestCaptureEndToEnd runs the whole data path with the real eBPF capture: pods dial
// real addresses with net.Dial and never know about the agents.
func TestCaptureEndToEnd(t *testing.T) {
	m := newTestMesh(t, true)
	cases := []struct {
		name, pod string
		dst       netip.AddrPort
		want      string
	}{
		{"mesh to mesh across nodes", "frontend", appAddr("reviews"), "reviews sees 10.77.1.10"},
		{"service VIP", "frontend", netip.MustParseAddrPort("10.96.0.10:80"), "reviews sees 10.77.1.10"},
		{"same node", "reviews", appAddr("ratings"), "ratings sees 10.77.2.10"},
		{"to a pod outside the mesh", "frontend", appAddr("sleep"), "sleep sees 10.77.1.10"},
		{"from outside the mesh, PERMISSIVE", "sleep", appAddr("reviews"), "reviews sees 10.77.1.20"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got, err := m.plainWhoami(t, tc.pod, tc.dst); err != nil || got != tc.want {
				t.Fatalf("%s -> %s: %q, %v; want %q", tc.pod, tc.dst, got, err, tc.want)
			}
		})
	}
	mtls := testutil.ToFloat64(m.agents["node-2"].metrics.opened.WithLabelValues(
		"destination", "frontend", "bookinfo", "spiffe://cluster.local/ns/bookinfo/sa/frontend", "frontend",
		"reviews", "bookinfo", "spiffe://cluster.local/ns/bookinfo/sa/reviews", "reviews", "mutual_tls", "tcp"))
	if mtls != 2 {
		t.Fatalf("node-2 saw %v mTLS connections from frontend, want 2 (direct and via the VIP)", mtls)
	}

	t.Run("STRICT resets plaintext, mTLS still works", func(t *testing.T) {
		m.apply(t, strictBookinfo)
		if got, err := m.plainWhoami(t, "sleep", appAddr("reviews")); !isReset(err) {
			t.Fatalf("legacy -> reviews under STRICT: %q, %v; want a reset", got, err)
		}
		if got, err := m.plainWhoami(t, "frontend", appAddr("reviews")); err != nil || got != "reviews sees 10.77.1.10" {
			t.Fatalf("frontend -> reviews under STRICT: %q, %v", got, err)
		}
	})
	t.Run("capture counters are exported", func(t *testing.T) {
		n, err := testutil.GatherAndCount(m.agents["node-1"].Registry(), "veil_capture_packets_total")
		if err != nil || n == 0 {
			t.Fatalf("veil_capture_packets_total series: %d, %v", n, err)
		}
	})
}

// TestCaptureFailsClosedWithoutAgent: with the agent gone, an enrolled pod's new
// connections are dropped, never sent in plaintext.
func TestCaptureFailsClosedWithoutAgent(t *testing.T) {
	m := newTestMesh(t, true)
	m.agents["node-1"].Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := m.net.pods["frontend"].dial(ctx, appAddr("reviews").String())
	if err == nil {
		c.Close()
		t.Fatal("frontend reached reviews with its node's agent down")
	}
}
