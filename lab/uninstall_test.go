package lab

import (
	"context"
	"os"
	"testing"
	"time"
)

// TestUninstallRemovesTheCapture: an agent stopped while the agents are being
// uninstalled (--uninstall=always here; in a cluster, auto: its DaemonSet deleted) drains
// and takes its capture off the node, so the node's pods leave the mesh: plaintext that
// STRICT refused before now reaches them. An agent stopped otherwise (the other node,
// SIGTERM with --uninstall=never) keeps it, and its pods stay unreachable in plaintext.
func TestUninstallRemovesTheCapture(t *testing.T) {
	l := upLab(t, func(_ *Spec, o *Options) { o.AgentArgs = []string{"--uninstall=never"} })
	ctx := context.Background()
	l.applyStrict(t)
	l.want(t, "legacy/sleep", "reviews:9080", "reset")     // node-2
	l.want(t, "legacy/sleep", "productpage:9080", "reset") // node-1

	// node-1: stopped, not uninstalled. Its capture stays pinned and fails closed.
	if err := l.TerminateAgent("node-1"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(AgentDrainGrace + time.Second)
	if _, err := os.Stat(l.path("bpffs", "node-1", "veil_enrolled")); err != nil {
		t.Fatalf("a stopped agent's capture is gone: %v", err)
	}
	if got := l.Request(ctx, "legacy/sleep", l.mustTarget(t, "productpage:9080")).Result; got == "200" {
		t.Fatal("plaintext reached node-1's enrolled pod with its agent stopped")
	}

	// node-2: restarted with --uninstall=always, then stopped.
	l.opts.AgentArgs = []string{"--uninstall=always"}
	if err := l.StartAgent(ctx, "node-2"); err != nil {
		t.Fatal(err)
	}
	if err := l.TerminateAgent("node-2"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(AgentDrainGrace + 10*time.Second)
	for {
		_, err := os.Stat(l.path("bpffs", "node-2", "veil_enrolled"))
		if os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the uninstalled agent's capture is still pinned: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// reviews is outside the mesh now: plaintext reaches it.
	l.want(t, "legacy/sleep", "reviews:9080", "200")
}
