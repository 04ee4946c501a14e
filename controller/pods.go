package controller

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
)

// Pod is what the controller needs of a core/v1 Pod to authorize certificate requests.
type Pod struct {
	Namespace      string
	Name           string
	ServiceAccount string
	Node           string
}

// manifest is the part of any Kubernetes object LoadPods reads.
type manifest struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
	Spec struct {
		ServiceAccountName string `json:"serviceAccountName"`
		ServiceAccount     string `json:"serviceAccount"` // deprecated alias, still honoured by Kubernetes
		NodeName           string `json:"nodeName"`
	} `json:"spec"`
	Items []manifest `json:"items"` // kind: List
}

// LoadPods reads the Pods from every *.yaml, *.yml and *.json file in dir (kubectl-style
// manifests, several documents per file, kind List unpacked). Objects of other kinds are
// skipped. A document that cannot be decoded is reported in errs, naming its file, and
// the rest still load; err is only for a directory that cannot be read.
func LoadPods(dir string) (pods []Pod, errs []error, err error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("controller: pods: %w", err)
	}
	var names []string
	for _, e := range entries {
		switch strings.ToLower(filepath.Ext(e.Name())) {
		case ".yaml", ".yml", ".json":
			if !e.IsDir() {
				names = append(names, e.Name())
			}
		}
	}
	sort.Strings(names)
	for _, name := range names {
		path := filepath.Join(dir, name)
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, nil, fmt.Errorf("controller: pods: %w", err)
		}
		p, e := decodePods(path, data)
		pods = append(pods, p...)
		errs = append(errs, e...)
	}
	return pods, errs, nil
}

func decodePods(file string, data []byte) ([]Pod, []error) {
	var pods []Pod
	var errs []error
	dec := k8syaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	for doc := 1; ; doc++ {
		var m manifest
		err := dec.Decode(&m)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			// The decoder cannot resynchronise after a syntax error: the rest of the file is lost.
			errs = append(errs, fmt.Errorf("%s: document %d: %w", file, doc, err))
			break
		}
		for _, o := range append([]manifest{m}, m.Items...) {
			if o.Kind != "Pod" || o.APIVersion != "v1" {
				continue
			}
			p, err := o.pod()
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: document %d: %w", file, doc, err))
				continue
			}
			pods = append(pods, p)
		}
	}
	return pods, errs
}

func (m *manifest) pod() (Pod, error) {
	p := Pod{
		Namespace:      m.Metadata.Namespace,
		Name:           m.Metadata.Name,
		ServiceAccount: m.Spec.ServiceAccountName,
		Node:           m.Spec.NodeName,
	}
	if p.Name == "" {
		return Pod{}, errors.New("pod: metadata.name: required")
	}
	if p.Namespace == "" {
		p.Namespace = "default" // as kubectl applies it without -n
	}
	if p.ServiceAccount == "" {
		p.ServiceAccount = m.Spec.ServiceAccount
	}
	if p.ServiceAccount == "" {
		p.ServiceAccount = "default"
	}
	return p, nil
}

// Placement maps each node to the identities of the pods scheduled on it. Pods without
// a node (not yet scheduled) obtain nothing.
func Placement(td spiffeid.TrustDomain, pods []Pod) (identity.Placement, error) {
	pl := identity.Placement{}
	for _, p := range pods {
		if p.Node == "" {
			continue
		}
		id, err := identity.NewID(td, p.Namespace, p.ServiceAccount)
		if err != nil {
			return nil, fmt.Errorf("controller: pod %s/%s: %w", p.Namespace, p.Name, err)
		}
		pl.Add(p.Node, id)
	}
	return pl, nil
}
