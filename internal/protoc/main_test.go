package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// An import directory that carries its own google/protobuf/timestamp.proto (istio.io/api's
// common-protos does, naming github.com/golang/protobuf/ptypes/timestamp) must not change
// the generated code: the well-known types always come from google.golang.org/protobuf.
func TestWellKnownTypesIgnoreImportDirs(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "google/protobuf/timestamp.proto"), `syntax = "proto3";
package google.protobuf;
option go_package = "github.com/golang/protobuf/ptypes/timestamp";
message Timestamp { int64 seconds = 1; int32 nanos = 2; }
`)
	write(t, filepath.Join(dir, "x.proto"), `syntax = "proto3";
package x.v1;
import "google/protobuf/timestamp.proto";
option go_package = "example.com/x;x";
// At says when.
message At { google.protobuf.Timestamp at = 1; }
`)
	out := t.TempDir()
	if err := run(context.Background(), []string{"-I", dir, "-plugin", "go:paths=source_relative", "-out", out, "x.proto"}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(out, "x.pb.go"))
	if err != nil {
		t.Fatal(err)
	}
	got := string(b)
	if !strings.Contains(got, `"google.golang.org/protobuf/types/known/timestamppb"`) || strings.Contains(got, "ptypes/timestamp") {
		t.Errorf("x.pb.go does not import timestamppb alone:\n%s", got)
	}
	if !strings.Contains(got, "// At says when.") {
		t.Error("comments of the file to generate were not passed to the plugin")
	}
	if !strings.Contains(got, "protoc        (unknown)") {
		t.Error("the header claims a protoc version")
	}
}

func TestMissingInputsRefuse(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "x.proto"), `syntax = "proto3";
package x.v1;
import "missing/dep.proto";
`)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"import", []string{"-I", dir, "-plugin", "go", "x.proto"}, "missing/dep.proto not found in the import directories"},
		{"module", []string{"-I", "module:example.com/not/required", "-plugin", "go", "x.proto"}, "module:example.com/not/required: no module of go.mod provides it"},
		{"dir", []string{"-I", filepath.Join(dir, "nope"), "-plugin", "go", "x.proto"}, "does not exist"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := run(context.Background(), tc.args)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func write(t *testing.T, path, s string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}
