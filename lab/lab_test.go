package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The end-to-end tests run the real binaries (built here) on a two-node lab with the
// eBPF capture. They need root, as CI has.

var binDir string

func TestMain(m *testing.M) {
	code := func() int {
		if os.Geteuid() == 0 {
			dir, err := os.MkdirTemp("", "veil-lab-bin-")
			if err != nil {
				panic(err)
			}
			defer os.RemoveAll(dir)
			out, err := exec.Command("go", "build", "-o", dir+"/", "../cmd/...").CombinedOutput()
			if err != nil {
				os.Stderr.Write(out)
				panic(err)
			}
			binDir = dir
		}
		return m.Run()
	}()
	os.Exit(code)
}

// requireRoot skips a kernel test without root, except in CI, where it fails: CI runs as
// root, so a skip there would hide the test.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI must run the kernel tests as root: needs root (network namespaces, eBPF)")
		}
		t.Skip("needs root (network namespaces, eBPF); CI runs it as root")
	}
}

// upLab brings up the default lab under a random name, dual-stack, changed by each of
// with (kubeLab: a kube lab; withNetwork; withFamily), and takes it down when the test
// ends. Dual-stack, so that every end-to-end test runs over IPv4 and IPv6 (want and
// eventually check each family) in one lab.
func upLab(t *testing.T, with ...func(*Spec, *Options)) *Lab {
	t.Helper()
	requireRoot(t)
	spec := DefaultSpec()
	b := make([]byte, 3)
	rand.Read(b)
	spec.Name = "t" + hex.EncodeToString(b)
	spec.Family = FamilyDual
	var log bytes.Buffer
	opts := Options{BinDir: binDir, StateRoot: t.TempDir(), Log: &log}
	for _, f := range with {
		f(spec, &opts)
	}
	limit := 2 * time.Minute
	if opts.Kube {
		limit = 5 * time.Minute // the API server's start, and its first build if make kube-build has not run
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	l, err := Up(ctx, spec, opts)
	if err != nil {
		t.Fatalf("lab up: %v\n%s", err, log.String())
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, f := range []string{"logs/agent-node-1", "logs/agent-node-2", "logs/controller", "kube/kube-apiserver"} {
				b, err := os.ReadFile(l.path(f + ".log"))
				if err != nil {
					continue // kube/: a kube lab's only
				}
				if len(b) > 4000 {
					b = b[len(b)-4000:]
				}
				t.Logf("--- %s\n%s", f, b)
			}
		}
		if err := Down(spec.Name, opts); err != nil {
			t.Errorf("lab down: %v", err)
		}
		names, _ := netnsList()
		for _, n := range names {
			if strings.HasPrefix(n, "veil-"+spec.Name+"-") {
				t.Errorf("namespace %s left behind", n)
			}
		}
	})
	return l
}

// want makes a request from a pod to a target in each of the lab's families and fails
// the test unless each gets want.
func (l *Lab) want(t *testing.T, from, to, want string) {
	t.Helper()
	addrs, err := l.targets(to)
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range addrs {
		if got := l.Request(context.Background(), from, addr); got.Result != want {
			t.Fatalf("%s -> %s (%s): %s %q, want %s", from, to, addr, got.Result, got.Body, want)
		}
	}
}

