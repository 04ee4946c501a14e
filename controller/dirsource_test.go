package controller

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func copyTestdata(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for dst, src := range files {
		if err := os.WriteFile(filepath.Join(dir, dst), []byte(readTestdata(t, src)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// summary lists a config's objects with what the tests look at.
func summary(cfg *Config) string {
	var out []string
	for _, p := range cfg.Cluster.Pods {
		out = append(out, "pod "+p.Namespace+"/"+p.Name+" "+p.IPs[0].String())
	}
	for _, o := range cfg.Policies {
		s := o.Key().String()
		if pa := o.PeerAuthentication; pa != nil {
			s += " " + pa.GetMtls().GetMode().String()
		}
		if ap := o.AuthorizationPolicy; ap != nil && len(ap.GetRules()) > 0 && len(ap.GetRules()[0].GetFrom()) > 0 {
			s += " from " + strings.Join(ap.GetRules()[0].GetFrom()[0].GetSource().GetPrincipals(), ",")
		}
		out = append(out, s)
	}
	return strings.Join(out, "; ")
}

func TestDirSourceKeepsLastGoodVersion(t *testing.T) {
	const good = "pod bookinfo/productpage-v1 10.77.2.10; pod bookinfo/reviews-v1 10.77.1.10; " +
		"PeerAuthentication bookinfo/default STRICT; AuthorizationPolicy bookinfo/reviews-allow-productpage from cluster.local/ns/bookinfo/sa/bookinfo-productpage"
	for _, tc := range []struct {
		name      string
		replace   map[string]string // file -> new content
		wantErr   []string
		wantAfter string
	}{
		{
			name:      "YAML syntax error keeps every object of the file",
			replace:   map[string]string{"policy.yaml": readTestdata(t, "policy-broken-syntax.yaml")},
			wantErr:   []string{"policy.yaml", "keeping its last good version"},
			wantAfter: good,
		},
		{
			name:      "invalid policy keeps its last good version; the file's other objects follow the file",
			replace:   map[string]string{"policy.yaml": readTestdata(t, "policy-invalid-port.yaml")},
			wantErr:   []string{`AuthorizationPolicy bookinfo/reviews-allow-productpage: spec.rules[0].to[0].operation.ports[0]: "http" is not a port`},
			wantAfter: "pod bookinfo/productpage-v1 10.77.2.10; pod bookinfo/reviews-v1 10.77.1.10; AuthorizationPolicy bookinfo/reviews-allow-productpage from cluster.local/ns/bookinfo/sa/bookinfo-productpage",
		},
		{
			name:      "bad pod IP keeps the pod's last good version",
			replace:   map[string]string{"cluster.yaml": strings.Replace(readTestdata(t, "config/cluster.yaml"), "10.77.1.10", "10.77.1.300", 1)},
			wantErr:   []string{`pod bookinfo/reviews-v1: status.podIP: "10.77.1.300" is not an IP address`, "WORKLOAD bookinfo/reviews-v1: keeping its last good version"},
			wantAfter: good,
		},
		{
			name:      "deleting a file deletes its objects",
			replace:   map[string]string{"policy.yaml": ""},
			wantAfter: "pod bookinfo/productpage-v1 10.77.2.10; pod bookinfo/reviews-v1 10.77.1.10",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			copyTestdata(t, dir, map[string]string{"cluster.yaml": "config/cluster.yaml", "policy.yaml": "config/policy.yaml"})
			src := &DirSource{Dir: dir}
			cfg, err := src.Load()
			if err != nil {
				t.Fatal(err)
			}
			if got := summary(cfg); got != good {
				t.Fatalf("first load:\n got %s\nwant %s", got, good)
			}
			for name, data := range tc.replace {
				path := filepath.Join(dir, name)
				if data == "" {
					os.Remove(path)
				} else if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			cfg, err = src.Load()
			if cfg == nil {
				t.Fatal(err)
			}
			for _, want := range tc.wantErr {
				if err == nil || !strings.Contains(err.Error(), want) {
					t.Errorf("errors %v\nwant one containing %q", err, want)
				}
			}
			if len(tc.wantErr) == 0 && err != nil {
				t.Errorf("unexpected errors: %v", err)
			}
			if got := summary(cfg); got != tc.wantAfter {
				t.Errorf("after the change:\n got %s\nwant %s", got, tc.wantAfter)
			}
			// Fixing the file serves its new content.
			copyTestdata(t, dir, map[string]string{"cluster.yaml": "config/cluster.yaml", "policy.yaml": "config/policy.yaml"})
			if cfg, err = src.Load(); err != nil || summary(cfg) != good {
				t.Errorf("after the fix: %v: %s", err, summary(cfg))
			}
		})
	}
}

// Load reports a bad file and returns the rest; Run does not serve that (see
// TestDirSourceRunServesNothingUntilTheFirstCleanLoad).
func TestDirSourceLoadWithBadFileReturnsTheRest(t *testing.T) {
	dir := t.TempDir()
	copyTestdata(t, dir, map[string]string{"cluster.yaml": "config/cluster.yaml", "policy.yaml": "policy-broken-syntax.yaml"})
	cfg, err := (&DirSource{Dir: dir}).Load()
	if cfg == nil || err == nil || !strings.Contains(err.Error(), "policy.yaml") {
		t.Fatalf("Load = %v, %v; want the cluster and an error naming policy.yaml", cfg, err)
	}
	if len(cfg.Cluster.Pods) != 2 || len(cfg.Policies) != 0 {
		t.Fatalf("served %s", summary(cfg))
	}
	if _, err := (&DirSource{Dir: filepath.Join(dir, "missing")}).Load(); err == nil {
		t.Fatal("a missing directory loaded")
	}
}

func TestDirSourceRunFollowsChangesAndPlacementFollows(t *testing.T) {
	dir := t.TempDir()
	copyTestdata(t, dir, map[string]string{"cluster.yaml": "config/cluster.yaml"})
	var mu sync.Mutex
	var got []*Config
	placement := &LivePlacement{}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	reviews := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews")
	if placement.IdentityOnNode("node-1", reviews) {
		t.Fatal("an empty placement places a pod")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	src := &DirSource{Dir: dir, Interval: 5 * time.Millisecond, Log: slog.New(slog.DiscardHandler)}
	go func() {
		done <- src.Run(ctx, func(c *Config) {
			placement.Update(td, c.Cluster.Pods)
			mu.Lock()
			got = append(got, c)
			mu.Unlock()
		})
	}()
	n := func() int { mu.Lock(); defer mu.Unlock(); return len(got) }
	waitFor(t, "first load", func() bool { return n() == 1 })
	if !placement.IdentityOnNode("node-1", reviews) || placement.IdentityOnNode("node-2", reviews) {
		t.Fatal("placement does not follow the first load")
	}
	// reviews-v1 moves to node-2.
	moved := strings.Replace(readTestdata(t, "config/cluster.yaml"), "nodeName: node-1", "nodeName: node-2", 1)
	if err := os.WriteFile(filepath.Join(dir, "cluster.yaml"), []byte(moved), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "reload", func() bool { return n() == 2 })
	if placement.IdentityOnNode("node-1", reviews) || !placement.IdentityOnNode("node-2", reviews) {
		t.Fatal("placement does not follow the change")
	}
	time.Sleep(30 * time.Millisecond)
	if n() != 2 {
		t.Fatalf("%d loads without a change", n())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A controller (re)started while a file is broken does not know that file's last good
// objects: serving the rest would drop them from every agent. It serves nothing until
// the directory loads cleanly; agents keep their cached config meanwhile.
func TestDirSourceRunServesNothingUntilTheFirstCleanLoad(t *testing.T) {
	dir := t.TempDir()
	copyTestdata(t, dir, map[string]string{"cluster.yaml": "config/cluster.yaml", "policy.yaml": "policy-broken-syntax.yaml"})
	var mu sync.Mutex
	var got []*Config
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	src := &DirSource{Dir: dir, Interval: 5 * time.Millisecond, Log: slog.New(slog.DiscardHandler)}
	go func() {
		done <- src.Run(ctx, func(c *Config) { mu.Lock(); got = append(got, c); mu.Unlock() })
	}()
	n := func() int { mu.Lock(); defer mu.Unlock(); return len(got) }
	time.Sleep(100 * time.Millisecond)
	if n() != 0 {
		t.Fatalf("served %d configs while a file is broken at start", n())
	}
	if err := os.Remove(filepath.Join(dir, "policy.yaml")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the first clean load", func() bool { return n() == 1 })
	if c := got[0]; len(c.Cluster.Pods) != 2 {
		t.Fatalf("served %s", summary(c))
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// An object the agents would refuse (here a Service protocol in lower case, which
// Kubernetes itself rejects) is not served: one such object in a push would make every
// agent NACK every push.
func TestDirSourceServesOnlyWhatAgentsAccept(t *testing.T) {
	dir := t.TempDir()
	copyTestdata(t, dir, map[string]string{"cluster.yaml": "config/cluster.yaml"})
	bad := `apiVersion: v1
kind: Service
metadata: {name: lower, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.99
  selector: {app: reviews}
  ports: [{port: 80, protocol: tcp}]
`
	if err := os.WriteFile(filepath.Join(dir, "svc.yaml"), []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := (&DirSource{Dir: dir}).Load()
	if err == nil || !strings.Contains(err.Error(), "bookinfo/lower") || !strings.Contains(err.Error(), "protocol") {
		t.Fatalf("Load error %v, want one naming the service and field", err)
	}
	for _, svc := range cfg.Cluster.Services {
		if svc.Name == "lower" {
			t.Fatal("served a Service every agent would refuse")
		}
	}
}

// configMapMount lays out dir as the kubelet mounts a ConfigMap: each key a symlink into
// "..data", itself a symlink to a timestamped directory holding the files.
type configMapMount struct {
	t   *testing.T
	dir string
	ts  string // the timestamped directory "..data" points to
	n   int
}

func newConfigMapMount(t *testing.T, dir string, files map[string]string) *configMapMount {
	t.Helper()
	m := &configMapMount{t: t, dir: dir}
	m.writeVersion(files)
	if err := os.Symlink(m.ts, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	for name := range files {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return m
}

func (m *configMapMount) writeVersion(files map[string]string) {
	m.t.Helper()
	m.n++
	m.ts = fmt.Sprintf("..2026_12_01_00_0%d_00.%d", m.n, m.n)
	if err := os.Mkdir(filepath.Join(m.dir, m.ts), 0o755); err != nil {
		m.t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(m.dir, m.ts, name), []byte(data), 0o644); err != nil {
			m.t.Fatal(err)
		}
	}
}

// update is the kubelet's update of the same keys: a new timestamped directory, a new
// symlink renamed over "..data" (atomic), the old directory removed. The keys' own
// symlinks do not change.
func (m *configMapMount) update(files map[string]string) {
	m.t.Helper()
	old := m.ts
	m.writeVersion(files)
	tmp := filepath.Join(m.dir, "..data_tmp")
	if err := os.Symlink(m.ts, tmp); err != nil {
		m.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(m.dir, "..data")); err != nil {
		m.t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(m.dir, old)); err != nil {
		m.t.Fatal(err)
	}
}

// TestDirSourceFollowsConfigMapMount: a directory of symlinks, as a ConfigMap mount is,
// reloads within its poll interval when the kubelet swaps "..data", and every file is read
// once (not again through "..data" or the timestamped directory). Both the mount itself
// as --config-dir, and a directory whose files are symlinks into a mount elsewhere (whose
// own entries never change).
func TestDirSourceFollowsConfigMapMount(t *testing.T) {
	const strict = "pod bookinfo/productpage-v1 10.77.2.10; pod bookinfo/reviews-v1 10.77.1.10; " +
		"PeerAuthentication bookinfo/default STRICT; AuthorizationPolicy bookinfo/reviews-allow-productpage from cluster.local/ns/bookinfo/sa/bookinfo-productpage"
	permissive := strings.Replace(strict, "STRICT", "PERMISSIVE", 1)
	files := func(mode string) map[string]string {
		return map[string]string{
			"cluster.yaml": readTestdata(t, "config/cluster.yaml"),
			"policy.yaml":  strings.Replace(readTestdata(t, "config/policy.yaml"), "STRICT", mode, 1),
		}
	}
	for _, tc := range []struct {
		name string
		// setup returns the directory to load and the mount to update.
		setup func(t *testing.T) (string, *configMapMount)
	}{
		{"the config dir is the mount", func(t *testing.T) (string, *configMapMount) {
			dir := t.TempDir()
			return dir, newConfigMapMount(t, dir, files("STRICT"))
		}},
		{"the config dir links into a mount", func(t *testing.T) (string, *configMapMount) {
			root := t.TempDir()
			mount, dir := filepath.Join(root, "cm"), filepath.Join(root, "config")
			for _, d := range []string{mount, dir} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			m := newConfigMapMount(t, mount, files("STRICT"))
			for name := range files("STRICT") {
				if err := os.Symlink(filepath.Join("..", "cm", name), filepath.Join(dir, name)); err != nil {
					t.Fatal(err)
				}
			}
			return dir, m
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, mount := tc.setup(t)
			if cfg, err := (&DirSource{Dir: dir}).Load(); err != nil || summary(cfg) != strict {
				t.Fatalf("Load: %v\n got %s\nwant %s", err, summary(cfg), strict)
			}
			var mu sync.Mutex
			var got []*Config
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			const interval = 20 * time.Millisecond
			src := &DirSource{Dir: dir, Interval: interval, Log: slog.New(slog.DiscardHandler)}
			go func() {
				done <- src.Run(ctx, func(c *Config) { mu.Lock(); got = append(got, c); mu.Unlock() })
			}()
			defer func() {
				cancel()
				if err := <-done; err != nil {
					t.Error(err)
				}
			}()
			last := func() (int, string) {
				mu.Lock()
				defer mu.Unlock()
				if len(got) == 0 {
					return 0, ""
				}
				return len(got), summary(got[len(got)-1])
			}
			waitFor(t, "first load", func() bool { n, _ := last(); return n == 1 })
			if _, s := last(); s != strict {
				t.Fatalf("first load:\n got %s\nwant %s", s, strict)
			}

			mount.update(files("PERMISSIVE"))
			start := time.Now()
			waitFor(t, "the ConfigMap update", func() bool { _, s := last(); return s == permissive })
			// A poll, the settle time and the load; generous for a loaded machine.
			if took := time.Since(start); took > 25*interval {
				t.Errorf("the update took %v to load; the poll interval is %v", took, interval)
			}
			if cfg, err := (&DirSource{Dir: dir}).Load(); err != nil || summary(cfg) != permissive {
				t.Fatalf("Load after the update: %v\n got %s\nwant %s", err, summary(cfg), permissive)
			}
			// And nothing more without a change.
			n, _ := last()
			time.Sleep(5 * interval)
			if m, _ := last(); m != n {
				t.Errorf("%d loads without a change", m-n)
			}
		})
	}
}
