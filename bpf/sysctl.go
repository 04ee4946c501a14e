//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
)

func sysctlPath(ifname, key string) string {
	return filepath.Join("/proc/sys/net/ipv4/conf", ifname, key)
}

func readSysctl(ifname, key string) (int32, error) {
	b, err := os.ReadFile(sysctlPath(ifname, key))
	if err != nil {
		return 0, err
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("%s: %w", sysctlPath(ifname, key), err)
	}
	return int32(v), nil
}

func writeSysctl(ifname, key string, v int32) error {
	return os.WriteFile(sysctlPath(ifname, key), []byte(strconv.Itoa(int(v))), 0o644)
}

// podSysctls sets what an enrolled pod's veth needs and returns st with the old values
// saved (once: a second Enroll must not save veil's own values as the originals).
//
//   - rp_filter=0: with host capture, hairpinned packets arrive with a local source
//     address whose reverse route is lo, which strict reverse-path filtering rejects.
//     Also kept at 0 without host capture, as the agent's transparent dials make the pod
//     answer to addresses whose reverse route is not this veth.
//   - accept_local=1, only with host capture: the hairpinned packet's source is the
//     node's own address. It lets the pod send packets from node addresses too, so it
//     is not set otherwise.
func podSysctls(ifindex int, st captureIfaceState, captureHost bool) (captureIfaceState, error) {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return st, fmt.Errorf("bpf: interface %d: %w", ifindex, err)
	}
	name := l.Attrs().Name
	if st.Flags&ifSysctl == 0 {
		if st.RpFilter, err = readSysctl(name, "rp_filter"); err != nil {
			return st, fmt.Errorf("bpf: read rp_filter of %s: %w", name, err)
		}
		if st.AcceptLocal, err = readSysctl(name, "accept_local"); err != nil {
			return st, fmt.Errorf("bpf: read accept_local of %s: %w", name, err)
		}
		st.Flags |= ifSysctl
	}
	if err := writeSysctl(name, "rp_filter", 0); err != nil {
		return st, fmt.Errorf("bpf: set rp_filter=0 on %s: %w", name, err)
	}
	accept := st.AcceptLocal
	if captureHost {
		accept = 1
	}
	if err := writeSysctl(name, "accept_local", accept); err != nil {
		return st, fmt.Errorf("bpf: set accept_local=%d on %s: %w", accept, name, err)
	}
	return st, nil
}

// restoreSysctls puts back the values podSysctls saved. A vanished interface has nothing
// left to restore.
func restoreSysctls(ifindex int, st captureIfaceState) error {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return nil
	}
	name := l.Attrs().Name
	var errs []error
	if st.RpFilter >= 0 {
		errs = append(errs, writeSysctl(name, "rp_filter", st.RpFilter))
	}
	if st.AcceptLocal >= 0 {
		errs = append(errs, writeSysctl(name, "accept_local", st.AcceptLocal))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("bpf: restore sysctls of %s: %w", name, err)
	}
	return nil
}