// TestDemoScenarios runs every scenario of `make demo` on a fresh dual-stack lab, each
// probe over IPv4 and over IPv6.
func TestDemoScenarios(t *testing.T) {
	l := upLab(t)
	var out bytes.Buffer
	mismatches, err := RunDemo(context.Background(), l, &out)
	t.Log("\n" + out.String())
	if err != nil || mismatches != 0 {
		t.Fatalf("demo: %d mismatches, %v", mismatches, err)
	}

	// Dual-stack: every path keeps the client's address in its own family, and the
	// config stream carries both addresses of a pod.
	sourcesPreserved(t, l)
	bothAddresses(t, l)

	// The operator commands, as an operator runs them against this lab.
	strict, _ := demoPolicies.ReadFile("demo/peer-auth-ratings-port-level.yaml")
	if err := l.Apply("port-level.yaml", strict); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitObjects(context.Background(), []string{"PeerAuthentication bookinfo/ratings-permissive"}, nil); err != nil {
		t.Fatal(err)
	}
	veilctl := func(cmd, args []string) string {
		argv := append(append(append([]string(nil), cmd...), "--lab", l.Spec.Name, "--state-root", l.opts.StateRoot), args...)
		out, err := exec.Command(filepath.Join(binDir, "veilctl"), argv...).CombinedOutput()
		if err != nil {
			t.Fatalf("veilctl %v: %v\n%s", argv, err, out)
		}
		return string(out)
	}
	for _, tc := range []struct {
		cmd, args, want []string
	}{
		{[]string{"describe", "pod"}, []string{"bookinfo/ratings"}, []string{"Identity:  spiffe://cluster.local/ns/bookinfo/sa/ratings", "port 9080  STRICT (configured STRICT, by PeerAuthentication bookinfo/ratings-permissive)", "port 8080  PERMISSIVE (configured DISABLE"}},
		{[]string{"describe", "pod"}, []string{"legacy/sleep"}, []string{"Mesh:      not enrolled"}},
		{[]string{"certs"}, []string{"bookinfo/reviews"}, []string{"SPIFFE ID:    spiffe://cluster.local/ns/bookinfo/sa/reviews", "State:        valid", "Rotation:", "root"}},
		{[]string{"policy", "explain"}, []string{"--from", "legacy/sleep", "--to", "bookinfo/ratings:9080"}, []string{"DENY", "policy:   bookinfo/converted_peer_authentication_ratings-permissive"}},
		{[]string{"policy", "explain"}, []string{"--from", "bookinfo/productpage", "--to", "bookinfo/ratings:9080"}, []string{"ALLOW", "mTLS as spiffe://cluster.local/ns/bookinfo/sa/productpage"}},
	} {
		out := veilctl(tc.cmd, tc.args)
		for _, w := range tc.want {
			if !strings.Contains(out, w) {
				t.Errorf("veilctl %v %v: output lacks %q:\n%s", tc.cmd, tc.args, w, out)
			}
		}
	}
}

func TestResilience(t *testing.T) {
	l := upLab(t)
	ctx := context.Background()
	strict, err := demoPolicies.ReadFile("demo/peer-auth-namespace-strict.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// Each step starts from the state the one before left: after a failure the rest
	// would only report that state.
	step := func(name string, f func(t *testing.T)) {
		if !t.Run(name, f) {
			t.FailNow()
		}
	}

	step("policy change reaches new connections in under a second and closes denied ones", func(t *testing.T) {
		// A plaintext connection from outside the mesh, held open.
		held, err := l.DialFrom(ctx, "legacy/sleep", l.mustTarget(t, "reviews:9080"))
		if err != nil {
			t.Fatal(err)
		}
		defer held.Close()
		if _, err := held.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 512)
		held.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := held.Read(buf); err != nil {
			t.Fatalf("held connection before STRICT: %v", err)
		}
		start := time.Now()
		if err := l.Apply("strict.yaml", strict); err != nil {
			t.Fatal(err)
		}
		// Poll new connections until one is refused.
		var took time.Duration
		for {
			if got := l.Request(ctx, "legacy/sleep", l.mustTarget(t, "reviews:9080")); got.Result == "reset" {
				took = time.Since(start)
				break
			}
			if time.Since(start) > 10*time.Second {
				t.Fatal("STRICT never took effect")
			}
		}
		t.Logf("STRICT refused new plaintext connections %v after apply", took)
		if took >= time.Second {
			t.Errorf("policy change took %v to reach new connections, want under 1s", took)
		}
		held.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := held.Read(buf); err == nil {
			t.Fatal("the held plaintext connection survived STRICT")
		}
		l.want(t, "bookinfo/productpage", "reviews:9080", "200")
	})

	step("bad policy YAML is refused and the previous policy stays in force", func(t *testing.T) {
		bad := strings.Replace(string(strict), "mode: STRICT", "mode: STRCT", 1)
		err := l.Apply("strict.yaml", []byte(bad))
		if err == nil || !strings.Contains(err.Error(), "bookinfo/default") || !strings.Contains(err.Error(), "spec.mtls.mode") {
			t.Fatalf("apply of a bad mode: %v, want an error naming the object and field", err)
		}
		// Written straight into the config directory, bypassing validation, the agents
		// reject it themselves and keep the last good version.
		if err := os.WriteFile(filepath.Join(l.ConfigDir(), configName("strict.yaml")), []byte(bad), 0o644); err != nil {
			t.Fatal(err)
		}
		time.Sleep(1500 * time.Millisecond) // three reloads
		l.want(t, "legacy/sleep", "reviews:9080", "reset")
		if err := os.WriteFile(filepath.Join(l.ConfigDir(), configName("strict.yaml")), strict, 0o644); err != nil {
			t.Fatal(err)
		}
	})

	step("controller killed: traffic and policy keep working, a restarted agent uses its cache", func(t *testing.T) {
		if err := l.StopController(); err != nil {
			t.Fatal(err)
		}
		l.want(t, "bookinfo/productpage", "svc/reviews", "200")
		l.want(t, "legacy/sleep", "reviews:9080", "reset")
		// An agent restarted while the controller is down enforces its cached config.
		if err := l.StopAgent("node-2"); err != nil {
			t.Fatal(err)
		}
		if err := l.StartAgentCached(ctx, "node-2"); err != nil {
			t.Fatal(err)
		}
		l.want(t, "legacy/sleep", "reviews:9080", "reset")
		if err := l.RestartController(ctx); err != nil {
			t.Fatal(err)
		}
		// Back with the CA, the restarted agent gets its certificates and serves mTLS.
		l.eventually(t, "bookinfo/productpage", "reviews:9080", "200", 20*time.Second, 200*time.Millisecond,
			"mTLS to the restarted agent never recovered after the controller came back")
	})

	step("agent killed: no plaintext leak; restarted: capture resumes", func(t *testing.T) {
		if err := l.Delete("strict.yaml"); err != nil {
			t.Fatal(err)
		}
		if err := l.WaitObjects(ctx, nil, []string{"PeerAuthentication bookinfo/default"}); err != nil {
			t.Fatal(err)
		}
		l.want(t, "legacy/sleep", "reviews:9080", "200")
		if err := l.StopAgent("node-2"); err != nil {
			t.Fatal(err)
		}
		// Enrolled pods of node-2 can be reached by nobody and reach nobody: dropped, never
		// delivered in plaintext.
		for _, c := range [][2]string{{"legacy/sleep", "reviews:9080"}, {"bookinfo/productpage", "reviews:9080"}, {"bookinfo/reviews", "productpage:9080"}} {
			ctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
			got := l.Request(ctx, c[0], l.mustTarget(t, c[1]))
			cancel()
			if got.Result == "200" {
				t.Fatalf("%s -> %s answered with node-2's agent down: %s", c[0], c[1], got.Body)
			}
		}
		if err := l.StartAgent(ctx, "node-2"); err != nil {
			t.Fatal(err)
		}
		l.want(t, "bookinfo/productpage", "reviews:9080", "200")
		l.want(t, "bookinfo/reviews", "productpage:9080", "200")
	})
}

