package agent

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/policy"
)

func newUnstartedAgent(t *testing.T) *Agent {
	t.Helper()
	ca, err := identity.NewSelfSignedCA(identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	discard := slog.New(slog.DiscardHandler)
	mgr, err := identity.NewManager(identity.ManagerOptions{Issuer: ca, Log: discard})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mgr.Close() })
	a, err := New(Options{Node: "node-2", Certs: mgr, Log: discard})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func write(t *testing.T, dir, name, data string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

const allowFrontend = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-allow-frontend, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bookinfo/sa/frontend"]}}]
`

// decide asks the agent's policy whether a peer may reach reviews:9080.
func decide(a *Agent, sa string) bool {
	c := policy.Conn{Peer: policy.ParsePeer("spiffe://cluster.local/ns/bookinfo/sa/" + sa), SrcIP: netip.MustParseAddr("10.77.1.10"), DstIP: netip.MustParseAddr("10.77.2.10"), DstPort: 9080}
	return a.Policies().EvaluateL4(&c).Allowed()
}

func TestDirSourceKeepsLastGoodPolicy(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "cluster.yaml", clusterYAML)
	write(t, dir, "policy.yaml", allowFrontend)
	a := newUnstartedAgent(t)
	src := &DirSource{Dir: dir, Agent: a, Log: slog.New(slog.DiscardHandler)}
	if err := src.Load(); err != nil {
		t.Fatal(err)
	}
	if !decide(a, "frontend") || decide(a, "productpage") {
		t.Fatal("the ALLOW policy is not in force")
	}
	if w := a.view.Load().localEnrolled(netip.MustParseAddr("10.77.2.10")); w == nil || w.id.String() != "spiffe://cluster.local/ns/bookinfo/sa/reviews" {
		t.Fatalf("reviews is not a local enrolled workload of node-2: %v", w)
	}

	t.Run("an invalid new version keeps the old one", func(t *testing.T) {
		write(t, dir, "policy.yaml", strings.Replace(allowFrontend, "action: ALLOW", "action: PERMIT", 1))
		if err := src.Load(); err == nil || !strings.Contains(err.Error(), "reviews-allow-frontend") {
			t.Fatalf("Load error %v, want one naming the policy", err)
		}
		if !decide(a, "frontend") || decide(a, "productpage") {
			t.Fatal("a broken edit loosened the policy")
		}
	})
	t.Run("a file that no longer parses keeps its objects", func(t *testing.T) {
		write(t, dir, "policy.yaml", "apiVersion: security.istio.io/v1\nkind: [oops\n")
		if err := src.Load(); err == nil {
			t.Fatal("Load accepted a YAML syntax error")
		}
		if decide(a, "productpage") {
			t.Fatal("a syntax error removed the policy")
		}
	})
	t.Run("a broken cluster file keeps the previous pods", func(t *testing.T) {
		write(t, dir, "cluster.yaml", strings.Replace(clusterYAML, "podIP: 10.77.2.10", "podIP: not-an-ip", 1))
		if err := src.Load(); err == nil {
			t.Fatal("Load accepted a bad pod IP")
		}
		if w := a.view.Load().localEnrolled(netip.MustParseAddr("10.77.2.10")); w == nil {
			t.Fatal("a bad pod manifest unenrolled the pod")
		}
		write(t, dir, "cluster.yaml", clusterYAML)
	})
	t.Run("a removed file removes its policies", func(t *testing.T) {
		os.Remove(filepath.Join(dir, "policy.yaml"))
		if err := src.Load(); err != nil {
			t.Fatal(err)
		}
		if !decide(a, "productpage") {
			t.Fatal("the policy of a removed file is still in force")
		}
	})
}

func TestDirSourceRunPicksUpChanges(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "cluster.yaml", clusterYAML)
	a := newUnstartedAgent(t)
	src := &DirSource{Dir: dir, Agent: a, Interval: 50 * time.Millisecond, Log: slog.New(slog.DiscardHandler)}
	if err := src.Load(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := contextWithCancel()
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx) }()
	if !decide(a, "productpage") {
		t.Fatal("denied before any policy")
	}
	write(t, dir, "policy.yaml", allowFrontend)
	eventually(t, "the new policy", func() bool { return !decide(a, "productpage") })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func contextWithCancel() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}
