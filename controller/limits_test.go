package controller

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/api"
	"github.com/veilmesh/veil/identity"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
)

func TestServerKeepaliveSettings(t *testing.T) {
	kp, ep := (&CAServer{}).keepalive()
	if kp.MaxConnectionIdle != 15*time.Minute || kp.Time != 30*time.Second || kp.Timeout != 10*time.Second {
		t.Errorf("default server parameters %+v; want MaxConnectionIdle 15m, Time 30s, Timeout 10s", kp)
	}
	// Agents ping every 30s, with or without a call; a client pinging more often than
	// every 10s is told to stop (GOAWAY too_many_pings).
	if ep.MinTime != 10*time.Second || !ep.PermitWithoutStream {
		t.Errorf("enforcement policy %+v; want MinTime 10s, PermitWithoutStream", ep)
	}
	kp, _ = (&CAServer{MaxConnectionIdle: time.Second, KeepaliveTime: 2 * time.Second, KeepaliveTimeout: 3 * time.Second}).keepalive()
	if kp.MaxConnectionIdle != time.Second || kp.Time != 2*time.Second || kp.Timeout != 3*time.Second {
		t.Errorf("configured server parameters %+v", kp)
	}
}

// A connection with no call in progress is closed after MaxConnectionIdle; one holding a
// config stream is not idle, however long the stream lasts, and is closed once the
// stream ends.
func TestServerClosesIdleConnections(t *testing.T) {
	const idle = 200 * time.Millisecond
	cfg := &ConfigServer{}
	s := startStreamServer(t, cfg, func(c *CAServer) { c.MaxConnectionIdle = idle })
	clusterYAML := readTestdata(t, "config/cluster.yaml")
	cfg.Set(testConfig(t, clusterYAML))

	conn, err := identity.DialCA(s.addr, "veil-controller", s.ca.Roots(), testTokens["node-1"])
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn.Connect()
	for st := conn.GetState(); st != connectivity.Ready; st = conn.GetState() {
		if !conn.WaitForStateChange(ctx, st) {
			t.Fatalf("connection not ready: %v", st)
		}
	}
	if a, c := s.lis.counts(); a != 1 || c != 0 {
		t.Fatalf("accepted %d, closed %d; want one open connection", a, c)
	}
	start := time.Now()
	waitFor(t, "the idle connection closed by the server", func() bool { _, c := s.lis.counts(); return c == 1 })
	if took := time.Since(start); took < idle/2 {
		t.Errorf("closed after %v; MaxConnectionIdle is %v", took, idle)
	}

	sub, err := s.subscribe(t, testTokens["node-1"], &api.Subscribe{Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	sub.ack(sub.recv())
	time.Sleep(4 * idle)
	if a, c := s.lis.counts(); a != 2 || c != 1 {
		t.Fatalf("with a stream open: accepted %d, closed %d; want the stream's connection open", a, c)
	}
	cfg.Set(testConfig(t, clusterYAML, denyAll))
	if p := sub.recv(); p.Version != 2 {
		t.Fatalf("push %d, want 2", p.Version)
	}
	sub.cancel()
	waitFor(t, "the connection closed once its stream ended", func() bool { _, c := s.lis.counts(); return c == 2 })
}

// nodeStreams is how many streams the server counts for node.
func nodeStreams(cfg *ConfigServer, node string) int {
	cfg.mu.Lock()
	defer cfg.mu.Unlock()
	return cfg.agents[node]
}

func TestStreamCapPerNode(t *testing.T) {
	for _, tc := range []struct {
		name string
		max  int // MaxStreamsPerNode
		want int // the cap in force
	}{
		{"default", 0, DefaultMaxStreamsPerNode},
		{"below 2 is raised to 2", 1, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := &ConfigServer{MaxStreamsPerNode: tc.max}
			s := startStreamServer(t, cfg)
			cfg.Set(testConfig(t, readTestdata(t, "config/cluster.yaml")))
			open := func(node string) (*subscriber, error) {
				t.Helper()
				sub, err := s.subscribe(t, testTokens[node], &api.Subscribe{Node: node})
				if err != nil {
					return nil, err
				}
				p, err := sub.stream.Recv()
				if err != nil {
					return nil, err
				}
				sub.ack(p)
				return sub, nil
			}
			var subs []*subscriber
			for i := 0; i < tc.want; i++ {
				sub, err := open("node-1")
				if err != nil {
					t.Fatalf("stream %d of node-1: %v", i+1, err)
				}
				subs = append(subs, sub)
			}
			_, err := open("node-1")
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("stream %d of node-1: %v, want ResourceExhausted", tc.want+1, err)
			}
			if msg := status.Convert(err).Message(); !strings.Contains(msg, `"node-1"`) || !strings.Contains(msg, strconv.Itoa(tc.want)) {
				t.Errorf("refusal %q does not name the node and the cap %d", msg, tc.want)
			}
			if !strings.Contains(s.logs.String(), "node=node-1") || !strings.Contains(s.logs.String(), "too many") {
				t.Errorf("refusal not logged:\n%s", s.logs.String())
			}
			if _, err := open("node-2"); err != nil {
				t.Fatalf("node-2, while node-1 is at its cap: %v", err)
			}
			subs[0].cancel()
			waitFor(t, "the closed stream to end", func() bool { return nodeStreams(cfg, "node-1") == tc.want-1 })
			if _, err := open("node-1"); err != nil {
				t.Fatalf("node-1 after one of its streams closed: %v", err)
			}
		})
	}
}