// applyStrict applies the demo's namespace-wide STRICT PeerAuthentication for bookinfo
// and waits until the agents have it.
func (l *Lab) applyStrict(t *testing.T) {
	t.Helper()
	strict, err := demoPolicies.ReadFile("demo/peer-auth-namespace-strict.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Apply("strict.yaml", strict); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitObjects(context.Background(), []string{"PeerAuthentication bookinfo/default"}, nil); err != nil {
		t.Fatal(err)
	}
}

// eventually repeats a request from a pod to a target every interval until it gets want,
// in each of the lab's families, and fails the test with why after limit.
func (l *Lab) eventually(t *testing.T, from, to, want string, limit, interval time.Duration, why string) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for _, target := range l.mustTargets(t, to) {
		for l.Request(context.Background(), from, target).Result != want {
			if time.Now().After(deadline) {
				t.Fatalf("%s (%s -> %s)", why, from, target)
			}
			time.Sleep(interval)
		}
	}
}

func (l *Lab) mustTarget(t *testing.T, to string) string {
	t.Helper()
	return l.mustTargets(t, to)[0]
}

// mustTargets is targets, failing the test on an error: an address per family.
func (l *Lab) mustTargets(t *testing.T, to string) []string {
	t.Helper()
	all, err := l.targets(to)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range all {
		if _, _, err := net.SplitHostPort(a); err != nil {
			t.Fatal(err)
		}
	}
	return all
}

