package controller

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
)

func TestLoadPods(t *testing.T) {
	pods, errs, err := LoadPods("testdata/pods")
	if err != nil {
		t.Fatal(err)
	}
	want := []Pod{
		{Namespace: "bookinfo", Name: "reviews-v1-7d8f", ServiceAccount: "bookinfo-reviews", Node: "node-1"},
		{Namespace: "bookinfo", Name: "ratings-v1-5c9b", ServiceAccount: "bookinfo-ratings", Node: "node-2"},
		{Namespace: "bookinfo", Name: "pending", ServiceAccount: "bookinfo-details"},
		{Namespace: "default", Name: "sleep", ServiceAccount: "default", Node: "node-1"},
	}
	if !reflect.DeepEqual(pods, want) {
		t.Fatalf("pods\n got %+v\nwant %+v", pods, want)
	}
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "broken.yaml") {
		t.Fatalf("errors %v, want one naming broken.yaml", errs)
	}
}

func TestPlacementAuthorizesOnlyScheduledPods(t *testing.T) {
	pods, _, err := LoadPods("testdata/pods")
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	pl, err := Placement(td, pods)
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
