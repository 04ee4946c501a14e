// Command protoc compiles .proto files and runs protoc plugins on them, as protoc does, with
// nothing from the machine: the compiler is github.com/bufbuild/protocompile, the plugins are
// Go tools pinned in go.mod (`go tool protoc-gen-NAME`), the well-known types
// (google/protobuf/*.proto) are the descriptors of the pinned google.golang.org/protobuf, and
// other imports come from directories or from Go modules at the versions go.mod requires. The
// same go.mod therefore generates the same code on every machine. `make generate` runs it
// through api/generate.go:
//
//	go run ./internal/protoc -I . -I module:istio.io/api -plugin go:paths=source_relative config.proto
//
// Flags:
//
//	-I DIR            an import directory, searched in order; module:PATH[/SUB] is the directory
//	                  of Go module PATH (downloaded if needed), or its subdirectory SUB
//	-plugin NAME[:P]  run `go tool protoc-gen-NAME` with parameter P; repeatable
//	-out DIR          where the plugins' files are written (default ".")
//
// A google/protobuf/*.proto in an import directory is never used: copies of the well-known
// types (istio.io/api's common-protos has old ones) name other Go packages.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/bufbuild/protocompile"
	"github.com/bufbuild/protocompile/linker"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/pluginpb"
)

func main() {
	if err := run(context.Background(), os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "protoc:", err)
		os.Exit(1)
	}
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func run(ctx context.Context, args []string) error {
	fset := flag.NewFlagSet("protoc", flag.ContinueOnError)
	var includes, plugins listFlag
	fset.Var(&includes, "I", "import directory, or module:PATH[/SUB] (repeatable)")
	fset.Var(&plugins, "plugin", "NAME[:PARAMETER]: run `go tool protoc-gen-NAME` (repeatable)")
	out := fset.String("out", ".", "output directory")
	if err := fset.Parse(args); err != nil {
		return err
	}
	if fset.NArg() == 0 || len(plugins) == 0 {
		return errors.New("usage: protoc [-I DIR]... -plugin NAME[:PARAM]... FILE.proto...")
	}
	dirs, err := importDirs(ctx, includes)
	if err != nil {
		return err
	}
	files, err := compile(ctx, dirs, fset.Args())
	if err != nil {
		return err
	}
	for _, p := range plugins {
		name, param, _ := strings.Cut(p, ":")
		req := request(files, fset.Args(), param)
		if err := runPlugin(ctx, name, req, *out); err != nil {
			return err
		}
	}
	return nil
}

// importDirs resolves module:PATH[/SUB] entries to directories in the module cache, at the
// version go.mod requires, and checks that every directory exists.
func importDirs(ctx context.Context, includes []string) ([]string, error) {
	var dirs []string
	for _, inc := range includes {
		dir := inc
		if spec, ok := strings.CutPrefix(inc, "module:"); ok {
			d, err := moduleDir(ctx, spec)
			if err != nil {
				return nil, err
			}
			dir = d
		}
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			return nil, fmt.Errorf("import directory %s (-I %s) does not exist", dir, inc)
		}
		dirs = append(dirs, dir)
	}
	return dirs, nil
}

// moduleDir finds the directory of the longest module path that prefixes spec, among the
// modules of the build list, and appends the rest of spec as a subdirectory.
func moduleDir(ctx context.Context, spec string) (string, error) {
	parts := strings.Split(spec, "/")
	for i := len(parts); i > 0; i-- {
		mod, sub := strings.Join(parts[:i], "/"), filepath.Join(parts[i:]...)
		cmd := exec.CommandContext(ctx, "go", "mod", "download", "-json", mod)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		b, err := cmd.Output()
		var info struct{ Dir, Error string }
		if jerr := json.Unmarshal(b, &info); jerr != nil || info.Dir == "" {
			if i == 1 {
				msg := strings.TrimSpace(info.Error + " " + stderr.String())
				if err != nil && msg == "" {
					msg = err.Error()
				}
				return "", fmt.Errorf("module:%s: no module of go.mod provides it (%s); add it with `go get`", spec, msg)
			}
			continue
		}
		return filepath.Join(info.Dir, sub), nil
	}
	return "", fmt.Errorf("module:%s: empty module path", spec)
}

