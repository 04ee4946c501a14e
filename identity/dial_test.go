package identity

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A projected token is rewritten by the kubelet: every call reads the file again.
func TestTokenFileIsReadAtEveryCall(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token")
	for _, tok := range []string{"first-token\n", "rotated-token"} {
		if err := os.WriteFile(path, []byte(tok), 0o600); err != nil {
			t.Fatal(err)
		}
		md, err := TokenFile(path).GetRequestMetadata(context.Background())
		if want := "Bearer " + strings.TrimSpace(tok); err != nil || md["authorization"] != want {
			t.Fatalf("metadata %v, %v; want %q", md, err, want)
		}
	}
	os.WriteFile(path, []byte(" \n"), 0o600)
	if _, err := TokenFile(path).GetRequestMetadata(context.Background()); err == nil {
		t.Fatal("an empty token file was accepted")
	}
}