// TestRollingAgentRestarts: agents replaced as a DaemonSet rolling update replaces them
// (veilctl lab restart-agent), one node after the other, twice, under a continuous
// stream of new connections across the nodes: not one fails, and a keep-alive connection
// opened before a restart still answers while the old agent drains.
func TestRollingAgentRestarts(t *testing.T) {
	l := upLab(t)
	ctx := context.Background()
	traffic := crossTraffic(t, l, [][2]string{{"bookinfo/frontend", "reviews:9080"}, {"bookinfo/reviews", "productpage:9080"}})
	defer traffic.stop()
	for round := 0; round < 2; round++ {
		for _, node := range []string{"node-1", "node-2"} {
			held, err := l.DialFrom(ctx, "bookinfo/frontend", l.mustTarget(t, "reviews:9080"))
			if err != nil {
				t.Fatal(err)
			}
			old, err := l.pid("agent-" + node)
			if err != nil {
				t.Fatal(err)
			}
			restarted := make(chan error, 1)
			go func() { restarted <- l.RestartAgent(ctx, node, false) }()
			// Wait until the new agent answers readiness: the old one has handed over and
			// drains for its grace; this connection was proxied by it and answers still.
			deadline := time.Now().Add(30 * time.Second)
			for {
				pid, _ := l.pid("agent-" + node)
				body, _ := l.NodeGet(ctx, node, "127.0.0.1:15021", "/healthz/ready")
				if pid != old && bytes.Contains(body, []byte(fmt.Sprintf("ready (pid %d)", pid))) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("round %d, %s: the new agent never became ready", round, node)
				}
				time.Sleep(20 * time.Millisecond)
			}
			held.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.WriteString(held, "GET / HTTP/1.0\r\nHost: reviews\r\n\r\n"); err != nil {
				t.Fatalf("round %d, %s: held connection: %v", round, node, err)
			}
			b, err := io.ReadAll(held)
			held.Close()
			if err != nil || !bytes.HasPrefix(b, []byte("HTTP/1.0 200")) && !bytes.HasPrefix(b, []byte("HTTP/1.1 200")) {
				t.Fatalf("round %d, %s: held connection answered %q, %v", round, node, b, err)
			}
			if err := <-restarted; err != nil {
				t.Fatal(err)
			}
		}
	}
	traffic.stop()
	if n := traffic.failed.Load(); n != 0 {
		t.Fatalf("%d of %d connections failed across 4 agent restarts; first: %v", n, traffic.total.Load(), traffic.first.Load())
	}
	t.Logf("%d connections across 4 rolling agent restarts, none failed", traffic.total.Load())
}

// traffic is a stream of requests, each pair's after the other, counted until stop.
type traffic struct {
	total, failed atomic.Int64
	first         atomic.Value // the first failure, described
	done          chan struct{}
	once          sync.Once
	wg            sync.WaitGroup
}

// crossTraffic sends requests from each pair's pod to its target ("pod:port"), one after
// another per pair and IP family of the lab, until stop.
func crossTraffic(t *testing.T, l *Lab, pairs [][2]string) *traffic {
	t.Helper()
	tr := &traffic{done: make(chan struct{})}
	for _, p := range pairs {
		for _, target := range l.mustTargets(t, p[1]) {
			tr.run(l, p[0], target)
		}
	}
	return tr
}

// run sends requests from a pod to target, one after another, until stop.
func (tr *traffic) run(l *Lab, from, target string) {
	tr.wg.Add(1)
	go func() {
		defer tr.wg.Done()
		for {
			select {
			case <-tr.done:
				return
			default:
			}
			got := l.Request(context.Background(), from, target)
			tr.total.Add(1)
			if got.Result != "200" {
				tr.failed.Add(1)
				tr.first.CompareAndSwap(nil, fmt.Sprintf("%s: %s -> %s: %s %q", time.Now().Format(time.TimeOnly), from, target, got.Result, got.Body))
			}
		}
	}()
}

// stop ends the requests and waits for them; it may be called again.
func (tr *traffic) stop() {
	tr.once.Do(func() { close(tr.done) })
	tr.wg.Wait()
}

// sniffFabric counts the frames crossing the lab's fabric (every port of its bridge)
// that carry marker, until stop is closed.
func sniffFabric(t *testing.T, l *Lab, marker []byte) (count func() int64, stop func()) {
	t.Helper()
	var fd int
	err := inNetns(l.fabricNS(), func() (err error) {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
		return err
	})
	if err != nil {
		t.Fatalf("packet socket in the fabric: %v", err)
	}
	tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	var n atomic.Int64
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 65536)
		for {
			select {
			case <-done:
				return
			default:
			}
			m, _, err := unix.Recvfrom(fd, buf, 0)
			if err == nil && bytes.Contains(buf[:m], marker) {
				n.Add(1)
			}
		}
	}()
	var once sync.Once
	return n.Load, func() { once.Do(func() { close(done); wg.Wait(); unix.Close(fd) }) }
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// markedRequest sends one HTTP request whose path is marker from a pod to target, and
// reports whether it was answered 200.
func markedRequest(ctx context.Context, l *Lab, from, target string, marker []byte) bool {
	dctx, cancel := context.WithTimeout(ctx, time.Second)
	c, err := l.DialFrom(dctx, from, target)
	cancel()
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintf(c, "GET /%s HTTP/1.0\r\nHost: reviews\r\n\r\n", marker)
	b, err := io.ReadAll(c)
	return err == nil && bytes.Contains(b, []byte(" 200 "))
}

