package cniconf

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var entry = map[string]any{"type": PluginType, "agentSocket": "/var/run/veil/cni.sock", "kubeconfig": "/etc/cni/net.d/veil-cni.kubeconfig"}

func write(t *testing.T, dir, name, data string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func plugins(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var l struct {
		Plugins []struct{ Type string } `json:"plugins"`
	}
	if err := json.Unmarshal(b, &l); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range l.Plugins {
		out = append(out, p.Type)
	}
	return out
}

// The entry goes at the end of the first list in name order, once, whatever happens to
// the file, and comes out again on Remove.
func TestEnsureAndRemove(t *testing.T) {
	dir := t.TempDir()
	if path, changed, err := Ensure(dir, entry); err != nil || changed || path != "" {
		t.Fatalf("empty directory: %q %v %v; want nothing done", path, changed, err)
	}
	write(t, dir, "20-other.conflist", `{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}`)
	write(t, dir, "10-kindnet.conflist", `{"cniVersion":"1.0.0","name":"kindnet","plugins":[{"type":"ptp"},{"type":"portmap"}]}`)
	write(t, dir, "veil-cni.kubeconfig", `not a cni file`)
	path, changed, err := Ensure(dir, entry)
	if err != nil || !changed || filepath.Base(path) != "10-kindnet.conflist" {
		t.Fatalf("Ensure: %q %v %v", path, changed, err)
	}
	if got := strings.Join(plugins(t, path), ","); got != "ptp,portmap,veil-cni" {
		t.Fatalf("plugins %s", got)
	}
	if got := strings.Join(plugins(t, filepath.Join(dir, "20-other.conflist")), ","); got != "bridge" {
		t.Fatalf("another list changed: %s", got)
	}
	if _, changed, err := Ensure(dir, entry); err != nil || changed {
		t.Fatalf("second Ensure changed it: %v %v", changed, err)
	}
	// The primary CNI rewrites its file (kindnet does at start): the entry comes back.
	write(t, dir, "10-kindnet.conflist", `{"cniVersion":"1.0.0","name":"kindnet","plugins":[{"type":"ptp"},{"type":"portmap"}]}`)
	if ok, _ := Installed(dir); ok {
		t.Fatal("Installed after the file was rewritten")
	}
	if _, changed, err := Ensure(dir, entry); err != nil || !changed {
		t.Fatalf("Ensure after a rewrite: %v %v", changed, err)
	}
	if ok, err := Installed(dir); !ok || err != nil {
		t.Fatalf("Installed: %v %v", ok, err)
	}
	changedFiles, err := Remove(dir)
	if err != nil || len(changedFiles) != 1 {
		t.Fatalf("Remove: %v %v", changedFiles, err)
	}
	if got := strings.Join(plugins(t, path), ","); got != "ptp,portmap" {
		t.Fatalf("after Remove: %s", got)
	}
}

// A single-plugin .conf becomes a .conflist with the plugin first.
func TestEnsureConvertsASinglePluginConf(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "10-flannel.conf", `{"cniVersion":"0.4.0","name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}`)
	path, _, err := Ensure(dir, entry)
	if err != nil || filepath.Base(path) != "10-flannel.conflist" {
		t.Fatalf("Ensure: %q %v", path, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "10-flannel.conf")); !os.IsNotExist(err) {
		t.Fatalf("the .conf is still there: %v", err)
	}
	b, _ := os.ReadFile(path)
	var l map[string]any
	json.Unmarshal(b, &l)
	if l["name"] != "cbr0" || l["cniVersion"] != "0.4.0" || strings.Join(plugins(t, path), ",") != "flannel,veil-cni" {
		t.Fatalf("converted list: %s", b)
	}
}

// A file that is not a CNI configuration is refused with its name, and left alone.
func TestEnsureRefusesABrokenFile(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "10-x.conflist", `{"plugins": 3}`)
	if _, _, err := Ensure(dir, entry); err == nil || !strings.Contains(err.Error(), "10-x.conflist") {
		t.Fatalf("Ensure: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "10-x.conflist")); string(b) != `{"plugins": 3}` {
		t.Fatalf("file changed: %s", b)
	}
}
