//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// An upgrade may change the layout of a pinned map (its type, sizes, limits or flags).
// loadObjects then replaces that map instead of failing: the new map is created
// unpinned, what the old one holds is carried over, the new programs (which adopt then
// attaches in place of the old ones, atomically per interface) are loaded against it,
// and the new map takes the old one's pin. Meanwhile the old programs keep running on
// the old map, and the agent that wrote it has stopped (the pin directory's lock), so
// nothing is lost in between and nothing is ever left uncaptured.
//
// Carrying over: entries whose key and value sizes did not change are copied as they are
// (a new limit or flag); a map whose entry layout changed needs a conversion in
// migrations, keyed by map name, written with the change. A layout change with no way to
// carry its state over is refused, naming the map, and the old capture stays in force.

// migration copies the entries of a map with an old layout into one with the new layout.
type migration func(old, new *ebpf.Map) error

// migrations holds the conversions of maps whose entry layout changed between releases.
// None so far.
var migrations = map[string]migration{}

// stateless maps are rebuilt by the agent as it starts (config, excludes, counters, and
// the listeners it registers), so a new layout of theirs needs no carrying over.
var stateless = map[string]bool{
	"veil_config":       true,
	"veil_exclude":      true,
	"veil_host_exclude": true,
	"veil_counters":     true,
	"veil_listeners":    true,
}

// loadMigrating loads spec with its pinned maps under pinDir, replacing those whose
// layout changed.
func loadMigrating(spec *ebpf.CollectionSpec, objs *captureObjects, pinDir string) error {
	old := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range old {
			m.Close()
		}
	}()
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("bpf: pinned map %s: %w", name, err)
		}
		if ms.Compatible(m) == nil {
			m.Close()
			continue
		}
		info, _ := m.Info()
		sameEntries := info != nil && m.KeySize() == ms.KeySize && m.ValueSize() == ms.ValueSize && m.Type() == ms.Type
		if migrations[name] == nil && !stateless[name] && !sameEntries {
			m.Close()
			return fmt.Errorf("bpf: pinned map %s changed its entry layout (key %d, value %d bytes -> %d, %d) and no migration carries it over",
				name, m.KeySize(), m.ValueSize(), ms.KeySize, ms.ValueSize)
		}
		old[name] = m
		ms.Pinning = ebpf.PinNone // created anew below, pinned once filled
	}
	if err := spec.LoadAndAssign(objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: pinDir}}); err != nil {
		return err
	}
	for name, m := range old {
		nm := mapByName(objs, name)
		if nm == nil {
			return fmt.Errorf("bpf: migrate %s: no such map in this release", name)
		}
		switch {
		case migrations[name] != nil:
			if err := migrations[name](m, nm); err != nil {
				return fmt.Errorf("bpf: migrate %s: %w", name, err)
			}
		case stateless[name]:
		default:
			if err := copyEntries(m, nm); err != nil {
				return fmt.Errorf("bpf: migrate %s: %w", name, err)
			}
		}
		path := filepath.Join(pinDir, name)
		if err := m.Unpin(); err != nil {
			return fmt.Errorf("bpf: migrate %s: unpin the old map: %w", name, err)
		}
		if err := nm.Pin(path); err != nil {
			return fmt.Errorf("bpf: migrate %s: pin the new map: %w", name, err)
		}
	}
	return nil
}

// copyEntries copies every entry of old into new (same key and value sizes; not per-CPU).
func copyEntries(old, new *ebpf.Map) error {
	if perCPU(old.Type()) {
		return fmt.Errorf("per-CPU map %v: no generic copy", old.Type())
	}
	k := make([]byte, old.KeySize())
	v := make([]byte, old.ValueSize())
	it := old.Iterate()
	for it.Next(&k, &v) {
		if err := new.Update(k, v, ebpf.UpdateAny); err != nil {
			return err
		}
	}
	return it.Err()
}

// mapByName returns the loaded map of that name.
func mapByName(objs *captureObjects, name string) *ebpf.Map {
	for n, m := range map[string]*ebpf.Map{
		"veil_config": objs.VeilConfig, "veil_enrolled": objs.VeilEnrolled, "veil_exclude": objs.VeilExclude,
		"veil_host_exclude": objs.VeilHostExclude, "veil_listeners": objs.VeilListeners,
		"veil_counters": objs.VeilCounters, "veil_ifaces": objs.VeilIfaces,
	} {
		if n == name {
			return m
		}
	}
	return nil
}

func perCPU(t ebpf.MapType) bool {
	switch t {
	case ebpf.PerCPUHash, ebpf.PerCPUArray, ebpf.LRUCPUHash, ebpf.PerCPUCGroupStorage:
		return true
	}
	return false
}