// markedTraffic sends marked requests from a pod to target, one after another, until
// stop; answered counts those answered 200.
func markedTraffic(l *Lab, from, target string, marker []byte) (answered *atomic.Int64, stop func()) {
	answered = new(atomic.Int64)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			if markedRequest(context.Background(), l, from, target, marker) {
				answered.Add(1)
			}
		}
	}()
	var once sync.Once
	return answered, func() { once.Do(func() { close(done); wg.Wait() }) }
}

// waitAnswered waits, up to limit, for n more answered requests, or fails with why.
func waitAnswered(t *testing.T, answered *atomic.Int64, n int64, limit time.Duration, why string) {
	t.Helper()
	before := answered.Load()
	for deadline := time.Now().Add(limit); answered.Load() < before+n; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal(why)
		}
	}
}

// TestKillNineNeverLeaksPlaintext: while marked requests flow from an enrolled pod to an
// enrolled pod on the other node, both agents are killed (kill -9) and restarted, five
// times: not one byte of marked payload crosses the fabric in plaintext. A request from
// outside the mesh, in plaintext, is seen on the fabric: the sniffer works.
func TestKillNineNeverLeaksPlaintext(t *testing.T) {
	l := upLab(t)
	ctx := context.Background()
	marker := []byte("veil-marker-7f3a")
	count, stop := sniffFabric(t, l, marker)
	defer stop()
	// Marked traffic in each IP family, side by side.
	targets := l.mustTargets(t, "reviews:9080")
	sent := make([]*atomic.Int64, len(targets))
	stops := make([]func(), len(targets))
	for i, target := range targets {
		sent[i], stops[i] = markedTraffic(l, "bookinfo/frontend", target, marker)
		defer stops[i]()
	}
	stopTraffic := func() {
		for _, stop := range stops {
			stop()
		}
	}
	answered := func() (n int64) {
		for _, s := range sent {
			n += s.Load()
		}
		return n
	}
	for i := 0; i < 5; i++ {
		for _, node := range []string{"node-1", "node-2"} {
			// Marked traffic flows before each kill, in every family.
			for j, target := range targets {
				waitAnswered(t, sent[j], 20, 10*time.Second, fmt.Sprintf("cycle %d, %s: marked requests to %s stopped flowing", i, node, target))
			}
			if err := l.RestartAgent(ctx, node, true); err != nil {
				t.Fatal(err)
			}
		}
	}
	time.Sleep(200 * time.Millisecond)
	stopTraffic()
	time.Sleep(200 * time.Millisecond)
	if n := count(); n != 0 {
		t.Fatalf("%d frames on the fabric carried the marker in plaintext (of %d requests answered)", n, answered())
	}
	// The positive control, in each family: plaintext from outside the mesh shows on the
	// fabric.
	for j, target := range targets {
		if sent[j].Load() == 0 {
			t.Fatalf("no marked request to %s got through at all", target)
		}
		before := count()
		if !markedRequest(ctx, l, "legacy/sleep", target, marker) {
			t.Fatalf("legacy/sleep -> reviews (%s): no 200", target)
		}
		time.Sleep(200 * time.Millisecond)
		if count() == before {
			t.Fatalf("the sniffer saw nothing of a plaintext request to %s: it does not work", target)
		}
		t.Logf("%d marked requests to %s through 10 kill -9 restarts", sent[j].Load(), target)
	}
	t.Logf("%d marked requests through 10 kill -9 restarts: 0 frames of plaintext on the fabric", answered())
}

// procStats reads a process's resident memory (kB) and open descriptors.
func procStats(t *testing.T, pid int) (rssKB, fds int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &rssKB)
		}
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return rssKB, len(ents)
}

// goroutines reads go_goroutines from a node agent's metrics.
func (l *Lab) goroutines(t *testing.T, node string) int {
	t.Helper()
	b, err := l.NodeGet(context.Background(), node, "127.0.0.1:15020", "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "go_goroutines "); ok {
			var n int
			fmt.Sscan(v, &n)
			return n
		}
	}
	t.Fatal("no go_goroutines in the agent's metrics")
	return 0
}

