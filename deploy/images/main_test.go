package main

import (
	"archive/tar"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// The archives hold one image each, tagged, on an empty base: one layer with the static
// binary at / and the entrypoint naming it (and, in the agent's, veil-cni beside it once
// ./cmd/veil-cni exists). An image whose ./cmd does not exist yet has no archive.
func TestImages(t *testing.T) {
	out := t.TempDir()
	if err := run("../..", out, "veil", "test"); err != nil {
		t.Fatal(err)
	}
	for _, im := range images {
		if !hasCmd("../..", im.binary) {
			if _, err := os.Stat(filepath.Join(out, im.binary+".tar")); !os.IsNotExist(err) {
				t.Errorf("%s: an archive without ./cmd/%s (%v)", im.binary, im.binary, err)
			}
			continue
		}
		tag, _ := name.NewTag("veil/" + im.binary + ":test")
		img, err := tarball.ImageFromPath(filepath.Join(out, im.binary+".tar"), &tag)
		if err != nil {
			t.Fatalf("%s: %v", im.binary, err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if len(cf.Config.Entrypoint) != 1 || cf.Config.Entrypoint[0] != "/"+im.binary || cf.Config.User != im.user || cf.OS != "linux" {
			t.Fatalf("%s: config %+v", im.binary, cf.Config)
		}
		layers, err := img.Layers()
		if err != nil || len(layers) != 1 {
			t.Fatalf("%s: %d layers, %v", im.binary, len(layers), err)
		}
		rc, err := layers[0].Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		for _, want := range contents("../..", im) {
			h, err := tr.Next()
			if err != nil || h.Name != want || h.Mode != 0o755 || h.Size < 1<<20 {
				t.Fatalf("%s: layer entry %+v, %v; want %s", im.binary, h, err, want)
			}
		}
		if _, err := tr.Next(); err != io.EOF {
			t.Fatalf("%s: more than its binaries in the layer", im.binary)
		}
		rc.Close()
	}
}
