// Package cniconf installs veil-cni into a node's CNI configuration as a chained
// plugin, as istio-cni installs itself: the plugin binary is copied into the CNI binary
// directory, and an entry for it is appended to the plugin list of the configuration
// the runtime uses (the first file of the configuration directory, in name order, as
// containerd and CRI-O pick it). Uninstalling removes the entry again.
package cniconf

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// PluginType is veil-cni's "type" in the plugin list.
const PluginType = "veil-cni"

// Primary returns the configuration file the runtime uses: the first *.conf,
// *.conflist or *.json of dir in name order. "" when there is none yet (the primary CNI
// has not written it).
func Primary(dir string) (string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("cni configuration directory: %w", err)
	}
	var names []string
	for _, e := range ents {
		switch filepath.Ext(e.Name()) {
		case ".conf", ".conflist", ".json":
			if !e.IsDir() {
				names = append(names, e.Name())
			}
		}
	}
	if len(names) == 0 {
		return "", nil
	}
	slices.Sort(names)
	return filepath.Join(dir, names[0]), nil
}

// Ensure makes the primary configuration of dir end with entry (a JSON object whose
// type is PluginType), replacing an earlier veil-cni entry. A single-plugin .conf is
// rewritten as a .conflist (the .conf removed), as istio-cni does. It returns the file
// and whether it changed anything. With no primary configuration yet it does nothing.
func Ensure(dir string, entry map[string]any) (string, bool, error) {
	if entry["type"] != PluginType {
		return "", false, fmt.Errorf("cniconf: entry type %v, want %s", entry["type"], PluginType)
	}
	path, err := Primary(dir)
	if err != nil || path == "" {
		return "", false, err
	}
	list, err := readList(path)
	if err != nil {
		return path, false, err
	}
	plugins := list["plugins"].([]any)
	idx := slices.IndexFunc(plugins, isOurs)
	if idx == len(plugins)-1 && jsonEqual(plugins[idx], entry) {
		return path, false, nil
	}
	if idx >= 0 {
		plugins = slices.Delete(plugins, idx, idx+1)
	}
	list["plugins"] = append(plugins, entry)
	out := path
	if filepath.Ext(path) != ".conflist" {
		out = strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	}
	if err := writeJSON(out, list); err != nil {
		return path, false, err
	}
	if out != path {
		if err := os.Remove(path); err != nil {
			return out, true, fmt.Errorf("cniconf: remove %s after writing %s: %w", path, out, err)
		}
	}
	return out, true, nil
}

// Remove takes veil-cni's entry out of every configuration list in dir. It returns the
// files it changed.
func Remove(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("cni configuration directory: %w", err)
	}
	var changed []string
	var errs []error
	for _, e := range ents {
		if e.IsDir() || filepath.Ext(e.Name()) != ".conflist" {
			continue
		}
		path := filepath.Join(dir, e.Name())
		list, err := readList(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		plugins := list["plugins"].([]any)
		kept := slices.DeleteFunc(slices.Clone(plugins), isOurs)
		if len(kept) == len(plugins) {
			continue
		}
		list["plugins"] = kept
		if err := writeJSON(path, list); err != nil {
			errs = append(errs, err)
			continue
		}
		changed = append(changed, path)
	}
	return changed, errors.Join(errs...)
}

// Installed reports whether the primary configuration of dir chains veil-cni.
func Installed(dir string) (bool, error) {
	path, err := Primary(dir)
	if err != nil || path == "" {
		return false, err
	}
	list, err := readList(path)
	if err != nil {
		return false, err
	}
	return slices.ContainsFunc(list["plugins"].([]any), isOurs), nil
}

// readList reads a .conflist, or a single plugin's .conf/.json as a one-plugin list.
func readList(path string) (map[string]any, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cniconf: %w", err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("cniconf: %s: %w", path, err)
	}
	if p, ok := m["plugins"]; ok {
		if _, ok := p.([]any); !ok {
			return nil, fmt.Errorf("cniconf: %s: plugins is not a list", path)
		}
		return m, nil
	}
	if _, ok := m["type"].(string); !ok {
		return nil, fmt.Errorf("cniconf: %s: neither a plugin list (plugins) nor a plugin (type)", path)
	}
	list := map[string]any{"name": m["name"], "cniVersion": m["cniVersion"]}
	delete(m, "name")
	delete(m, "cniVersion")
	list["plugins"] = []any{m}
	return list, nil
}

func isOurs(p any) bool {
	m, ok := p.(map[string]any)
	return ok && m["type"] == PluginType
}

func jsonEqual(a, b any) bool {
	x, err1 := json.Marshal(a)
	y, err2 := json.Marshal(b)
	return err1 == nil && err2 == nil && string(x) == string(y)
}

// writeJSON writes atomically: the runtime never reads half a file.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return WriteFileAtomic(path, append(b, '\n'), 0o644)
}

// WriteFileAtomic writes data to path through a temporary file in the same directory
// and a rename.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("cniconf: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("cniconf: %w", err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("cniconf: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("cniconf: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("cniconf: %w", err)
	}
	return nil
}

// CopyBinary copies the plugin binary src to dir/veil-cni atomically (a runtime may be
// running the old one).
func CopyBinary(src, dir string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("cniconf: plugin binary: %w", err)
	}
	defer in.Close()
	dst := filepath.Join(dir, PluginType)
	tmp, err := os.CreateTemp(dir, ".veil-cni.tmp*")
	if err != nil {
		return fmt.Errorf("cniconf: cni binary directory: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return fmt.Errorf("cniconf: copy plugin binary: %w", err)
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}

// Kubeconfig returns a kubeconfig that reaches server with token, trusting caPEM.
func Kubeconfig(server string, caPEM []byte, token string) []byte {
	cfg := map[string]any{
		"apiVersion": "v1",
		"kind":       "Config",
		"clusters": []any{map[string]any{"name": "local", "cluster": map[string]any{
			"server": server, "certificate-authority-data": caPEM}}},
		"users":           []any{map[string]any{"name": "veil-cni", "user": map[string]any{"token": token}}},
		"contexts":        []any{map[string]any{"name": "veil-cni", "context": map[string]any{"cluster": "local", "user": "veil-cni"}}},
		"current-context": "veil-cni",
	}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	return b
}
