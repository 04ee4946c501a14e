package controller

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/veilmesh/veil/api"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
)

// DirSource is a Source reading a directory of Kubernetes YAML: Namespaces, Pods,
// Services, EndpointSlices, Gateway API Gateways and the security.istio.io kinds, in
// every *.yaml, *.yml and *.json file directly in Dir (kubectl-style, several documents
// a file, kind List unpacked; other kinds such as ServiceAccount or Deployment are
// skipped). It polls the directory for
// changes, following symlinks: a ConfigMap mounted as Dir (keys linked through "..data",
// which the kubelet swaps on an update) reloads like a directory of plain files.
//
// A bad object is reported and left out; the rest keeps serving. An object that was good
// keeps its last good version while it is bad (a policy that no longer validates, a pod
// whose IP no longer parses), and every object of a file keeps its last good version
// while the file cannot be read whole (a YAML syntax error hides which objects the file
// still means to hold): a typo never loosens what is enforced. Deleting the file deletes
// its objects.
//
// A DirSource is not safe for concurrent use: call Load or Run from one goroutine.
type DirSource struct {
	Dir string
	// Policy are the options policies are validated with (root namespace, trust domain).
	Policy policy.Options
	// Interval between checks for changes. Default 200ms.
	Interval time.Duration
	Log      *slog.Logger

	last   map[api.Key]kept
	digest uint64
	served bool // a clean load has been passed to update
	loaded bool // Run has loaded the directory at least once
}

// kept is an object as last read good, and the file it came from.
type kept struct {
	file string
	ns   *cluster.Namespace
	pod  *cluster.Pod
	svc  *cluster.Service
	eps  *cluster.EndpointSlice
	gw   *cluster.Gateway
	pol  *policy.Object
}

// Load reads the directory once. It returns the config (what is valid, plus last good
// versions as described above) and every problem found, joined; err is nil only when
// nothing was wrong. cfg is nil only when the directory itself cannot be read.
func (s *DirSource) Load() (cfg *Config, err error) {
	ents, err := os.ReadDir(s.Dir)
	if err != nil {
		return nil, fmt.Errorf("controller: config dir: %w", err)
	}
	var files []string
	for _, e := range ents {
		if configFile(s.Dir, e) {
			files = append(files, filepath.Join(s.Dir, e.Name()))
		}
	}
	sort.Strings(files)
	docs := make([]doc, len(files))
	for i, file := range files {
		docs[i].name = file
		docs[i].data, docs[i].err = os.ReadFile(file)
	}
	return s.loadDocs(docs)
}

// doc is one source of objects: a file, or one object from the API server.
type doc struct {
	name string
	data []byte
	err  error // it could not be read
}

