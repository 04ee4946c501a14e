package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
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
func (n nsCapture) List() ([]bpf.Pod, error)                     { return n.c.List() }

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

// TestCaptureHalfCloseAndResets: FINs and resets cross the mesh exactly, in either order,
// with the real capture and unmodified clients (frontend on node-1 -> reviews on node-2,
// through both agents and HBONE).
func TestCaptureHalfCloseAndResets(t *testing.T) {
	m := newTestMesh(t, true)
	dst := appAddr("reviews")
	dial := func(t *testing.T) *net.TCPConn {
		c, err := m.plainDial(t, "frontend", dst)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.TCPConn)
	}
	result := func(t *testing.T) string {
		select {
		case r := <-appResults:
			return r
		case <-time.After(60 * time.Second):
			t.Fatal("the application reported nothing")
			return ""
		}
	}
	for len(appResults) > 0 {
		<-appResults
	}

	t.Run("server closes first: EOF at once, then 1 GiB the other way", func(t *testing.T) {
		c := dial(t)
		c.SetDeadline(time.Now().Add(5 * time.Minute))
		io.WriteString(c, "drain\n")
		start := time.Now()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
			t.Fatalf("after the server's FIN: %q, %v; want EOF", b, err)
		}
		t.Logf("EOF %v after the server closed", time.Since(start))
		h := sha256.New()
		if _, err := io.CopyN(io.MultiWriter(c, h), rand.NewChaCha8([32]byte{3}), 1<<30); err != nil {
			t.Fatal(err)
		}
		c.CloseWrite()
		if got, want := result(t), hex.EncodeToString(h.Sum(nil)); got != want {
			t.Fatalf("reviews hashed %s, want %s", got, want)
		}
	})
	t.Run("client closes first, then 1 GiB the other way", func(t *testing.T) {
		c := dial(t)
		c.SetDeadline(time.Now().Add(5 * time.Minute))
		fmt.Fprintf(c, "send %d\n", 1<<30)
		c.CloseWrite()
		h := sha256.New()
		n, err := io.Copy(h, c)
		want := sha256.New()
		io.CopyN(want, rand.NewChaCha8([32]byte{7}), 1<<30)
		if err != nil || n != 1<<30 || !bytes.Equal(h.Sum(nil), want.Sum(nil)) {
			t.Fatalf("received %d bytes, %v; checksum match %v", n, err, bytes.Equal(h.Sum(nil), want.Sum(nil)))
		}
	})
	t.Run("simultaneous half-close", func(t *testing.T) {
		c := dial(t)
		io.WriteString(c, "both\nfrom frontend")
		c.CloseWrite()
		b, err := io.ReadAll(c)
		if err != nil || string(b) != "from reviews" {
			t.Fatalf("frontend read %q, %v", b, err)
		}
		if got := result(t); got != "from frontend" {
			t.Fatalf("reviews read %q", got)
		}
	})
	t.Run("server resets: the client sees a reset", func(t *testing.T) {
		c := dial(t)
		io.WriteString(c, "reset\n")
		_, err := io.ReadAll(c)
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("client read ended with %v, want ECONNRESET", err)
		}
	})
	t.Run("client resets: the server sees a reset", func(t *testing.T) {
		c := dial(t)
		io.WriteString(c, "wait\nsome bytes")
		time.Sleep(200 * time.Millisecond)
		c.SetLinger(0)
		c.Close()
		if got := result(t); !strings.Contains(got, "connection reset") {
			t.Fatalf("reviews read ended with %q, want a reset", got)
		}
	})
}

// A client that reuses its source port right after a server closed first must connect:
// the agent closed first on its side and holds the tuple in TIME_WAIT, which a SYN
// handed over by sk_assign cannot reuse unless the agent retires it.
func TestCaptureServerFirstCloseThenPortReuse(t *testing.T) {
	m := newTestMesh(t, true)
	port := 0
	for i := 0; i < 3; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		var c net.Conn
		err := m.net.pods["frontend"].do(func() error {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("10.77.1.10"), Port: port}}
			var err error
			c, err = d.DialContext(ctx, "tcp", appAddr("reviews").String())
			return err
		})
		cancel()
		if err != nil {
			t.Fatalf("connection %d from port %d: %v", i, port, err)
		}
		port = c.LocalAddr().(*net.TCPAddr).Port
		io.WriteString(c, "send 5\n")
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if b, err := io.ReadAll(c); err != nil || len(b) != 5 {
			t.Fatalf("connection %d: %d bytes, %v", i, len(b), err)
		}
		c.Close()
		time.Sleep(100 * time.Millisecond) // the agent retires its TIME_WAIT as Join ends
	}
}
