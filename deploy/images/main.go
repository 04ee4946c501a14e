// Command images builds veil's container images without a Docker engine: each binary,
// built static (CGO_ENABLED=0) from the repository, on an empty base, written as an
// image archive that `docker load` and `kind load image-archive` read (`make images`).
//
//	go run . -out ../../bin/images -tag dev
//
// It is a module of its own, so go-containerregistry stays out of the product's go.mod.
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// image is one binary's image: what runs, as whom, and what else it carries.
type image struct {
	binary string
	user   string // "" runs as root (the agent needs its capabilities)
	// also are more binaries of ./cmd beside the entrypoint: the agent copies veil-cni
	// from the directory of its own executable into the node's CNI bin directory. One
	// whose ./cmd directory does not exist (yet) is left out, saying so.
	also []string
}

var images = []image{
	{binary: "veil-agent", also: []string{"veil-cni"}},
	{binary: "veil-controller", user: "65532:65532"},
	{binary: "veilctl", user: "65532:65532"},
	// The waypoints the controller deploys; their Deployment runs them as 65532 too.
	{binary: "veil-waypoint", user: "65532:65532"},
}

func main() {
	out := flag.String("out", "../../bin/images", "directory for the image archives")
	tag := flag.String("tag", "dev", "image tag")
	repo := flag.String("repo", "veil", "image repository prefix")
	src := flag.String("src", "../..", "the repository to build")
	flag.Parse()
	if err := run(*src, *out, *repo, *tag); err != nil {
		fmt.Fprintln(os.Stderr, "images:", err)
		os.Exit(1)
	}
}

func run(src, out, repo, tag string) error {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	bin, err := os.MkdirTemp("", "veil-images-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(bin)
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin+"/", "./cmd/...")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("build: %w", err)
	}
	for _, im := range images {
		if !hasCmd(src, im.binary) {
			fmt.Fprintf(os.Stderr, "images: no ./cmd/%s in %s yet; no %s image\n", im.binary, src, im.binary)
			continue
		}
		ref, err := name.NewTag(fmt.Sprintf("%s/%s:%s", repo, im.binary, tag))
		if err != nil {
			return err
		}
		img, err := build1(src, bin, im)
		if err != nil {
			return fmt.Errorf("%s: %w", im.binary, err)
		}
		path := filepath.Join(out, im.binary+".tar")
		if err := tarball.WriteToFile(path, ref, img); err != nil {
			return fmt.Errorf("%s: %w", im.binary, err)
		}
		fmt.Printf("%s\t%s\n", ref, path)
	}
	return nil
}

// contents are the binaries an image holds, entrypoint first: those of im.also whose
// ./cmd directory exists in src.
func contents(src string, im image) []string {
	files := []string{im.binary}
	for _, b := range im.also {
		if !hasCmd(src, b) {
			fmt.Fprintf(os.Stderr, "images: %s: no ./cmd/%s in %s yet; the image is built without it\n", im.binary, b, src)
			continue
		}
		files = append(files, b)
	}
	return files
}

// hasCmd reports whether src has the command ./cmd/binary.
func hasCmd(src, binary string) bool {
	_, err := os.Stat(filepath.Join(src, "cmd", binary))
	return err == nil
}

// build1 makes an image of static binaries (built into bin) on an empty base.
func build1(src, bin string, im image) (v1.Image, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, name := range contents(src, im) {
		data, err := os.ReadFile(filepath.Join(bin, name))
		if err != nil {
			return nil, err
		}
		// A fixed time: the same binary gives the same layer.
		hdr := &tar.Header{Name: name, Mode: 0o755, Size: int64(len(data)), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromReader(bytes.NewReader(buf.Bytes()))
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Config.Entrypoint = []string{"/" + im.binary}
	cf.Config.User = im.user
	return mutate.ConfigFile(img, cf)
}