// loadDocs turns documents into a config, keeping last good versions as Load says.
func (s *DirSource) loadDocs(docs []doc) (cfg *Config, err error) {
	now := map[api.Key]kept{}
	broken := map[string]bool{}
	keep := map[api.Key]bool{}
	var errs []error
	put := func(k api.Key, v kept) {
		if prev, dup := now[k]; dup && prev.file != v.file {
			errs = append(errs, fmt.Errorf("%s: %s: also defined in %s; the later file wins", v.file, k, prev.file))
		}
		now[k] = v
	}
	for _, d := range docs {
		file, data := d.name, d.data
		if d.err != nil {
			broken[file] = true
			errs = append(errs, d.err)
			continue
		}
		st, clusterErrs := cluster.Parse(file, data)
		if len(clusterErrs) > 0 {
			broken[file] = true
			errs = append(errs, clusterErrs...)
		}
		m := policy.Parse(file, data)
		for _, e := range m.Errors {
			var oe *policy.ObjectError
			if errors.As(e, &oe) && oe.Kind != 0 {
				if oe.Name != "" {
					keep[policyKey(oe.Key())] = true
				} else {
					broken[file] = true
				}
				errs = append(errs, e)
				continue
			}
			// Syntax errors, and Pods the policy parser reads for itself: the
			// cluster parser has reported those already, unless it could read them.
			broken[file] = true
			if len(clusterErrs) == 0 {
				errs = append(errs, e)
			}
		}
		// Every object is checked as each agent will check it: encoded for the stream and
		// decoded. One an agent would refuse is not served (its last good version is),
		// or every push would be NACKed and config would freeze on every node.
		servable := func(k api.Key, file string, v kept, r *api.Resource, err error) {
			if err == nil {
				_, _, err = r.Decode()
			}
			if err != nil {
				keep[k] = true
				errs = append(errs, fmt.Errorf("%s: %s: %w", file, k, err))
				return
			}
			put(k, v)
		}
		for _, o := range m.Objects {
			if _, err := policy.Validate(o, s.Policy); err != nil {
				keep[policyKey(o.Key())] = true
				errs = append(errs, err)
				continue
			}
			r, err := api.PolicyResource(o)
			servable(policyKey(o.Key()), file, kept{file: file, pol: o}, r, err)
		}
		for _, ns := range sortedNamespaces(st) {
			servable(api.Key{Kind: api.Kind_KIND_NAMESPACE, Name: ns.Name}, file, kept{file: file, ns: ns}, api.NamespaceResource(ns), nil)
		}
		for _, p := range st.Pods {
			servable(api.Key{Kind: api.Kind_KIND_WORKLOAD, Namespace: p.Namespace, Name: p.Name}, file, kept{file: file, pod: p}, api.WorkloadResource(st, p), nil)
		}
		for _, svc := range st.Services {
			servable(api.Key{Kind: api.Kind_KIND_SERVICE, Namespace: svc.Namespace, Name: svc.Name}, file, kept{file: file, svc: svc}, api.ServiceResource(svc), nil)
		}
		for _, sl := range st.EndpointSlices {
			servable(api.Key{Kind: api.Kind_KIND_ENDPOINT_SLICE, Namespace: sl.Namespace, Name: sl.Name}, file, kept{file: file, eps: sl}, api.EndpointSliceResource(sl), nil)
		}
		for _, gw := range st.Gateways {
			servable(api.Key{Kind: api.Kind_KIND_GATEWAY, Namespace: gw.Namespace, Name: gw.Name}, file, kept{file: file, gw: gw}, api.GatewayResource(gw), nil)
		}
	}
	for k, v := range s.last {
		if _, still := now[k]; still || !(keep[k] || broken[v.file]) {
			continue
		}
		now[k] = v
		errs = append(errs, fmt.Errorf("%s: %s: keeping its last good version until the errors above are fixed", v.file, k))
	}
	s.last = now
	return s.config(), errors.Join(errs...)
}

// config builds a Config from s.last in a stable order.
func (s *DirSource) config() *Config {
	keys := make([]api.Key, 0, len(s.last))
	for k := range s.last {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return lessKey(keys[i], keys[j]) })
	cfg := &Config{Cluster: &cluster.State{Namespaces: map[string]*cluster.Namespace{}}}
	for _, k := range keys {
		v := s.last[k]
		switch {
		case v.ns != nil:
			cfg.Cluster.Namespaces[v.ns.Name] = v.ns
		case v.pod != nil:
			cfg.Cluster.Pods = append(cfg.Cluster.Pods, v.pod)
		case v.svc != nil:
			cfg.Cluster.Services = append(cfg.Cluster.Services, v.svc)
		case v.eps != nil:
			cfg.Cluster.EndpointSlices = append(cfg.Cluster.EndpointSlices, v.eps)
		case v.gw != nil:
			cfg.Cluster.Gateways = append(cfg.Cluster.Gateways, v.gw)
		case v.pol != nil:
			cfg.Policies = append(cfg.Policies, v.pol)
		}
	}
	return cfg
}

