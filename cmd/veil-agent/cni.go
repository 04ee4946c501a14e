package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/veilmesh/veil/agent"
	"github.com/veilmesh/veil/internal/cniconf"
	"github.com/veilmesh/veil/internal/removal"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// cniOptions are the agent's flags for the veil-cni plugin.
type cniOptions struct {
	socket      string // the plugin's unix socket; "" serves none
	confDir     string // the node's CNI configuration directory, as mounted here; "" installs nothing
	binDir      string // the node's CNI binary directory, as mounted here
	hostConfDir string // confDir as the node (and so the plugin) sees it
	kubeconfig  string // a kubeconfig for the plugin, as the node sees it; "" writes one from the in-cluster account
	uninstall   string // auto, always or never: remove veil-cni and the capture when stopping without a successor
	daemonSet   string // the agents' DaemonSet, for uninstall=auto
}

// serveCNISocket serves the plugin's requests on a root-only unix socket. The socket
// is not unlinked on close: after a handover the path is the successor's.
func serveCNISocket(a *agent.Agent, path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("--cni-socket: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("--cni-socket: %w", err)
	}
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("--cni-socket: %w", err)
	}
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("--cni-socket: %w", err)
	}
	go a.ServeCNI(l)
	return l, nil
}

// installCNI keeps veil-cni chained in the node's CNI configuration until ctx ends: it
// copies the binary, keeps the plugin's kubeconfig current (the service-account token
// rotates) and puts the entry back when the primary CNI rewrites its file.
func installCNI(ctx context.Context, o cniOptions, log *slog.Logger) error {
	if o.binDir != "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("--cni-bin-dir: %w", err)
		}
		if err := cniconf.CopyBinary(filepath.Join(filepath.Dir(exe), cniconf.PluginType), o.binDir); err != nil {
			return fmt.Errorf("--cni-bin-dir %s: %w", o.binDir, err)
		}
	}
	kubeconfig := o.kubeconfig
	var refresh func() error
	if kubeconfig == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return fmt.Errorf("--cni-conf-dir without --cni-kubeconfig needs the in-cluster service account: %w", err)
		}
		kubeconfig = filepath.Join(o.hostConfDir, "veil-cni.kubeconfig")
		local := filepath.Join(o.confDir, "veil-cni.kubeconfig")
		var last []byte
		refresh = func() error {
			ca, err := os.ReadFile(cfg.TLSClientConfig.CAFile)
			if err != nil {
				return err
			}
			token, err := os.ReadFile(cfg.BearerTokenFile)
			if err != nil {
				return err
			}
			b := cniconf.Kubeconfig(cfg.Host, ca, string(bytes.TrimSpace(token)))
			if bytes.Equal(b, last) {
				return nil
			}
			if err := cniconf.WriteFileAtomic(local, b, 0o600); err != nil {
				return err
			}
			last = b
			return nil
		}
		if err := refresh(); err != nil {
			return fmt.Errorf("the plugin's kubeconfig: %w", err)
		}
	}
	entry := map[string]any{"type": cniconf.PluginType, "agentSocket": o.socket, "kubeconfig": kubeconfig}
	ensure := func() {
		if refresh != nil {
			if err := refresh(); err != nil {
				log.Error("cni: cannot refresh the plugin's kubeconfig", "err", err)
			}
		}
		path, changed, err := cniconf.Ensure(o.confDir, entry)
		switch {
		case err != nil:
			log.Error("cni: cannot chain veil-cni into the node's CNI configuration; new mesh pods start uncaptured until it is", "dir", o.confDir, "err", err)
		case path == "":
			log.Warn("cni: no CNI configuration yet; waiting for the node's CNI to write one", "dir", o.confDir)
		case changed:
			log.Info("cni: veil-cni chained into the node's CNI configuration", "file", path)
		}
	}
	ensure()
	// A change in the directory (the primary CNI rewriting its file) puts the entry back
	// at once; the ticker is the fallback, and refreshes the kubeconfig.
	changes, err := watchDir(ctx, o.confDir)
	if err != nil {
		log.Warn("cni: cannot watch the CNI configuration directory; checking it every 5 s", "dir", o.confDir, "err", err)
	}
	go func() {
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			case <-changes:
			}
			ensure()
		}
	}()
	return nil
}

// watchDir sends on the returned channel (coalesced) whenever a file of dir is written,
// created, renamed or removed, until ctx ends.
func watchDir(ctx context.Context, dir string) (<-chan struct{}, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK) // non-blocking: the runtime poller reads it, and Close ends the read
	if err != nil {
		return nil, err
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CLOSE_WRITE|unix.IN_CREATE|unix.IN_MOVED_TO|unix.IN_MOVED_FROM|unix.IN_DELETE); err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "inotify")
	ch := make(chan struct{}, 1)
	go func() { <-ctx.Done(); f.Close() }()
	go func() {
		buf := make([]byte, 64<<10)
		for {
			if _, err := f.Read(buf); err != nil {
				return
			}
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}()
	return ch, nil
}

// watchUninstall starts following the agents' DaemonSet in this pod's namespace.
// Outside a cluster it returns nil.
func watchUninstall(ctx context.Context, name string, log *slog.Logger) *removal.Watch {
	cfg, err := rest.InClusterConfig()
	if err != nil {
		log.Info("not in a cluster; the agents' DaemonSet is not followed", "err", err)
		return nil
	}
	ns, err := os.ReadFile("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
	if err != nil {
		log.Warn("the pod's namespace is unknown; the agents' DaemonSet is not followed", "err", err)
		return nil
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		log.Warn("the agents' DaemonSet is not followed", "err", err)
		return nil
	}
	return removal.Start(ctx, client, string(bytes.TrimSpace(ns)), name)
}

// uninstalling decides, for an agent stopping without a successor, whether the agents
// are being removed (--uninstall): always, never, or (auto) when their DaemonSet is
// deleted or being deleted, as the watch saw it or the API server says now. When it
// cannot tell (or runs outside a cluster), the answer is no: a node whose agent merely stopped keeps veil-cni and the
// capture, and mesh pods wait for the next agent rather than run outside the mesh.
func uninstalling(o cniOptions, w *removal.Watch, log *slog.Logger) bool {
	switch o.uninstall {
	case "always":
		return true
	case "never":
		return false
	}
	if w == nil {
		return false
	}
	gone, err := w.Removing(context.Background())
	if err != nil {
		log.Warn("cannot tell whether the agents are being uninstalled; keeping veil-cni and the capture", "err", err)
	}
	return gone
}

// uninstallCNI takes veil-cni out of the node's CNI configuration.
func uninstallCNI(o cniOptions, log *slog.Logger) {
	changed, err := cniconf.Remove(o.confDir)
	if err != nil {
		log.Error("cni: cannot remove veil-cni from the node's CNI configuration", "dir", o.confDir, "err", err)
	}
	for _, f := range changed {
		log.Info("cni: veil-cni removed from the node's CNI configuration", "file", f)
	}
}
