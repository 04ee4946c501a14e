package controller

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
)

func TestPlacementAuthorizesOnlyScheduledPods(t *testing.T) {
	st, _, err := cluster.LoadDir("../internal/cluster/testdata/pods")
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	pl, err := Placement(td, st.Pods)
	if err != nil {
		t.Fatal(err)
	}
	id := func(ns, sa string) spiffeid.ID { i, _ := identity.NewID(td, ns, sa); return i }
	for _, tc := range []struct {
		node string
		id   spiffeid.ID
		want bool
	}{
		{"node-1", id("bookinfo", "bookinfo-reviews"), true},
		{"node-2", id("bookinfo", "bookinfo-reviews"), false},
		{"node-2", id("bookinfo", "bookinfo-ratings"), true},
		{"node-1", id("default", "default"), true},
		{"node-1", id("bookinfo", "bookinfo-details"), false}, // not scheduled
		{"node-1", id("kube-system", "kube-proxy"), false},    // host network
		{"node-3", id("bookinfo", "bookinfo-reviews"), false},
	} {
		if got := pl.IdentityOnNode(tc.node, tc.id); got != tc.want {
			t.Errorf("IdentityOnNode(%s, %s) = %v, want %v", tc.node, tc.id, got, tc.want)
		}
	}
}

func TestLoadNodeTokens(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tokens.yaml")
	if err := os.WriteFile(path, []byte("node-1: 0123456789abcdef0123\nnode-2: fedcba9876543210fedc\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadNodeTokens(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadNodeTokens(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("world-readable tokens file: %v, want a refusal", err)
	}
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("- a list\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadNodeTokens(bad); err == nil || !strings.Contains(err.Error(), "bad.yaml") {
		t.Fatalf("malformed tokens file: %v, want an error naming it", err)
	}
}
