//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrClosed is returned by calls on a Capture after Close.
var ErrClosed = errors.New("bpf: capture is closed")

// Config flags, as in capture.c.
const (
	cfgFailOpen    = 1 << 0
	cfgCaptureHost = 1 << 1
)

// Capture is the loaded capture: programs, pinned maps, and the interfaces they are
// attached to. Its methods are safe for concurrent use. Closing it releases this
// process's handles only; the pinned programs keep capturing (see Uninstall).
type Capture struct {
	opts Options
	ns   netns.NsHandle // the node's network namespace: where Load was called
	tcx  bool

	// mu serialises attachment and enrollment (read-modify-write of the ifaces map and
	// sysctls). closed is guarded by mu.
	mu     sync.Mutex
	closed bool
	objs   captureObjects
}

// Load checks the kernel, loads the programs, reuses maps pinned in opts.PinDir by an
// earlier agent (enrollments and counters survive), sets up the node (policy routing,
// NOTRACK), moves every pinned attachment to the freshly loaded programs, and attaches to
// opts.Uplinks. It works in the caller's network namespace (the node's) and is idempotent.
// It does not block beyond the syscalls it makes.
func Load(opts Options) (_ *Capture, err error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	tcx, err := CheckFeatures()
	if err != nil {
		return nil, err
	}
	if opts.ForceClsact {
		tcx = false
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("bpf: current network namespace: %w", err)
	}
	c := &Capture{opts: opts, ns: ns, tcx: tcx}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
		}
	}()
	if err := ensurePinDir(opts.PinDir); err != nil {
		return nil, err
	}
	if err := loadObjects(&c.objs, opts.PinDir); err != nil {
		return nil, err
	}
	if err := c.writeConfig(); err != nil {
		return nil, err
	}
	if err := fillLPM(c.objs.VeilExclude, opts.Exclude); err != nil {
		return nil, fmt.Errorf("bpf: exclude map: %w", err)
	}
	if err := fillLPM(c.objs.VeilHostExclude, opts.HostExclude); err != nil {
		return nil, fmt.Errorf("bpf: host exclude map: %w", err)
	}
	if err := setupNode(opts); err != nil {
		return nil, err
	}
	if err := c.adopt(); err != nil {
		return nil, err
	}
	for _, name := range opts.Uplinks {
		if err := c.AttachUplink(name); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func loadObjects(objs *captureObjects, pinDir string) error {
	spec, err := loadCapture()
	if err != nil {
		return fmt.Errorf("bpf: read embedded programs: %w", err)
	}
	err = spec.LoadAndAssign(objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: pinDir}})
	var ve *ebpf.VerifierError
	switch {
	case errors.As(err, &ve):
		// The last lines say why; the whole log is thousands of lines.
		return fmt.Errorf("bpf: verifier rejected capture programs: %w\n%-12v", err, ve)
	case errors.Is(err, ebpf.ErrMapIncompatible):
		// An upgrade changed a map's layout: replace it, carrying its state over.
		if err := loadMigrating(spec, objs, pinDir); err != nil {
			return fmt.Errorf("bpf: maps pinned in %s are from another veil version and cannot be carried over; the old capture stays in force (veil-agent uninstall resets it): %w", pinDir, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("bpf: load capture programs: %w", err)
	}
	return nil
}

// ensurePinDir creates dir on a bpf filesystem, refusing any other filesystem: pins on
// tmpfs would vanish silently with the agent.
func ensurePinDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("bpf: pin dir %s: %w (is bpffs mounted? mount -t bpf bpf /sys/fs/bpf)", dir, err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("bpf: pin dir %s: %w", dir, err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("bpf: pin dir %s is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)", dir)
	}
	if err := os.MkdirAll(linkDir(dir), 0o700); err != nil {
		return fmt.Errorf("bpf: pin dir %s: %w", dir, err)
	}
	return nil
}

func (c *Capture) writeConfig() error {
	o := c.opts
	cfg := captureConfig{
		CaptureMark:  o.CaptureMark,
		AgentMark:    o.AgentMark,
		MarkMask:     o.MarkMask,
		RouteTable:   uint32(o.RouteTable),
		RulePriority: uint32(o.RulePriority),
	}
	if o.FailOpen {
		cfg.Flags |= cfgFailOpen
	}
	if o.CaptureHost {
		cfg.Flags |= cfgCaptureHost
	}
	if err := c.objs.VeilConfig.Update(uint32(0), cfg, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("bpf: write config map: %w", err)
	}
	return nil
}

// fillLPM replaces the contents of an LPM trie with prefixes.
func fillLPM(m *ebpf.Map, prefixes []netip.Prefix) error {
	var k captureLpmKey
	var keys []captureLpmKey
	it := m.Iterate()
	var v uint8
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		return err
	}
	want := map[captureLpmKey]bool{}
	for _, p := range prefixes {
		want[lpmKey(p)] = true
	}
	for _, k := range keys {
		if !want[k] {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return err
			}
		}
	}
	for k := range want {
		if err := m.Update(k, uint8(1), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("%v: %w", k, err)
		}
	}
	return nil
}

func lpmKey(p netip.Prefix) captureLpmKey {
	p = p.Masked()
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96 // stored IPv4-mapped
	}
	return captureLpmKey{Prefixlen: uint32(bits), A: captureAddr{B: p.Addr().As16()}}
}

func (c *Capture) check() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	return nil
}

// Close releases this process's handles on programs and maps. Pinned attachments keep
// capturing; with the agent's listeners gone, enrolled pods' new connections are dropped
// until an agent calls Load and SetListener again. Idempotent; does not block.
func (c *Capture) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	err := c.objs.Close()
	if c.ns.IsOpen() {
		c.ns.Close()
	}
	return err
}
