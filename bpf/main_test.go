//go:build linux

package bpf

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// The test binary doubles as a killable agent process: with VEIL_TEST_AGENT_NETNS set it
// runs runTestAgent instead of the tests.
func TestMain(m *testing.M) {
	if ns := os.Getenv("VEIL_TEST_AGENT_NETNS"); ns != "" {
		if err := runTestAgent(ns, os.Getenv("VEIL_TEST_AGENT_PINDIR"), os.Getenv("VEIL_TEST_AGENT_ENROLL")); err != nil {
			fmt.Fprintln(os.Stderr, "testagent:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runTestAgent is a minimal agent: Load (adopting pinned state), optionally Enroll one pod
// ("ifindex,ip,ip..."), register listeners, print "READY <enrolled pods>", serve until
// killed.
func runTestAgent(nsName, pinDir, enroll string) error {
	runtime.LockOSThread() // the listeners must be created in the node namespace
	ns, err := netns.GetFromName(nsName)
	if err != nil {
		return err
	}
	if err := netns.Set(ns); err != nil {
		return err
	}
	c, err := Load(Options{PinDir: pinDir, Uplinks: []string{"up0"}})
	if err != nil {
		return err
	}
	if enroll != "" {
		parts := strings.Split(enroll, ",")
		idx, err := strconv.Atoi(parts[0])
		if err != nil {
			return err
		}
		p := Pod{IfIndex: idx}
		for _, s := range parts[1:] {
			p.IPs = append(p.IPs, netip.MustParseAddr(s))
		}
		if err := c.Enroll(p); err != nil {
			return err
		}
	}
	for _, r := range []struct {
		role      Role
		port, tag string
	}{{Outbound, "15001", "outbound"}, {Inbound, "15006", "inbound"}, {InboundHBONE, "15008", "hbone"}} {
		l, err := Listen("tcp", ":"+r.port, DefaultAgentMark)
		if err != nil {
			return err
		}
		if err := c.SetListener(r.role, l); err != nil {
			return err
		}
		go func(l net.Listener, tag string) {
			for {
				conn, err := l.Accept()
				if err != nil {
					return
				}
				go answer(conn, tag)
			}
		}(l, r.tag)
	}
	pods, err := c.List()
	if err != nil {
		return err
	}
	fmt.Printf("READY %d\n", len(pods))
	select {}
}

type childAgent struct {
	cmd    *exec.Cmd
	exited chan struct{}
}

func startChildAgent(t *testing.T, tp *topo, enroll string) (*childAgent, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		"VEIL_TEST_AGENT_NETNS="+tp.node.name,
		"VEIL_TEST_AGENT_PINDIR="+tp.pinDir,
		"VEIL_TEST_AGENT_ENROLL="+enroll)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	a := &childAgent{cmd: cmd, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(a.exited) }()
	t.Cleanup(a.kill)
	lines := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		lines <- line
	}()
	select {
	case line := <-lines:
		var n int
		if _, err := fmt.Sscanf(line, "READY %d", &n); err != nil {
			t.Fatalf("child agent said %q: %v", line, err)
		}
		return a, n
	case <-a.exited:
		t.Fatal("child agent exited before READY")
	case <-time.After(20 * time.Second):
		t.Fatal("child agent not READY after 20s")
	}
	return nil, 0
}

// kill sends SIGKILL: no deferred cleanup runs, as when the agent crashes or is OOM-killed.
func (a *childAgent) kill() {
	a.cmd.Process.Kill()
	<-a.exited
}

// TestRestartAdoption: an agent process enrolls a pod and is SIGKILLed. While it is gone,
// the pod's new connections are dropped (the destination sees none). A new agent process
// that only calls Load adopts the pinned enrollment, and a connection whose SYN was dropped
// during the gap completes by retransmission once the new agent listens.
func TestRestartAdoption(t *testing.T) {
	tp := newTopo(t)
	srv := countingServer(t, tp.remote, ":8080")
	dst := addrPort(remoteV4, 8080)

	first, n := startChildAgent(t, tp, fmt.Sprintf("%d,%s,%s", tp.vp1, pod1v4, pod1v6))
	if n != 1 {
		t.Fatalf("first agent lists %d enrolled pods; want 1", n)
	}
	wantAnswer(t, mustAsk(t, tp.pod1, dst, nil), "outbound", netip.MustParseAddrPort(dst), pod1v4)
	first.kill()

	if got, err := ask(tp.pod1, dst, 1500*time.Millisecond, nil); err == nil {
		t.Fatalf("dial with the agent killed succeeded: %q", got)
	}
	if n := srv.count(); n != 0 {
		t.Fatalf("destination saw %d connections with the agent killed; want 0 (leak)", n)
	}

	type result struct {
		answer string
		err    error
	}
	during := make(chan result, 1)
	go func() {
		a, err := ask(tp.pod1, dst, 20*time.Second, nil)
		during <- result{a, err}
	}()
	time.Sleep(500 * time.Millisecond) // the first SYN goes out and is dropped

	_, n = startChildAgent(t, tp, "")
	if n != 1 {
		t.Fatalf("restarted agent lists %d enrolled pods; want 1 (adopted from pins)", n)
	}
	select {
	case r := <-during:
		if r.err != nil {
			t.Fatalf("connection started during the gap: %v", r.err)
		}
		wantAnswer(t, r.answer, "outbound", netip.MustParseAddrPort(dst), pod1v4)
	case <-time.After(25 * time.Second):
		t.Fatal("connection started during the gap did not complete")
	}
	wantAnswer(t, mustAsk(t, tp.pod1, dst, nil), "outbound", netip.MustParseAddrPort(dst), pod1v4)
	if n := srv.count(); n != 0 {
		t.Fatalf("destination saw %d direct connections; want 0", n)
	}
}
