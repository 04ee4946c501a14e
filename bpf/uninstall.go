//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
)

// Uninstall removes everything veil installed on the node: the programs on every
// interface (TCX links or clsact filters, and clsact qdiscs veil created), the sysctls it
// changed (restored), the policy rules and routes, the nftables table, and every pin under
// pinDir (DefaultPinDir if empty), then pinDir itself. It reads what to remove from the
// pinned maps, so it needs no other options; with nothing pinned it still removes rules
// and routes made with the default options. It works in the caller's network namespace.
// Enrolled pods' traffic flows uncaptured afterwards. Do not run it while an agent runs.
func Uninstall(pinDir string) error {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	d := Options{}.withDefaults()
	r := nodeRouting{table: d.RouteTable, priority: d.RulePriority, mark: d.CaptureMark, mask: d.MarkMask}
	var errs []error

	if m, err := ebpf.LoadPinnedMap(pinDir+"/veil_config", nil); err == nil {
		var cfg captureConfig
		if err := m.Lookup(uint32(0), &cfg); err == nil && cfg.RouteTable != 0 {
			r = nodeRouting{table: int(cfg.RouteTable), priority: int(cfg.RulePriority), mark: cfg.CaptureMark, mask: cfg.MarkMask}
		}
		m.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("bpf: uninstall: %w", err))
	}

	if m, err := ebpf.LoadPinnedMap(pinDir+"/veil_ifaces", nil); err == nil {
		var (
			idx  uint32
			st   captureIfaceState
			idxs []int
		)
		it := m.Iterate()
		for it.Next(&idx, &st) {
			idxs = append(idxs, int(idx))
		}
		errs = append(errs, it.Err())
		for _, i := range idxs {
			errs = append(errs, detachIface(pinDir, m, i))
		}
		m.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("bpf: uninstall: %w", err))
	}

	// Links whose interface record is missing.
	if ents, err := os.ReadDir(linkDir(pinDir)); err == nil {
		for _, e := range ents {
			if err := os.Remove(linkDir(pinDir) + "/" + e.Name()); err != nil {
				errs = append(errs, fmt.Errorf("bpf: uninstall: %w", err))
			}
		}
	}
	errs = append(errs, teardownNode(r))

	if err := errors.Join(errs...); err != nil {
		return err // keep the pins: they say what is still to remove
	}
	if err := os.RemoveAll(pinDir); err != nil {
		return fmt.Errorf("bpf: uninstall: remove %s: %w", pinDir, err)
	}
	return nil
}
