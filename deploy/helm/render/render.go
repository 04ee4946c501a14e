package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/strvals"
	"sigs.k8s.io/gateway-api/pkg/consts"
	"sigs.k8s.io/yaml"
)

// Where the rendered manifests go, as the default values render them.
const (
	ReleaseName = "veil"
	Namespace   = "veil-system"
)

// Render renders the chart at chartDir as `helm template --include-crds` does, for
// release ReleaseName in namespace, with --set style values (a=b, list[0]=c). The
// CustomResourceDefinitions come last; otherwise the order is Helm's install order.
func Render(chartDir, namespace string, set ...string) (string, error) {
	chrt, err := loader.Load(chartDir)
	if err != nil {
		return "", err
	}
	vals := map[string]any{}
	for _, s := range set {
		if err := strvals.ParseInto(s, vals); err != nil {
			return "", fmt.Errorf("value %q: %w", s, err)
		}
	}
	inst := action.NewInstall(&action.Configuration{})
	inst.DryRun, inst.DryRunOption = true, "true"
	inst.ClientOnly = true
	inst.Replace = true
	inst.ReleaseName = ReleaseName
	inst.Namespace = namespace
	inst.IncludeCRDs = true
	if inst.KubeVersion, err = chartutil.ParseKubeVersion("v1.35.0"); err != nil {
		return "", err
	}
	rel, err := inst.Run(chrt, vals)
	if err != nil {
		return "", err
	}
	var objects, crds []string
	for _, d := range Documents(rel.Manifest) {
		var tm struct{ Kind string }
		if err := yaml.Unmarshal([]byte(d), &tm); err != nil {
			return "", fmt.Errorf("rendered document: %w\n%s", err, d)
		}
		if tm.Kind == "CustomResourceDefinition" {
			crds = append(crds, d)
		} else {
			objects = append(objects, d)
		}
	}
	var b strings.Builder
	for _, d := range append(objects, crds...) {
		b.WriteString("---\n")
		b.WriteString(d)
		b.WriteString("\n")
	}
	return b.String(), nil
}

var separator = regexp.MustCompile(`(?m)^---[ \t]*$`)

// Documents splits a stream of YAML documents, leaving out empty ones (and ones of
// comments only).
func Documents(s string) []string {
	var docs []string
	for _, d := range separator.Split(s, -1) {
		d = strings.TrimSpace(d)
		blank := true
		for _, line := range strings.Split(d, "\n") {
			if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
				blank = false
				break
			}
		}
		if !blank {
			docs = append(docs, d)
		}
	}
	return docs
}

// header opens deploy/manifests/veil.yaml.
const header = `# GENERATED from the Helm chart deploy/helm/veil with its default values (release %q,
# namespace %s) by deploy/helm/render. Do not edit: change the chart, then run
# ` + "`make manifests`" + ` (cd deploy/helm/render && go run .). ` + "`make test`" + ` fails while this file
# is not what the chart renders.
#
# veil on a Kubernetes cluster: the controller (CA + config stream, reading the API
# server) and the node agent (DaemonSet, with the veil-cni plugin), then the CRDs: Istio's
# security.istio.io kinds and the Gateway API's standard channel.
#
#   kubectl apply --server-side -f deploy/manifests/veil.yaml
#
# Where another tool installed some of those CRDs, server-side apply reports a conflict on
# each that differs: install with Helm instead (it leaves them alone), or render without
# them: helm template veil deploy/helm/veil -n veil-system --set crds.install=false.
# Images: veil/veil-agent:dev and veil/veil-controller:dev, as ` + "`make images`" + ` builds them.
`

// Manifest is deploy/manifests/veil.yaml: the header, the namespace, and the chart
// rendered with its default values.
func Manifest(chartDir string) ([]byte, error) {
	out, err := Render(chartDir, Namespace)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, header, ReleaseName, Namespace)
	// Helm creates the release namespace itself (--create-namespace); applied as a file,
	// the manifests bring it.
	fmt.Fprintf(&b, "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n", Namespace)
	b.WriteString(out)
	return b.Bytes(), nil
}

// A CRD source: a module and the files in it that hold the CRDs veil installs.
type crdSource struct {
	module string
	dir    string // where to resolve the module: the repository (istio.io/api, the version veil parses) or this module
	files  func(moddir string) ([]string, error)
	keep   func(name string) bool
}