// TestTenThousandIdleConnections holds 10,000 idle keep-alive connections from two pods
// of node-1 to reviews on node-2, through both agents, and reports what each costs the
// agents; once they close, goroutines and descriptors come back to where they were.
func TestTenThousandIdleConnections(t *testing.T) {
	l := upLab(t)
	ctx := context.Background()
	const total = 10000
	target := l.mustTarget(t, "reviews:9080")
	pids := map[string]int{}
	type base struct{ rss, fds, gor int }
	before := map[string]base{}
	for _, node := range []string{"node-1", "node-2"} {
		pid, err := l.pid("agent-" + node)
		if err != nil {
			t.Fatal(err)
		}
		pids[node] = pid
		l.Request(ctx, "bookinfo/frontend", target) // warm: certificates, pooled tunnel
		rss, fds := procStats(t, pid)
		before[node] = base{rss, fds, l.goroutines(t, node)}
	}
	conns := make([]net.Conn, total)
	var wg sync.WaitGroup
	var failed atomic.Int64
	var first atomic.Value
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < total; i += 8 {
				from := []string{"bookinfo/frontend", "bookinfo/productpage"}[i%2]
				c, err := l.DialFrom(ctx, from, target)
				if err == nil {
					c.SetDeadline(time.Now().Add(20 * time.Second))
					_, err = io.WriteString(c, "GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
				}
				if err == nil {
					buf := make([]byte, 4096)
					var n int
					n, err = c.Read(buf)
					if err == nil && !bytes.Contains(buf[:n], []byte(" 200 ")) {
						err = fmt.Errorf("answer %q", buf[:n])
					}
					c.SetDeadline(time.Time{})
				}
				if err != nil {
					failed.Add(1)
					first.CompareAndSwap(nil, err.Error())
					if c != nil {
						c.Close()
					}
					continue
				}
				conns[i] = c
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d connections failed; first: %v", n, total, first.Load())
	}
	time.Sleep(time.Second)
	for _, node := range []string{"node-1", "node-2"} {
		rss, fds := procStats(t, pids[node])
		g := l.goroutines(t, node)
		b := before[node]
		t.Logf("%s agent with %d idle connections: RSS %d MB (+%.1f KiB a connection), %d descriptors (+%d), %d goroutines (+%d)",
			node, total, rss/1024, float64(rss-b.rss)/total, fds, fds-b.fds, g, g-b.gor)
	}
	for i, c := range conns {
		c.Close()
		conns[i] = nil
	}
	// What stays: the pooled HBONE connections that carried the streams (100 streams a
	// connection), a descriptor and two goroutines each, until their idle timeout.
	pooled := total / 100
	for _, node := range []string{"node-1", "node-2"} {
		b := before[node]
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, fds := procStats(t, pids[node])
			g := l.goroutines(t, node)
			if fds <= b.fds+pooled+5 && g <= b.gor+2*pooled+10 {
				rss, _ := procStats(t, pids[node])
				t.Logf("%s agent after they closed: %d descriptors, %d goroutines, RSS %d MB", node, fds, g, rss/1024)
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s agent did not come back: %d descriptors (was %d), %d goroutines (was %d)", node, fds, b.fds, g, b.gor)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// seriesCount counts the metric series an agent exports.
func (l *Lab) seriesCount(t *testing.T, node string) int {
	t.Helper()
	b, err := l.NodeGet(context.Background(), node, "127.0.0.1:15020", "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if line != "" && !strings.HasPrefix(line, "#") {
			n++
		}
	}
	return n
}

// TestPodChurn: a minute of pods created and deleted continuously (a new set every
// 200 ms) while traffic flows; once it stops, each agent is back at its baseline of
// goroutines, descriptors, memory and metric series.
func TestPodChurn(t *testing.T) {
	l := upLab(t)
	ctx := context.Background()
	dur := time.Minute
	if testing.Short() {
		dur = 10 * time.Second
	}
	l.want(t, "bookinfo/frontend", "reviews:9080", "200")
	l.want(t, "bookinfo/reviews", "productpage:9080", "200")
	type snap struct{ rss, fds, gor, series int }
	take := func(node string) snap {
		pid, err := l.pid("agent-" + node)
		if err != nil {
			t.Fatal(err)
		}
		rss, fds := procStats(t, pid)
		return snap{rss, fds, l.goroutines(t, node), l.seriesCount(t, node)}
	}
	before := map[string]snap{"node-1": take("node-1"), "node-2": take("node-2")}
	file := filepath.Join(l.ConfigDir(), "churn.yaml")
	start := time.Now()
	var gen int
	for time.Since(start) < dur {
		var b strings.Builder
		for k := 0; k < 20; k++ {
			node := []string{"node-1", "node-2"}[k%2]
			fmt.Fprintf(&b, "---\napiVersion: v1\nkind: Pod\nmetadata: {name: churn-%d-%d, namespace: bookinfo, labels: {app: churn}}\nspec: {serviceAccountName: churn-%d, nodeName: %s}\nstatus: {podIP: 10.100.%d.%d, hostIP: %s}\n",
				gen, k, gen%7, node, k%2+1, 100+k/2, l.Spec.NodeIP(node))
		}
		if err := os.WriteFile(file+".tmp", []byte(b.String()), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".tmp", file); err != nil {
			t.Fatal(err)
		}
		gen++
		// Traffic meanwhile, so the metrics see flows come and go.
		l.Request(ctx, "bookinfo/frontend", l.mustTarget(t, "reviews:9080"))
		time.Sleep(200 * time.Millisecond)
	}
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	for _, node := range []string{"node-1", "node-2"} {
		b := before[node]
		deadline := time.Now().Add(30 * time.Second)
		for {
			a := take(node)
			// Memory: within 8 MB of where it was (the Go heap settles, it does not shrink
			// to the byte); the rest exactly, but for a few goroutines coming and going.
			if a.fds <= b.fds+2 && a.gor <= b.gor+5 && a.series <= b.series && a.rss <= b.rss+8*1024 {
				t.Logf("%s agent after %d generations of pods: RSS %d -> %d MB, descriptors %d -> %d, goroutines %d -> %d, series %d -> %d",
					node, gen, b.rss/1024, a.rss/1024, b.fds, a.fds, b.gor, a.gor, b.series, a.series)
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s agent did not come back after the churn: before %+v, after %+v", node, b, a)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// previousRelease is the last commit that landed before the hitless handover: agents of
// this release take over from its agents.
const previousRelease = "056ea6d208079887b4a65bced5e7a6aac897fe59"

// releases caches buildRelease's builds for the test process, under binDir (removed
// with it).
var releases struct {
	sync.Mutex
	bins map[string]string
}

// buildRelease builds the binaries of a commit of this repository, once per test
// process, and returns their directory.
func buildRelease(t *testing.T, commit string) string {
	t.Helper()
	releases.Lock()
	defer releases.Unlock()
	if bin := releases.bins[commit]; bin != "" {
		return bin
	}
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Fatalf("the upgrade test needs the repository's history (git): %v", err)
	}
	repo := strings.TrimSpace(string(top))
	if out, err := exec.Command("git", "-C", repo, "cat-file", "-e", commit+"^{commit}").CombinedOutput(); err != nil {
		t.Fatalf("commit %s of the previous release is not in this clone (a shallow clone?): %v: %s", commit, err, out)
	}
	tree := filepath.Join(t.TempDir(), "release")
	if out, err := exec.Command("git", "-C", repo, "worktree", "add", "--detach", tree, commit).CombinedOutput(); err != nil {
		t.Fatalf("git worktree add: %v: %s", err, out)
	}
	defer exec.Command("git", "-C", repo, "worktree", "remove", "--force", tree).Run()
	bin := filepath.Join(binDir, "release-"+commit[:12])
	cmd := exec.Command("go", "build", "-o", bin+"/", "./cmd/...")
	cmd.Dir = tree
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v: %s", commit, err, out)
	}
	if releases.bins == nil {
		releases.bins = map[string]string{}
	}
	releases.bins[commit] = bin
	return bin
}

// TestUpgradeFromPreviousRelease: a lab brought up by the previous release's binaries
// is upgraded, agent by agent, to this release's. That release cannot hand its listeners
// over, so each old agent is stopped and the new one adopts its pinned capture: new
// connections wait meanwhile (fail closed), marked traffic never crosses the fabric in
// plaintext, and enrolled pods reach each other through the new agents afterwards.
func TestUpgradeFromPreviousRelease(t *testing.T) {
	requireRoot(t)
	old := buildRelease(t, previousRelease)
	b := make([]byte, 3)
	rand.Read(b)
	name := "u" + hex.EncodeToString(b)
	if out, err := exec.Command(filepath.Join(old, "veilctl"), "lab", "up", "--name", name).CombinedOutput(); err != nil {
		t.Fatalf("previous release: veilctl lab up: %v\n%s", err, out)
	}
	opts := Options{BinDir: binDir, Log: io.Discard}
	t.Cleanup(func() {
		if err := Down(name, opts); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})
	l, err := Open(name, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	l.want(t, "bookinfo/frontend", "reviews:9080", "200")
	marker := []byte("veil-upgrade-marker-51c9")
	count, stop := sniffFabric(t, l, marker)
	defer stop()
	target := l.mustTarget(t, "reviews:9080")
	answered, stopTraffic := markedTraffic(l, "bookinfo/frontend", target, marker)
	defer stopTraffic()
	for _, node := range []string{"node-1", "node-2"} {
		if err := l.RestartAgent(ctx, node, true); err != nil {
			t.Fatalf("upgrade the agent of %s: %v", node, err)
		}
	}
	waitAnswered(t, answered, 20, 20*time.Second, "marked requests do not flow through the upgraded agents")
	stopTraffic()
	time.Sleep(200 * time.Millisecond)
	if n := count(); n != 0 {
		t.Fatalf("%d frames of marked plaintext crossed the fabric during the upgrade", n)
	}
	// From here on the agents hand over: a rolling restart refuses nothing.
	if err := l.RestartAgent(ctx, "node-1", false); err != nil {
		t.Fatal(err)
	}
	l.want(t, "bookinfo/frontend", "reviews:9080", "200")
	t.Logf("upgraded from %s: %d marked requests answered, 0 frames of plaintext", previousRelease[:7], answered.Load())
}

// TestVersionSkew: an agent of the previous release works with this release's
// controller and agents (TestUpgradeFromPreviousRelease has this release's agents with
// the previous controller). The fields it does not know (the pods' UIDs) it ignores; it
// serves mTLS to and from this release's agent, and enforces the policies this
// controller pushes. A kube lab's controller has an EndpointSlice (default/kubernetes),
// a kind that release does not decode: it is not sent to it (Subscribe's kinds).
func TestVersionSkew(t *testing.T) {
	t.Run("config directory", func(t *testing.T) { versionSkew(t, upLab(t)) })
	t.Run("kube", func(t *testing.T) {
		l := upLab(t, kubeLab)
		versionSkew(t, l)
		b, err := os.ReadFile(l.path("logs", "controller.log"))
		if err != nil || !bytes.Contains(b, []byte("they are not sent to it")) || !bytes.Contains(b, []byte("KIND_ENDPOINT_SLICE")) {
			t.Fatalf("the controller did not withhold the EndpointSlice from the previous release's agent (%v):\n%s", err, b)
		}
	})
}

func versionSkew(t *testing.T, l *Lab) {
	old := buildRelease(t, previousRelease)
	if err := l.StopAgent("node-2"); err != nil {
		t.Fatal(err)
	}
	// The previous release's agent, with the flags it had.
	node := "node-2"
	if err := l.start("agent-"+node, l.nodeNS(node), filepath.Join(old, "veil-agent"),
		"--node", node, "--config-cache", l.path("cache", node+".config"),
		"--ca-addr", net.JoinHostPort(ControllerIP().String(), "15012"), "--ca-server-name", "veil-controller",
		"--ca-root", l.path("ca", "root-cert.pem"), "--token-file", l.path("tokens", node),
		"--uplink", "eth0", "--pin-dir", l.path("bpffs", node)); err != nil {
		t.Fatal(err)
	}
	l.eventually(t, "bookinfo/frontend", "reviews:9080", "200", 30*time.Second, 200*time.Millisecond,
		"this release's agent never reached the previous release's over mTLS")
	l.want(t, "bookinfo/reviews", "productpage:9080", "200")
	l.want(t, "legacy/sleep", "reviews:9080", "200")
	strict, err := demoPolicies.ReadFile("demo/peer-auth-namespace-strict.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Apply("strict.yaml", strict); err != nil {
		t.Fatal(err)
	}
	l.eventually(t, "legacy/sleep", "reviews:9080", "reset", 10*time.Second, 100*time.Millisecond,
		"the previous release's agent never enforced STRICT from this release's controller")
	l.want(t, "bookinfo/frontend", "reviews:9080", "200")
	b, err := os.ReadFile(l.path("logs", "agent-node-2.log"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte("NACK")) || bytes.Contains(b, []byte("rejected")) {
		t.Fatalf("the previous release's agent refused this controller's config:\n%s", b)
	}
}
