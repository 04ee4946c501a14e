package lab

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"golang.org/x/net/http2"
)

// TestRootRotation performs the three steps of README "Rotating the root CA" on a
// running two-node lab, on the controller's --ca-dir as an operator would, while
// requests cross the nodes both ways over mTLS without pause:
//
//  1. the new root added to root-cert.pem: every agent trusts it (its TLS server accepts
//     a certificate of the new root, which it refused before);
//  2. signing switched to the new root's key: the certificates the agents renew chain
//     to the new root; removing the old root now is refused by the controller and
//     changes nothing;
//  3. once the longest certificate lifetime has passed (--max-ttl, one minute here), the
//     old root removed: the agents refuse a certificate of the old root and accept one
//     of the new; an agent started then, trusting the new root only, gets its
//     certificates from the CA; no tunnel connection opened before step 2 is left.
//
// Not one request fails throughout.
func TestRootRotation(t *testing.T) {
	l := upLab(t)
	ctx := context.Background()
	start := time.Now()

	// Leaves of one minute, so that "the longest certificate lifetime" is one: the
	// controller again with --max-ttl 1m, then each agent replaced as a rolling update
	// does, so that its certificates are of the new lifetime.
	const maxTTL = time.Minute
	l.restartControllerWith(t, "--max-ttl", maxTTL.String(), "--ca-check-interval", "200ms")
	for _, node := range []string{"node-1", "node-2"} {
		if err := l.RestartAgent(ctx, node, false); err != nil {
			t.Fatal(err)
		}
	}
	for _, node := range []string{"node-1", "node-2"} {
		for _, s := range l.certStates(t, node) {
			if s.State == "valid" && s.NotAfter.After(time.Now().Add(maxTTL+5*time.Second)) {
				t.Fatalf("%s: %s valid until %v, want a leaf of %v", node, s.ID, s.NotAfter, maxTTL)
			}
		}
	}

	caDir := l.path("ca")
	old, err := identity.ReadCAFiles(caDir)
	if err != nil {
		t.Fatal(err)
	}
	oldCA, err := identity.ParseCA(old, identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	newDir := t.TempDir()
	newCA, err := identity.LoadOrCreateCA(newDir, identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	next, err := identity.ReadCAFiles(newDir)
	if err != nil {
		t.Fatal(err)
	}
	oldFP, newFP := identity.Fingerprint(oldCA.SigningRoot()), identity.Fingerprint(newCA.SigningRoot())
	both := append(append([]byte(nil), old[identity.RootCertFile]...), next[identity.RootCertFile]...)
	write := func(files map[string][]byte) {
		t.Helper()
		// As the README's cp and mv: each file replaced whole.
		for _, name := range identity.CAFileNames {
			if data, ok := files[name]; ok {
				if err := identity.WriteFileAtomic(filepath.Join(caDir, name), data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
		}
	}

	// Requests across the nodes, both ways, until the end.
	traffic := crossTraffic(t, l, [][2]string{{"bookinfo/productpage", "reviews:9080"}, {"bookinfo/reviews", "productpage:9080"}})
	defer traffic.stop()
	phase := func(name string) {
		t.Logf("%6.1fs %s (%d requests, %d failed)", time.Since(start).Seconds(), name, traffic.total.Load(), traffic.failed.Load())
	}

	reviews, productpage := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/reviews"), spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/productpage")
	// A certificate of the new root is refused while the agents do not trust it: the probe
	// tells trusted from not.
	if err := l.probeHBONE(ctx, "node-1", "bookinfo/reviews", productpage, newCA); err == nil {
		t.Fatal("before step 1, node-2's agent accepted a certificate of the new root")
	}
	if err := l.probeHBONE(ctx, "node-1", "bookinfo/reviews", productpage, oldCA); err != nil {
		t.Fatalf("before step 1, node-2's agent refused a certificate of the old root: %v", err)
	}

	phase("step 1: the new root added to root-cert.pem")
	write(map[string][]byte{identity.RootCertFile: both})
	l.waitBundles(t, []string{oldFP, newFP}, 30*time.Second)
	for _, c := range []struct{ from, to string }{{"node-1", "bookinfo/reviews"}, {"node-2", "bookinfo/productpage"}} {
		if err := l.probeHBONE(ctx, c.from, c.to, productpage, newCA); err != nil {
			t.Fatalf("after step 1, the agent of %s refused a certificate of the new root: %v", c.to, err)
		}
	}

	// The tunnel connections of now were opened with certificates of the old root.
	before := l.tunnelConns(t)
	if len(before) == 0 {
		t.Fatal("no tunnel connection between the nodes before step 2")
	}
	phase("step 2: signing switched to the new root")
	write(map[string][]byte{identity.CACertFile: next[identity.CACertFile], identity.CAKeyFile: next[identity.CAKeyFile], identity.CertChainFile: next[identity.CertChainFile]})
	switched := time.Now()
	// Renewed at half-life, every certificate chains to the new root within half a lifetime.
	deadline := time.Now().Add(maxTTL/2 + 15*time.Second)
	for !l.allCertsUnder(t, newFP) {
		if time.Now().After(deadline) {
			t.Fatalf("after step 2, certificates still chain to other roots: %+v %+v", l.certStates(t, "node-1"), l.certStates(t, "node-2"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	phase("step 2: every certificate chains to the new root")

	// The old root removed too early: the controller refuses, the agents keep it.
	write(map[string][]byte{identity.RootCertFile: next[identity.RootCertFile]})
	deadline = time.Now().Add(10 * time.Second)
	for !bytes.Contains(l.controllerLog(t), []byte("drops root")) {
		if time.Now().After(deadline) {
			t.Fatalf("the controller did not refuse removing the old root %v after switching signing", time.Since(switched))
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(7 * time.Second) // the agents' --ca-root check (5 s) and the CA's answer
	l.waitBundles(t, []string{oldFP, newFP}, time.Second)
	if err := l.probeHBONE(ctx, "node-1", "bookinfo/reviews", productpage, oldCA); err != nil {
		t.Fatalf("a refused removal reached node-2's agent: it refused a certificate of the old root: %v", err)
	}
	write(map[string][]byte{identity.RootCertFile: both})
	phase("step 3 too early: refused by the controller, the agents still trust both roots")

	// The longest certificate lifetime after signing switched (and a margin for the
	// controller's read of the files), then the old root goes.
	time.Sleep(time.Until(switched.Add(maxTTL + 2*time.Second)))
	phase("step 3: the old root removed from root-cert.pem")
	write(map[string][]byte{identity.RootCertFile: next[identity.RootCertFile]})
	l.waitBundles(t, []string{newFP}, 30*time.Second)
	for _, c := range []struct {
		from, to string
		id       spiffeid.ID
	}{{"node-1", "bookinfo/reviews", productpage}, {"node-2", "bookinfo/productpage", reviews}} {
		if err := l.probeHBONE(ctx, c.from, c.to, c.id, oldCA); err == nil {
			t.Fatalf("after step 3, the agent of %s accepted a certificate of the old root", c.to)
		}
		if err := l.probeHBONE(ctx, c.from, c.to, c.id, newCA); err != nil {
			t.Fatalf("after step 3, the agent of %s refused a certificate of the new root: %v", c.to, err)
		}
	}
	// An agent started now trusts the new root only: the CA's own certificate is under it.
	if err := l.RestartAgent(ctx, "node-1", false); err != nil {
		t.Fatalf("an agent started after step 3: %v", err)
	}
	phase("step 3: an agent started since trusts the new root only and got its certificates")
	time.Sleep(3 * time.Second)
	// A pooled connection takes no new stream past its certificates' expiry: traffic
	// moved to connections opened under the new root, and the old ones closed.
	after := l.tunnelConns(t)
	for c := range before {
		if after[c] {
			t.Errorf("tunnel connection %s, opened with certificates of the old root, still open after step 3", c)
		}
	}
	if len(after) == 0 {
		t.Error("no tunnel connection between the nodes after step 3")
	}
	t.Logf("tunnel connections: %d before step 2, %d after step 3, none in common", len(before), len(after))
	traffic.stop()
	phase("done")
	if n := traffic.failed.Load(); n != 0 {
		t.Fatalf("%d of %d requests failed during the rotation; first: %v", n, traffic.total.Load(), traffic.first.Load())
	}
	if traffic.total.Load() < 100 {
		t.Fatalf("only %d requests in %v", traffic.total.Load(), time.Since(start))
	}
	t.Logf("%d requests across the nodes during a root rotation, none failed", traffic.total.Load())
}

// restartControllerWith starts the controller again with its flags and extra (later
// flags win), and waits until it answers.
func (l *Lab) restartControllerWith(t *testing.T, extra ...string) {
	t.Helper()
	pid, err := l.pid("controller")
	if err != nil {
		t.Fatal(err)
	}
	// The pid is the controller's: nsenter execs it.
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	argv := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
	if filepath.Base(argv[0]) != "veil-controller" {
		t.Fatalf("pid %d runs %q, not the controller", pid, argv)
	}
	if err := l.StopController(); err != nil {
		t.Fatal(err)
	}
	if err := l.start("controller", l.fabricNS(), append(argv, extra...)...); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err = l.waitFor(ctx, "the controller", func(ctx context.Context) error {
		c, err := dialIn(ctx, l.fabricNS(), net.JoinHostPort(ControllerIP().String(), "15012"))
		if err == nil {
			c.Close()
		}
		return err
	}, "controller")
	if err != nil {
		t.Fatal(err)
	}
}

// tunnelConns lists the established TCP connections the agents opened to port 15008
// (HBONE), as the kernel names them (node: local -> remote, hex, and the socket's inode).
func (l *Lab) tunnelConns(t *testing.T) map[string]bool {
	t.Helper()
	conns := map[string]bool{}
	for _, node := range []string{"node-1", "node-2"} {
		err := inNetns(l.nodeNS(node), func() error {
			for _, f := range []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"} {
				b, err := os.ReadFile(f)
				if err != nil {
					return err
				}
				for _, line := range strings.Split(string(b), "\n")[1:] {
					// sl local_address rem_address st ...; 3AA0 is 15008, 01 ESTABLISHED.
					fl := strings.Fields(line)
					if len(fl) > 9 && strings.HasSuffix(fl[2], ":3AA0") && fl[3] == "01" {
						conns[node+": "+fl[1]+" -> "+fl[2]+" inode "+fl[9]] = true
					}
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return conns
}

func (l *Lab) controllerLog(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(l.path("logs", "controller.log"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (l *Lab) adminJSON(t *testing.T, node, path string, v any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	body, err := l.NodeGet(ctx, node, "127.0.0.1:15000", path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("%s %s: %v", node, path, err)
	}
}

func (l *Lab) certStates(t *testing.T, node string) []identity.CertState {
	var s []identity.CertState
	l.adminJSON(t, node, "/certs", &s)
	return s
}

// allCertsUnder reports whether every valid certificate of both agents chains to root.
func (l *Lab) allCertsUnder(t *testing.T, root string) bool {
	for _, node := range []string{"node-1", "node-2"} {
		for _, s := range l.certStates(t, node) {
			if s.State != "expired" && s.RootSHA256 != root {
				return false
			}
		}
	}
	return true
}

// waitBundles waits until both agents' trust bundles are exactly roots (fingerprints),
// as /trust_bundle shows them.
func (l *Lab) waitBundles(t *testing.T, roots []string, limit time.Duration) {
	t.Helper()
	want := slices.Sorted(slices.Values(roots))
	deadline := time.Now().Add(limit)
	for {
		var got [][]string
		for _, node := range []string{"node-1", "node-2"} {
			var bs []identity.BundleState
			l.adminJSON(t, node, "/trust_bundle", &bs)
			var fps []string
			for _, b := range bs {
				for _, r := range b.Roots {
					fps = append(fps, r.SHA256)
				}
			}
			slices.Sort(fps)
			got = append(got, fps)
		}
		if slices.Equal(got[0], want) && slices.Equal(got[1], want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("trust bundles %v, want %v on both agents", got, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// probeHBONE opens a TLS connection from a node to a pod's HBONE port, presenting a
// certificate for id that ca issues, and reports whether the pod's agent accepted it.
func (l *Lab) probeHBONE(ctx context.Context, fromNode, pod string, id spiffeid.ID, ca *identity.CA) error {
	p, err := l.Spec.Pod(pod)
	if err != nil {
		return err
	}
	key, csr, err := identity.NewCSR(id)
	if err != nil {
		return err
	}
	iss, err := ca.Issue(ctx, id, csr, key, 10*time.Minute)
	if err != nil {
		return err
	}
	cert := tls.Certificate{PrivateKey: key}
	for _, c := range iss.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	raw, err := dialIn(dctx, l.nodeNS(fromNode), net.JoinHostPort(l.Spec.PodIP(p).String(), "15008"))
	if err != nil {
		return err
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(3 * time.Second))
	// The server's identity is not what this probe checks.
	c := tls.Client(raw, &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{identity.ALPN},
		Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true})
	if err := c.Handshake(); err != nil {
		return err
	}
	// The server answers the client's preface with SETTINGS once it has accepted the
	// certificate; in TLS 1.3 a refusal arrives as an alert on this first read.
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		return fmt.Errorf("after the handshake: %w", err)
	}
	if _, err := c.Read(make([]byte, 9)); err != nil {
		return fmt.Errorf("after the handshake: %w", err)
	}
	return nil
}
