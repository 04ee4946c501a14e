// Command render regenerates what comes from veil's Helm chart (`make manifests`): the
// chart's files/crds (Istio's security.istio.io CRDs from the istio.io/api module the
// repository's go.mod requires, and the Gateway API's standard-channel CRDs from the
// sigs.k8s.io/gateway-api module this module's go.mod requires), and
// deploy/manifests/veil.yaml, the chart rendered with its default values.
//
//	cd deploy/helm/render && go run .
//
// It is a module of its own, so Helm stays out of the product's go.mod. Its tests check
// both are current, the chart's shape with default and other values, and that Helm
// installs, upgrades and uninstalls it on a real API server.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

func main() {
	repo := flag.String("repo", "../../..", "the repository's root")
	flag.Parse()
	if err := run(*repo); err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
}

func run(repo string) error {
	chartDir := filepath.Join(repo, "deploy", "helm", "veil")
	crds, err := CRDFiles(repo)
	if err != nil {
		return err
	}
	if err := WriteCRDFiles(chartDir, crds); err != nil {
		return err
	}
	m, err := Manifest(chartDir)
	if err != nil {
		return err
	}
	out := filepath.Join(repo, "deploy", "manifests", "veil.yaml")
	if err := os.WriteFile(out, m, 0o644); err != nil {
		return err
	}
	fmt.Printf("render: %d CRDs in %s, %s (%d bytes)\n", len(crds), filepath.Join(chartDir, "files", "crds"), out, len(m))
	return nil
}
