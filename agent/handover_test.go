package agent

import (
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/internal/handover"
)

// A second agent started beside the running one takes its listening sockets over (as a
// DaemonSet surge does), the old one drains and exits: no connection fails, in either
// direction, and a connection the old agent holds lives on through its grace period.
func TestHandoverWithoutAFailedConnection(t *testing.T) {
	m := newTestMesh(t, true)
	old := m.agents["node-1"]
	st, errs := cluster.Parse("cluster.yaml", []byte(clusterYAML))
	if len(errs) > 0 {
		t.Fatal(errs)
	}

	held, err := m.plainDial(t, "frontend", appAddr("reviews"))
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(held, "echo\n")

	var total, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, dir := range []struct{ from, to, want string }{
		{"frontend", "reviews", "reviews sees 10.77.1.10"},  // out of node-1's agent
		{"reviews", "frontend", "frontend sees 10.77.2.10"}, // into node-1's agent, over HBONE
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				got, err := m.plainWhoami(t, dir.from, appAddr(dir.to))
				total.Add(1)
				if err != nil || got != dir.want {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("%s -> %s: %q, %v", dir.from, dir.to, got, err))
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)

	// The handover, through the unix socket as between two processes.
	sock := filepath.Join(t.TempDir(), "agent.sock")
	drained := make(chan error, 1)
	offer, err := handover.NewOffer(sock, old.ListenerFiles, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		drained <- old.Drain(ctx)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer offer.Close()
	files, err := handover.Take(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	inherited := map[string]net.Listener{}
	for _, f := range files {
		l, err := net.FileListener(f.File)
		f.File.Close()
		if err != nil {
			t.Fatal(err)
		}
		inherited[f.Name] = l
	}
	opts := old.opts
	opts.Inherited, opts.Registry = inherited, nil
	next, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { next.Close() })
	next.Update(st)
	if err := next.Start(); err != nil {
		t.Fatal(err)
	}

	time.Sleep(500 * time.Millisecond)
	// The old agent drains for its grace: what it holds still works.
	io.WriteString(held, "still the old agent")
	held.(*net.TCPConn).CloseWrite()
	if b, err := io.ReadAll(held); err != nil || string(b) != "still the old agent" {
		t.Fatalf("a connection held through the handover: %q, %v", b, err)
	}
	select {
	case err := <-drained:
		if err != nil {
			t.Fatalf("drain: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the old agent did not finish draining")
	}
	time.Sleep(300 * time.Millisecond) // traffic through the new agent alone
	close(stop)
	wg.Wait()
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d connections failed across the handover; first: %v", n, total.Load(), firstErr.Load())
	}
	t.Logf("%d connections across the handover, none failed", total.Load())
}
