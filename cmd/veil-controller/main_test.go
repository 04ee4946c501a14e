package main

import (
	"bufio"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/identity"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// start runs the controller as its main does and returns the CA's address and a stop
// function that waits for run to return.
func start(t *testing.T, args ...string) (addr string, stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- run(ctx, args, pw, io.Discard); pw.Close() }()
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil {
		cancel()
		t.Fatalf("controller did not start: %v (run: %v)", err, <-done)
	}
	go io.Copy(io.Discard, pr)
	f := strings.Fields(line) // "veil-controller: CA on ADDR, trust bundle PATH"
	return strings.TrimSuffix(f[3], ","), func() error { cancel(); return <-done }
}

func TestControllerServesCAWithNodeAuthorization(t *testing.T) {
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	tokens := filepath.Join(dir, "tokens.yaml")
	if err := os.WriteFile(tokens, []byte("node-1: node-1-token-0123456789\nnode-2: node-2-token-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"--ca-dir", caDir, "--node-tokens", tokens, "--pods", "testdata/pods", "--listen", "127.0.0.1:0", "--server-name", "veil-controller"}

	addr, stop := start(t, args...)
	roots, err := os.ReadFile(filepath.Join(caDir, identity.RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	rootCerts, err := identity.ParseCertificates(roots)
	if err != nil {
		t.Fatal(err)
	}
	issue := func(addr, token string) error {
		conn, err := identity.DialCA(addr, "veil-controller", rootCerts, token)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		id, _ := identity.ParseID("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews")
		key, csr, err := identity.NewCSR(id)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err = identity.NewClient(conn).Issue(ctx, id, csr, key, time.Hour)
		return err
	}
	if err := issue(addr, "node-1-token-0123456789"); err != nil {
		t.Fatalf("node-1 asking for its pod's identity: %v", err)
	}
	if err := issue(addr, "node-2-token-0123456789"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("node-2 asking for node-1's pod: %v, want PermissionDenied", err)
	}
	if err := stop(); err != nil {
		t.Fatalf("run returned %v on shutdown", err)
	}

	// A restart keeps the root: the old bundle still trusts the new process.
	addr, stop = start(t, args...)
	defer stop()
	if err := issue(addr, "node-1-token-0123456789"); err != nil {
		t.Fatalf("after restart, with the original trust bundle: %v", err)
	}
}

func TestControllerRejectsBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"--node-tokens", "x"},
		{"--node-tokens", "x", "--pods", "y", "--trust-domain", "Not A Domain"},
		{"--node-tokens", "x", "--pods", "y", "--max-ttl", "1s"},
		{"--node-tokens", "x", "--pods", "y", "extra"},
		{"--node-tokens", "x", "--pods", "y", "--config-dir", "z"},
		{"--node-tokens", "x", "--config-dir", "y", "--poll-interval", "0s"},
		{"--node-tokens", "x", "--config-dir", "y", "--ack-timeout", "0s"},
		{"--node-tokens", "x", "--config-dir", "y", "--max-streams-per-node", "1"},
	} {
		if err := run(context.Background(), args, io.Discard, io.Discard); err == nil {
			t.Errorf("run(%q) succeeded", args)
		}
	}
}
