package policy

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Loaded is the result of LoadDir.
type Loaded struct {
	// Objects are the valid objects; invalid ones are left out and reported in Errors.
	Objects   []*Object
	Workloads []*Workload
	Skipped   []string
	Warnings  []string
	// Errors has one entry per rejected document or object (each an *ObjectError).
	Errors []error
}

// LoadDir parses and validates every *.yaml, *.yml and *.json file directly in dir (not in
// subdirectories), in name order. A bad object is rejected alone; the error is returned only when
// the directory cannot be read.
func LoadDir(dir string, opts Options) (*Loaded, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("policy: read %s: %w", dir, err)
	}
	var names []string
	for _, e := range entries {
		ext := strings.ToLower(filepath.Ext(e.Name()))
		if !e.IsDir() && (ext == ".yaml" || ext == ".yml" || ext == ".json") {
			names = append(names, filepath.Join(dir, e.Name()))
		}
	}
	sort.Strings(names)
	l := &Loaded{}
	for _, name := range names {
		data, err := os.ReadFile(name)
		if err != nil {
			return nil, fmt.Errorf("policy: read %s: %w", name, err)
		}
		l.add(Parse(name, data), opts)
	}
	return l, nil
}

func (l *Loaded) add(m *Manifest, opts Options) {
	l.Errors = append(l.Errors, m.Errors...)
	l.Skipped = append(l.Skipped, m.Skipped...)
	l.Workloads = append(l.Workloads, m.Workloads...)
	for _, o := range m.Objects {
		w, err := Validate(o, opts)
		l.Warnings = append(l.Warnings, w...)
		if err != nil {
			l.Errors = append(l.Errors, err)
			continue
		}
		l.Objects = append(l.Objects, o)
	}
}