func TestStreamAckDeadline(t *testing.T) {
	const timeout = 200 * time.Millisecond
	cfg := &ConfigServer{AckTimeout: timeout}
	s := startStreamServer(t, cfg)
	clusterYAML := readTestdata(t, "config/cluster.yaml")
	cfg.Set(testConfig(t, clusterYAML))

	t.Run("a push never answered ends the stream", func(t *testing.T) {
		sub, err := s.subscribe(t, testTokens["node-1"], &api.Subscribe{Node: "node-1"})
		if err != nil {
			t.Fatal(err)
		}
		sub.recv() // and no Ack
		start := time.Now()
		_, err = sub.stream.Recv()
		took := time.Since(start)
		if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(status.Convert(err).Message(), "node-1") {
			t.Fatalf("after %v: %v; want the server's DeadlineExceeded naming node-1", took, err)
		}
		if took > 3*time.Second {
			t.Errorf("ended after %v; AckTimeout is %v", took, timeout)
		}
		if l := s.logs.String(); !strings.Contains(l, "did not answer") || !strings.Contains(l, "node=node-1") {
			t.Errorf("not logged:\n%s", l)
		}
		waitFor(t, "the stream to be gone", func() bool { return nodeStreams(cfg, "node-1") == 0 })
	})
	t.Run("no Subscribe ends the stream", func(t *testing.T) {
		conn, err := identity.DialCA(s.addr, "veil-controller", s.ca.Roots(), testTokens["node-1"])
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stream, err := api.NewConfigServiceClient(conn).Subscribe(ctx)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_, err = stream.Recv()
		if status.Code(err) != codes.DeadlineExceeded || time.Since(start) > 3*time.Second {
			t.Fatalf("after %v: %v; want DeadlineExceeded", time.Since(start), err)
		}
	})
	t.Run("a stream with no push in flight has no deadline", func(t *testing.T) {
		sub, err := s.subscribe(t, testTokens["node-2"], &api.Subscribe{Node: "node-2"})
		if err != nil {
			t.Fatal(err)
		}
		sub.ack(sub.recv())
		time.Sleep(3 * timeout)
		v, _ := cfg.Set(testConfig(t, clusterYAML, denyAll))
		p := sub.recv()
		if p.Version != v {
			t.Fatalf("push %d, want %d", p.Version, v)
		}
		sub.ack(p)
		time.Sleep(3 * timeout)
		if n := nodeStreams(cfg, "node-2"); n != 1 {
			t.Fatalf("node-2 has %d streams, want 1", n)
		}
	})
}
