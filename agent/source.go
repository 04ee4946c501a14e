package agent

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

	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
)

// DirSource feeds an Agent from a directory of Kubernetes YAML — Namespaces, Pods,
// Services and the security.istio.io policies — the format the controller serves, for
// an agent that runs without one. It re-reads the directory when a file changes. A bad
// object is reported and left out; a policy that was valid keeps its last good version
// while its file is broken, so a typo never loosens what is enforced.
type DirSource struct {
	Dir   string
	Agent *Agent
	// Interval between checks for changes. Default 500ms.
	Interval time.Duration
	Log      *slog.Logger

	known  map[policy.Key]string // policy -> the file it came from
	digest uint64
	loaded bool // a cluster view has been applied
}

// Load reads the directory once and applies it. The error joins every problem found;
// what was valid is applied regardless.
func (s *DirSource) Load() error {
	log := s.Log
	if log == nil {
		log = slog.Default()
	}
	// The digest is taken before reading, so a change during the read is seen next time.
	if d, err := dirDigest(s.Dir); err == nil {
		s.digest = d
	}
	st, clusterErrs, err := cluster.LoadDir(s.Dir)
	if err != nil {
		return err
	}
	loaded, err := policy.LoadDir(s.Dir, s.Agent.opts.Policy)
	if err != nil {
		return err
	}
	// A cluster object that did not load must not make its pod vanish (unenrolled,
	// uncaptured): with errors, the previous view stays, unless there is none yet.
	if len(clusterErrs) == 0 || !s.loaded {
		s.Agent.Update(st)
		s.loaded = true
	} else {
		log.Warn("config: cluster objects have errors; keeping the previous pods, namespaces and services until they are fixed", "dir", s.Dir)
	}

	// Objects whose file could not be read whole keep their last good version: a
	// syntax error hides which objects the file still means to hold.
	keep := map[policy.Key]bool{}
	brokenFiles := map[string]bool{}
	for _, e := range loaded.Errors {
		var oe *policy.ObjectError
		if errors.As(e, &oe) {
			if oe.Name != "" {
				keep[oe.Key()] = true
			} else {
				brokenFiles[sourceFile(oe.Source)] = true
			}
		}
	}
	now := map[policy.Key]string{}
	for _, o := range loaded.Objects {
		now[o.Key()] = sourceFile(o.Source)
	}
	var deleted []policy.Key
	for k, file := range s.known {
		if _, still := now[k]; still || keep[k] || brokenFiles[file] {
			now[k] = file
			continue
		}
		deleted = append(deleted, k)
	}
	s.known = now
	applyErr := s.Agent.ApplyPolicies(loaded.Objects, deleted)

	errs := append(clusterErrs, loaded.Errors...)
	if applyErr != nil {
		errs = append(errs, applyErr)
	}
	for _, e := range errs {
		log.Warn("config: object ignored", "dir", s.Dir, "err", e)
	}
	log.Info("config loaded", "dir", s.Dir, "pods", len(st.Pods), "services", len(st.Services), "policies", len(loaded.Objects), "errors", len(errs))
	return errors.Join(errs...)
}

// Run reloads the directory whenever its files change, until ctx ends; call Load once
// before. It blocks. Errors of a reload are logged, and what was valid is applied.
func (s *DirSource) Run(ctx context.Context) error {
	interval := s.Interval
	if interval <= 0 {
		interval = 500 * time.Millisecond
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		d, err := dirDigest(s.Dir)
		if err != nil || d == s.digest {
			continue
		}
		s.digest = d
		_ = s.Load()
	}
}

// dirDigest hashes the names, sizes and modification times of the directory's files.
func dirDigest(dir string) (uint64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name() < ents[j].Name() })
	h := fnv.New64a()
	for _, e := range ents {
		info, err := e.Info()
		if err != nil {
			continue
		}
		fmt.Fprintf(h, "%s\x00%d\x00%d\n", e.Name(), info.Size(), info.ModTime().UnixNano())
	}
	return h.Sum64(), nil
}

// sourceFile strips the ":line" or "#doc" suffix of an object's source.
func sourceFile(src string) string {
	if i := strings.LastIndexAny(src, ":#"); i > 0 && filepath.Ext(src[:i]) != "" {
		return src[:i]
	}
	return src
}
