//go:build linux

package bpf

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// FeatureError reports a kernel feature veil needs and the kernel version that has it.
type FeatureError struct {
	Feature string // what is missing, e.g. "bpf_sk_assign helper"
	Version string // first Linux version that has it
	Err     error
}

func (e *FeatureError) Error() string {
	return fmt.Sprintf("bpf: kernel lacks %s (needs Linux %s or later): %v", e.Feature, e.Version, e.Err)
}

func (e *FeatureError) Unwrap() error { return e.Err }

// Is makes errors.Is(err, ebpf.ErrNotSupported) true for every FeatureError.
func (e *FeatureError) Is(target error) bool { return target == ebpf.ErrNotSupported }

type featureCheck struct {
	name, version string
	probe         func() error
}

var requiredFeatures = []featureCheck{
	{"BPF_PROG_TYPE_SCHED_CLS programs", "4.1", func() error { return features.HaveProgramType(ebpf.SchedCLS) }},
	{"BPF_MAP_TYPE_SOCKMAP", "4.14", func() error { return features.HaveMapType(ebpf.SockMap) }},
	{"BPF_MAP_TYPE_LPM_TRIE", "4.11", func() error { return features.HaveMapType(ebpf.LPMTrie) }},
	{"BPF_MAP_TYPE_PERCPU_ARRAY", "4.6", func() error { return features.HaveMapType(ebpf.PerCPUArray) }},
	{"bpf_skc_lookup_tcp helper", "5.2", helper(asm.FnSkcLookupTcp)},
	{"bpf_sk_release helper", "4.20", helper(asm.FnSkRelease)},
	{"bpf_sk_assign helper at TC", "5.7", helper(asm.FnSkAssign)},
	{"bpf_skb_change_type helper", "4.8", helper(asm.FnSkbChangeType)},
	{"bpf_redirect helper", "4.4", helper(asm.FnRedirect)},
	{"listening TCP sockets in a SOCKMAP", "5.7", haveListenerSockmap},
}

func helper(fn asm.BuiltinFunc) func() error {
	return func() error { return features.HaveProgramHelper(ebpf.SchedCLS, fn) }
}

// CheckFeatures probes the running kernel for everything capture needs and returns a
// *FeatureError for the first thing missing. It reports whether TCX (Linux 6.6) is
// available; without it Load falls back to clsact filters. It does not block.
func CheckFeatures() (tcx bool, err error) {
	for _, f := range requiredFeatures {
		if err := f.probe(); err != nil {
			return false, &FeatureError{Feature: f.name, Version: f.version, Err: err}
		}
	}
	err = haveTCX()
	if errors.Is(err, ebpf.ErrNotSupported) {
		return false, nil
	}
	return err == nil, err
}

// haveTCX attaches a trivial program to an interface index that cannot exist: a kernel
// with TCX answers ENODEV, one without it rejects the attach type.
func haveTCX() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "Dual BSD/GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("bpf: probe tcx: %w", err)
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxInt32, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
		return nil
	}
	if errors.Is(err, unix.ENODEV) {
		return nil
	}
	if errors.Is(err, ebpf.ErrNotSupported) {
		return err
	}
	return fmt.Errorf("bpf: probe tcx: %w", err)
}

// haveListenerSockmap inserts a listening loopback socket into a throwaway SOCKMAP:
// kernels before 5.7 accept only established sockets there.
func haveListenerSockmap() error {
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SockMap, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		return err
	}
	defer m.Close()
	// The wildcard address: in a fresh network namespace loopback has no address yet.
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp4", ":0")
	if err != nil {
		return fmt.Errorf("probe listener: %w", err)
	}
	defer ln.Close()
	return putSocket(m, 0, ln.(*net.TCPListener))
}