// compile parses and links the files; every import is found in dirs, except the well-known
// types, which always come from the linked google.golang.org/protobuf.
func compile(ctx context.Context, dirs, names []string) (linker.Files, error) {
	src := &protocompile.SourceResolver{ImportPaths: dirs}
	std := protocompile.WithStandardImports(protocompile.ResolverFunc(func(string) (protocompile.SearchResult, error) {
		return protocompile.SearchResult{}, fs.ErrNotExist
	}))
	resolver := protocompile.ResolverFunc(func(name string) (protocompile.SearchResult, error) {
		if strings.HasPrefix(name, "google/protobuf/") {
			r, err := std.FindFileByPath(name)
			if err != nil {
				return r, fmt.Errorf("%s is not a well-known type of google.golang.org/protobuf", name)
			}
			return r, nil
		}
		r, err := src.FindFileByPath(name)
		if errors.Is(err, fs.ErrNotExist) {
			return r, fmt.Errorf("%s not found in the import directories %s", name, strings.Join(dirs, ", "))
		}
		return r, err
	})
	c := protocompile.Compiler{Resolver: resolver, SourceInfoMode: protocompile.SourceInfoStandard}
	return c.Compile(ctx, names...)
}

// request builds the CodeGeneratorRequest protoc would send: every file to generate and all
// it imports, dependencies first; source info (comments) only for the files to generate.
// No compiler version is claimed: the plugins print "protoc (unknown)".
func request(files linker.Files, names []string, param string) *pluginpb.CodeGeneratorRequest {
	req := &pluginpb.CodeGeneratorRequest{FileToGenerate: names}
	if param != "" {
		req.Parameter = proto.String(param)
	}
	gen := map[string]bool{}
	for _, n := range names {
		gen[n] = true
	}
	seen := map[string]bool{}
	var visit func(fd protoreflect.FileDescriptor)
	visit = func(fd protoreflect.FileDescriptor) {
		if seen[fd.Path()] {
			return
		}
		seen[fd.Path()] = true
		imps := fd.Imports()
		for i := 0; i < imps.Len(); i++ {
			visit(imps.Get(i).FileDescriptor)
		}
		var fdp *descriptorpb.FileDescriptorProto
		if r, ok := fd.(linker.Result); ok {
			fdp = proto.Clone(r.FileDescriptorProto()).(*descriptorpb.FileDescriptorProto)
		} else {
			fdp = protodesc.ToFileDescriptorProto(fd)
		}
		if !gen[fd.Path()] {
			fdp.SourceCodeInfo = nil
		}
		req.ProtoFile = append(req.ProtoFile, fdp)
	}
	for _, f := range files {
		visit(f)
	}
	return req
}

// runPlugin runs `go tool protoc-gen-NAME` on req and writes the files it answers with.
func runPlugin(ctx context.Context, name string, req *pluginpb.CodeGeneratorRequest, out string) error {
	in, err := proto.Marshal(req)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "tool", "protoc-gen-"+name)
	cmd.Stdin = bytes.NewReader(in)
	cmd.Stderr = os.Stderr
	b, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("protoc-gen-%s (a tool of go.mod): %w", name, err)
	}
	var resp pluginpb.CodeGeneratorResponse
	if err := proto.Unmarshal(b, &resp); err != nil {
		return fmt.Errorf("protoc-gen-%s: bad response: %w", name, err)
	}
	if resp.Error != nil {
		return fmt.Errorf("protoc-gen-%s: %s", name, resp.GetError())
	}
	for _, f := range resp.File {
		if f.GetInsertionPoint() != "" {
			return fmt.Errorf("protoc-gen-%s: %s: insertion points are not supported", name, f.GetName())
		}
		path := filepath.Join(out, filepath.FromSlash(f.GetName()))
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(path, []byte(f.GetContent()), 0o644); err != nil {
			return err
		}
	}
	return nil
}
