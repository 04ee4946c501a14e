//go:build linux

package bpf

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// inNetNS runs fn on a thread in network namespace ns: interface indexes, netlink, sysctls
// and TCX attachment all resolve in the calling thread's namespace. The agent runs in the
// host namespace, where this is a plain call; tests load capture in their own namespaces.
func inNetNS(ns netns.NsHandle, fn func() error) error {
	runtime.LockOSThread()
	cur, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("bpf: current network namespace: %w", err)
	}
	defer cur.Close()
	if cur.Equal(ns) {
		defer runtime.UnlockOSThread()
		return fn()
	}
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("bpf: enter network namespace: %w", err)
	}
	defer func() {
		// A thread that cannot go back stays locked and dies with its goroutine.
		if netns.Set(cur) == nil {
			runtime.UnlockOSThread()
		}
	}()
	return fn()
}
