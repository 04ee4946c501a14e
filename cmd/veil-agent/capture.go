package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/veilmesh/veil/bpf"
	"github.com/vishvananda/netlink"
)

type listFlag []string

func (l *listFlag) String() string     { return fmt.Sprint(*l) }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

// defaultUplinks returns the interfaces of the node's default routes (IPv4 and IPv6).
func defaultUplinks() ([]string, error) {
	var names []string
	seen := map[int]bool{}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteListFiltered(family, &netlink.Route{Dst: nil}, netlink.RT_FILTER_DST)
		if err != nil {
			return nil, fmt.Errorf("list routes: %w", err)
		}
		for _, r := range routes {
			if r.LinkIndex <= 0 || seen[r.LinkIndex] {
				continue
			}
			l, err := netlink.LinkByIndex(r.LinkIndex)
			if err != nil {
				continue
			}
			seen[r.LinkIndex] = true
			names = append(names, l.Attrs().Name)
		}
	}
	if len(names) == 0 {
		return nil, errors.New("the node has no default route to find its uplink by")
	}
	return names, nil
}

// uninstall removes everything the capture installed on the node.
func uninstall(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("veil-agent uninstall", flag.ContinueOnError)
	fs.SetOutput(stderr)
	pinDir := fs.String("pin-dir", bpf.DefaultPinDir, "bpffs directory the capture was pinned in")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := bpf.Uninstall(*pinDir); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "veil-agent: capture uninstalled from", *pinDir)
	return nil
}

// checkNoZtunnel refuses to capture on a node where Istio's ztunnel already does: both act
// on pods labelled istio.io/dataplane-mode=ambient, and two captures of one pod's
// traffic would each break the other's. istio-cni hands pods to ztunnel over a unix
// socket; a live listener there means ztunnel runs on this node.
func checkNoZtunnel(sock string) error {
	if sock == "" {
		return nil
	}
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return nil // nothing serves it: no ztunnel here
	}
	c.Close()
	return fmt.Errorf("Istio's ztunnel captures this node's ambient pods (it serves %s): veil and ztunnel both act on istio.io/dataplane-mode=ambient and cannot share a node; remove ztunnel from this node, or run veil elsewhere (--ztunnel-socket \"\" skips this check)", sock)
}