// CRDFiles returns the chart's files/crds: one file per CRD, named after it, holding the
// CRD as its module publishes it plus the helm.sh/resource-policy: keep annotation, and a
// comment naming where it came from. repo is the repository's root.
func CRDFiles(repo string) (map[string][]byte, error) {
	sources := []crdSource{
		{
			module: "istio.io/api", dir: repo,
			files: func(m string) ([]string, error) {
				return []string{filepath.Join(m, "kubernetes", "customresourcedefinitions.gen.yaml")}, nil
			},
			keep: func(name string) bool { return strings.HasSuffix(name, ".security.istio.io") },
		},
		{
			module: "sigs.k8s.io/gateway-api", dir: ".",
			files: func(m string) ([]string, error) {
				return filepath.Glob(filepath.Join(m, "config", "crd", "standard", "*.yaml"))
			},
			keep: func(string) bool { return true },
		},
	}
	out := map[string][]byte{}
	for _, src := range sources {
		dir, version, err := moduleDir(src.dir, src.module)
		if err != nil {
			return nil, err
		}
		if src.module == "sigs.k8s.io/gateway-api" && version != consts.BundleVersion {
			return nil, fmt.Errorf("%s: module %s, but its consts say %s", src.module, version, consts.BundleVersion)
		}
		files, err := src.files(dir)
		if err != nil {
			return nil, err
		}
		if len(files) == 0 {
			return nil, fmt.Errorf("%s %s: no CRD files", src.module, version)
		}
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				return nil, err
			}
			rel, _ := filepath.Rel(dir, f)
			for _, d := range Documents(string(data)) {
				var obj struct {
					Kind     string
					Metadata struct{ Name string }
				}
				if err := yaml.Unmarshal([]byte(d), &obj); err != nil {
					return nil, fmt.Errorf("%s %s: %w", src.module, rel, err)
				}
				// The Gateway API's standard channel also ships a ValidatingAdmissionPolicy
				// (safe-upgrades): cluster policy, not a CRD; left out.
				if obj.Kind != "CustomResourceDefinition" || !src.keep(obj.Metadata.Name) {
					continue
				}
				d, err := keepAnnotated(d)
				if err != nil {
					return nil, fmt.Errorf("%s %s: %s: %w", src.module, rel, obj.Metadata.Name, err)
				}
				out[obj.Metadata.Name+".yaml"] = fmt.Appendf(nil, "# %s from %s %s %s (copied by deploy/helm/render; do not edit)\n%s\n",
					obj.Metadata.Name, src.module, version, filepath.ToSlash(rel), strings.TrimPrefix(d, "# DO NOT EDIT - Generated by Cue OpenAPI generator based on Istio APIs.\n"))
			}
		}
	}
	return out, nil
}

// keepAnnotated adds helm.sh/resource-policy: keep to a CRD's annotations, leaving every
// other byte as published.
func keepAnnotated(d string) (string, error) {
	if strings.Contains(d, "helm.sh/resource-policy") {
		return d, nil
	}
	const at = "\nmetadata:\n  annotations:\n"
	i := strings.Index(d, at)
	if i < 0 {
		return "", fmt.Errorf("no metadata.annotations to add helm.sh/resource-policy to")
	}
	i += len(at)
	return d[:i] + "    helm.sh/resource-policy: keep\n" + d[i:], nil
}

// moduleDir finds module in the module cache (downloading it when needed) as the go.mod
// of the module at dir requires it.
func moduleDir(dir, module string) (path, version string, err error) {
	cmd := exec.Command("go", "mod", "download", "-json", module)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			err = fmt.Errorf("%w: %s", err, ee.Stderr)
		}
		return "", "", fmt.Errorf("go mod download %s (in %s): %w", module, dir, err)
	}
	var m struct{ Dir, Version, Error string }
	if err := json.Unmarshal(out, &m); err != nil {
		return "", "", err
	}
	if m.Error != "" || m.Dir == "" {
		return "", "", fmt.Errorf("go mod download %s: %s", module, m.Error)
	}
	return m.Dir, m.Version, nil
}

// WriteCRDFiles replaces the chart's files/crds with files.
func WriteCRDFiles(chartDir string, files map[string][]byte) error {
	dir := filepath.Join(chartDir, "files", "crds")
	old, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
	for _, f := range old {
		if _, ok := files[filepath.Base(f)]; !ok {
			if err := os.Remove(f); err != nil {
				return err
			}
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, n), files[n], 0o644); err != nil {
			return err
		}
	}
	return nil
}
