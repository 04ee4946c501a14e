package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/api"
	"github.com/veilmesh/veil/identity"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestControllerServesConfigStreamFromConfigDir runs the binary's run on a config
// directory: an agent's subscription gets the directory, a change to it arrives as a
// delta, and the CA's placement follows the same change.
func TestControllerServesConfigStreamFromConfigDir(t *testing.T) {
	dir := t.TempDir()
	caDir, cfgDir := filepath.Join(dir, "ca"), filepath.Join(dir, "config")
	tokens := filepath.Join(dir, "tokens.yaml")
	if err := os.WriteFile(tokens, []byte("node-1: node-1-token-0123456789\nnode-2: node-2-token-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	pods, err := os.ReadFile("testdata/pods/bookinfo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(cfgDir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name, data string) {
		if err := os.WriteFile(filepath.Join(cfgDir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("pods.yaml", string(pods))
	addr, stop := start(t, "--ca-dir", caDir, "--node-tokens", tokens, "--config-dir", cfgDir, "--listen", "127.0.0.1:0", "--poll-interval", "20ms")
	defer stop()
	roots, err := os.ReadFile(filepath.Join(caDir, identity.RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	rootCerts, err := identity.ParseCertificates(roots)
	if err != nil {
		t.Fatal(err)
	}
	dial := func(token string) api.ConfigServiceClient {
		conn, err := identity.DialCA(addr, "veil-controller", rootCerts, token)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return api.NewConfigServiceClient(conn)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := dial("node-2-token-0123456789").Subscribe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&api.AgentMessage{Message: &api.AgentMessage_Subscribe{Subscribe: &api.Subscribe{Node: "node-2"}}}); err != nil {
		t.Fatal(err)
	}
	p, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if !p.Full || len(p.Resources) == 0 {
		t.Fatalf("first push: full=%v, %d resources", p.Full, len(p.Resources))
	}
	stream.Send(&api.AgentMessage{Message: &api.AgentMessage_Ack{Ack: &api.Ack{Version: p.Version}}})

	// node-2 may not obtain reviews' identity until reviews moves there.
	issue := func() error {
		conn, err := identity.DialCA(addr, "veil-controller", rootCerts, "node-2-token-0123456789")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		id, _ := identity.ParseID("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews")
		key, csr, err := identity.NewCSR(id)
		if err != nil {
			t.Fatal(err)
		}
		_, err = identity.NewClient(conn).Issue(ctx, id, csr, key, time.Hour)
		return err
	}
	if err := issue(); err == nil {
		t.Fatal("node-2 obtained the identity of node-1's pod")
	}
	write("pods.yaml", strings.ReplaceAll(string(pods), "nodeName: node-1", "nodeName: node-2"))
	write("deny-all.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: bookinfo}\nspec: {}\n")
	// The writes may land in one poll or two; a poll may even catch pods.yaml half
	// written. Read deltas until reviews moves.
	var got []string
	for moved := false; !moved; {
		p, err = stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if p.Full {
			t.Fatalf("push %d after a change is a full snapshot; want a delta", p.Version)
		}
		for _, r := range p.Resources {
			got = append(got, r.Key().String())
			moved = moved || r.GetWorkload().GetName() == "reviews-v1-7d8f" && r.GetWorkload().GetNode() == "node-2"
		}
		if len(got) > 20 {
			t.Fatalf("reviews never moved: %v", got)
		}
		stream.Send(&api.AgentMessage{Message: &api.AgentMessage_Ack{Ack: &api.Ack{Version: p.Version}}})
	}
	// The placement is updated before agents see the change: the delta that moves a pod
	// (the first, or the only one if both writes landed in one poll) comes after it.
	if err := issue(); err != nil {
		t.Fatalf("after reviews moved to node-2, node-2 asking for its identity: %v", err)
	}
}

// TestControllerStreamLimitFlags: --max-streams-per-node caps one node's streams, and
// --ack-timeout ends a stream whose push goes unanswered.
func TestControllerStreamLimitFlags(t *testing.T) {
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	tokens := filepath.Join(dir, "tokens.yaml")
	if err := os.WriteFile(tokens, []byte("node-1: node-1-token-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	addr, stop := start(t, "--ca-dir", caDir, "--node-tokens", tokens, "--config-dir", "testdata/pods", "--listen", "127.0.0.1:0",
		"--max-streams-per-node", "2", "--ack-timeout", "300ms")
	defer stop()
	roots, err := os.ReadFile(filepath.Join(caDir, identity.RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	rootCerts, err := identity.ParseCertificates(roots)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// subscribe opens a stream as node-1 and returns its first push, or the refusal.
	subscribe := func() (api.ConfigService_SubscribeClient, error) {
		conn, err := identity.DialCA(addr, "veil-controller", rootCerts, "node-1-token-0123456789")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		stream, err := api.NewConfigServiceClient(conn).Subscribe(ctx)
		if err != nil {
			return nil, err
		}
		stream.Send(&api.AgentMessage{Message: &api.AgentMessage_Subscribe{Subscribe: &api.Subscribe{Node: "node-1"}}})
		_, err = stream.Recv()
		return stream, err
	}
	var streams []api.ConfigService_SubscribeClient
	for i := 0; i < 2; i++ {
		s, err := subscribe()
		if err != nil {
			t.Fatalf("stream %d: %v", i+1, err)
		}
		streams = append(streams, s)
	}
	if _, err := subscribe(); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("stream 3: %v, want ResourceExhausted", err)
	}
	// Neither stream answered its push.
	for i, s := range streams {
		start := time.Now()
		if _, err := s.Recv(); status.Code(err) != codes.DeadlineExceeded || time.Since(start) > 3*time.Second {
			t.Fatalf("stream %d, push unanswered: after %v: %v, want the controller's DeadlineExceeded", i+1, time.Since(start), err)
		}
	}
}