// Run implements Source: it loads the directory, calls update, and again after every
// change until ctx ends, logging the problems of each load. It blocks, and returns an
// error only when the directory cannot be read at first.
func (s *DirSource) Run(ctx context.Context, update func(*Config)) error {
	log := s.Log
	if log == nil {
		log = slog.Default()
	}
	interval := s.Interval
	if interval <= 0 {
		interval = 200 * time.Millisecond
	}
	load := func() bool {
		d, err := dirDigest(s.Dir)
		if err != nil {
			log.Warn("config: cannot read directory; serving the last good config", "dir", s.Dir, "err", err)
			return false
		}
		if d == s.digest && s.loaded {
			return true
		}
		s.loaded = true
		// Let a write in progress finish: a file caught half written may parse as
		// valid YAML holding fewer objects, and those would be deleted for a moment.
		for settle := min(interval/4, 50*time.Millisecond); s.last != nil; {
			time.Sleep(settle)
			again, err := dirDigest(s.Dir)
			if err != nil || again == d {
				break
			}
			d = again
		}
		s.digest = d
		start := time.Now()
		cfg, err := s.Load()
		if cfg == nil {
			log.Warn("config: cannot read directory; serving the last good config", "dir", s.Dir, "err", err)
			return false
		}
		for _, e := range unjoin(err) {
			log.Warn("config: object ignored", "dir", s.Dir, "err", e)
		}
		// Until one load is clean nothing is served: with no last good version to keep,
		// a broken file would mean its DENY policies, or its pods, missing everywhere,
		// and a restarted controller must not loosen what the agents (from their
		// caches) enforce.
		if !s.served && err != nil {
			s.last = nil
			log.Error("config: not serving until the directory loads without errors; agents keep their last good config", "dir", s.Dir, "errors", len(unjoin(err)))
			return true
		}
		s.served = true
		log.Info("config: loaded", "dir", s.Dir, "namespaces", len(cfg.Cluster.Namespaces), "pods", len(cfg.Cluster.Pods),
			"services", len(cfg.Cluster.Services), "gateways", len(cfg.Cluster.Gateways), "policies", len(cfg.Policies), "errors", len(unjoin(err)), "took", time.Since(start))
		update(cfg)
		return true
	}
	if !load() {
		return fmt.Errorf("controller: config dir %s: cannot be read", s.Dir)
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			load()
		}
	}
}

// configFile reports whether Load reads the entry e of dir: a *.yaml, *.yml or *.json
// file, or a symlink to one. Names starting with ".." are the kubelet's own in a
// ConfigMap or Secret mount ("..data", the timestamped directory it points to): their
// files are read once, through the keys' symlinks.
func configFile(dir string, e os.DirEntry) bool {
	if strings.HasPrefix(e.Name(), "..") {
		return false
	}
	switch strings.ToLower(filepath.Ext(e.Name())) {
	case ".yaml", ".yml", ".json":
	default:
		return false
	}
	if e.Type()&os.ModeSymlink != 0 {
		// A dangling link is read, and reported, as a file that cannot be.
		st, err := os.Stat(filepath.Join(dir, e.Name()))
		return err != nil || !st.IsDir()
	}
	return !e.IsDir()
}

// dirDigest hashes the names, sizes and modification times of the directory's entries,
// and for a symlink also where it leads and the size and time of what it leads to. A
// ConfigMap mount changes only the target of "..data", and a directory of symlinks into
// another one changes nothing of its own: the links themselves stay as they are.
func dirDigest(dir string) (uint64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	h := fnv.New64a()
	for _, e := range ents { // ReadDir sorts by name
		info, err := e.Info()
		if err != nil {
			fmt.Fprintf(h, "%s\x00gone\n", e.Name())
			continue
		}
		fmt.Fprintf(h, "%s\x00%d\x00%d", e.Name(), info.Size(), info.ModTime().UnixNano())
		if info.Mode()&os.ModeSymlink != 0 {
			path := filepath.Join(dir, e.Name())
			target, err := filepath.EvalSymlinks(path)
			if err != nil {
				fmt.Fprintf(h, "\x00dangling")
			} else if st, err := os.Stat(target); err != nil {
				fmt.Fprintf(h, "\x00%s\x00gone", target)
			} else {
				fmt.Fprintf(h, "\x00%s\x00%d\x00%d", target, st.Size(), st.ModTime().UnixNano())
			}
		}
		fmt.Fprintln(h)
	}
	return h.Sum64(), nil
}

func unjoin(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

func policyKey(k policy.Key) api.Key {
	kind := api.Kind_KIND_UNSPECIFIED
	switch k.Kind {
	case policy.KindPeerAuthentication:
		kind = api.Kind_KIND_PEER_AUTHENTICATION
	case policy.KindAuthorizationPolicy:
		kind = api.Kind_KIND_AUTHORIZATION_POLICY
	case policy.KindRequestAuthentication:
		kind = api.Kind_KIND_REQUEST_AUTHENTICATION
	}
	return api.Key{Kind: kind, Namespace: k.Namespace, Name: k.Name}
}

func lessKey(a, b api.Key) bool {
	if a.Kind != b.Kind {
		return a.Kind < b.Kind
	}
	if a.Namespace != b.Namespace {
		return a.Namespace < b.Namespace
	}
	return a.Name < b.Name
}

func sortedNamespaces(st *cluster.State) []*cluster.Namespace {
	out := make([]*cluster.Namespace, 0, len(st.Namespaces))
	for _, ns := range st.Namespaces {
		out = append(out, ns)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
