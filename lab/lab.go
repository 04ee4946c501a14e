package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/policy"
	"golang.org/x/sys/unix"
	"sigs.k8s.io/yaml"
)

// DefaultStateRoot holds each lab's state: /run is tmpfs, gone at reboot with the
// namespaces it describes.
const DefaultStateRoot = "/run/veil-lab"

// Options locate a lab's binaries and state. The zero value means the defaults.
type Options struct {
	// StateRoot is where labs keep their state. Default DefaultStateRoot.
	StateRoot string
	// BinDir holds veil-controller, veil-agent and veilctl. Default the directory of the
	// running program (make build puts them together in bin/).
	BinDir string
	// Log receives progress lines. Default io.Discard.
	Log io.Writer
	// Kube keeps the lab's cluster in a real Kubernetes API server (etcd and a
	// kube-apiserver from `make kube-build`, built on first use) instead of a config
	// directory: the controller reads it with --kubeconfig, and the agents authenticate
	// with service-account tokens bound to their pods, checked by TokenReview.
	Kube bool
	// AgentArgs are appended to every agent's command line that this Lab value starts.
	AgentArgs []string
	// WaypointArgs are appended to every waypoint's command line.
	WaypointArgs []string
}

func (o Options) withDefaults() Options {
	if o.StateRoot == "" {
		o.StateRoot = DefaultStateRoot
	}
	if o.BinDir == "" {
		if exe, err := os.Executable(); err == nil {
			o.BinDir = filepath.Dir(exe)
		}
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	return o
}

// Lab is a running lab: namespaces, a controller, an agent per node, an application in
// every pod. Its methods are safe for concurrent use.
type Lab struct {
	Spec *Spec
	opts Options
	dir  string
	kube *kubeAPI // a kube lab's API server; nil for a config directory
}

func (l *Lab) path(elem ...string) string { return filepath.Join(append([]string{l.dir}, elem...)...) }

// Namespace names: short and recognisable in `ip netns list`.
func (l *Lab) fabricNS() string          { return "veil-" + l.Spec.Name + "-fabric" }
func (l *Lab) nodeNS(node string) string { return "veil-" + l.Spec.Name + "-" + node }
func (l *Lab) podNS(p *PodSpec) string {
	return "veil-" + l.Spec.Name + "-" + p.Namespace + "-" + p.Name
}

// ConfigDir is where the lab's cluster objects and applied policies live; the
// controller watches it and streams it to the agents. A kube lab keeps them in its API
// server instead.
func (l *Lab) ConfigDir() string { return l.path("config") }

func (l *Lab) logf(format string, args ...any) { fmt.Fprintf(l.opts.Log, format+"\n", args...) }

// Up builds and starts a lab. A lab of the same name must not exist. If anything fails,
// what was built is torn down and the error returned. It blocks until every agent is
// ready and every application answers.
func Up(ctx context.Context, spec *Spec, opts Options) (*Lab, error) {
	opts = opts.withDefaults()
	if err := spec.validate(); err != nil {
		return nil, err
	}
	if err := checkFamilies(spec, opts); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("lab: needs root (network namespaces, eBPF, bpffs): run it with sudo, e.g. `sudo make demo`")
	}
	bins := []string{"veil-controller", "veil-agent", "veilctl"}
	if len(spec.waypointPods()) > 0 {
		if opts.Kube {
			return nil, errors.New("lab: waypoint pods are not supported with --kube yet (the lab's kube mode runs no kubelet to run them)")
		}
		bins = append(bins, "veil-waypoint")
	}
	for _, bin := range bins {
		if _, err := os.Stat(filepath.Join(opts.BinDir, bin)); err != nil {
			return nil, fmt.Errorf("lab: %s not found in %s: run `make build` (or pass the directory that holds it)", bin, opts.BinDir)
		}
	}
	for _, tool := range []string{"ip", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("lab: %s is required (apt-get install iproute2 util-linux)", tool)
		}
	}
	if _, err := exec.LookPath("etcd"); opts.Kube && err != nil {
		return nil, errors.New("lab: --kube needs etcd (apt-get install etcd-server)")
	}
	l := &Lab{Spec: spec, opts: opts, dir: filepath.Join(opts.StateRoot, spec.Name)}
	if _, err := os.Stat(l.dir); err == nil {
		return nil, fmt.Errorf("lab %s exists (state in %s): run `veilctl lab down --name %s` first", spec.Name, l.dir, spec.Name)
	}
	if err := l.up(ctx); err != nil {
		return nil, errors.Join(err, Down(spec.Name, opts))
	}
	return l, nil
}

func (l *Lab) up(ctx context.Context) error {
	for _, d := range []string{"config", "cache", "logs", "pids", "tokens", "bpffs"} {
		if err := os.MkdirAll(l.path(d), 0o700); err != nil {
			return err
		}
	}
	specYAML, err := yaml.Marshal(l.Spec)
	if err != nil {
		return err
	}
	if err := os.WriteFile(l.path("spec.yaml"), specYAML, 0o600); err != nil {
		return err
	}
	if !l.opts.Kube {
		if err := os.WriteFile(filepath.Join(l.ConfigDir(), "cluster.yaml"), l.Spec.ClusterYAML(), 0o644); err != nil {
			return err
		}
	}
	if err := unix.Mount("bpf", l.path("bpffs"), "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("lab: mount bpffs at %s: %w", l.path("bpffs"), err)
	}
	l.logf("lab %s: building the network", l.Spec.Name)
	if err := l.buildNetwork(); err != nil {
		return err
	}
	if l.opts.Kube {
		if err := l.startKube(ctx); err != nil {
			return err
		}
	} else if err := l.writeTokens(); err != nil {
		return err
	} else if err := l.writeWorkloadTokens(); err != nil {
		return err
	}
	if len(l.Spec.waypointPods()) > 0 {
		l.logf("lab %s: starting the token issuer (JWKS at %s)", l.Spec.Name, l.JWKSURI())
		if err := l.writeJWKS(); err != nil {
			return err
		}
		if err := l.startJWKS(ctx); err != nil {
			return err
		}
	}
	l.logf("lab %s: starting the controller", l.Spec.Name)
	if err := l.startController(ctx); err != nil {
		return err
	}
	for _, node := range l.Spec.Nodes {
		l.logf("lab %s: starting the agent of %s", l.Spec.Name, node)
		if err := l.StartAgent(ctx, node); err != nil {
			return err
		}
	}
	l.logf("lab %s: starting the applications", l.Spec.Name)
	for i := range l.Spec.Pods {
		if l.Spec.Pods[i].Waypoint != "" {
			continue
		}
		if err := l.startApp(ctx, &l.Spec.Pods[i]); err != nil {
			return err
		}
	}
	for _, p := range l.Spec.waypointPods() {
		l.logf("lab %s: starting the waypoint %s/%s", l.Spec.Name, p.Namespace, p.Waypoint)
		if err := l.startWaypoint(ctx, p); err != nil {
			return err
		}
	}
	return nil
}

// buildNetwork creates the fabric (a bridge), the nodes and the pods, with the routes a
// routed CNI would install, in each of the lab's IP families.
func (l *Lab) buildNetwork() error {
	s := l.Spec
	fab := l.fabricNS()
	cmds := [][]string{{"ip", "netns", "add", fab}}
	cmds = append(cmds, s.netnsSysctls(fab, false)...)
	// No multicast snooping on the bridges: with no MLD querier, it could drop the
	// neighbour solicitations IPv6 needs.
	cmds = append(cmds,
		[]string{"ip", "-n", fab, "link", "set", "lo", "up"},
		[]string{"ip", "-n", fab, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"})
	for _, a := range s.addrsOf(ControllerIP()) {
		cmds = append(cmds, addrAdd(fab, a, prefixLen(a), "br0"))
	}
	cmds = append(cmds, []string{"ip", "-n", fab, "link", "set", "br0", "up"})
	if l.opts.Kube {
		cmds = append(cmds, []string{"ip", "-n", fab, "addr", "add", APIServerIP().String() + "/24", "dev", "br0"})
	}
	for i, node := range s.Nodes {
		ns := l.nodeNS(node)
		fabDev := fmt.Sprintf("n%d", i)
		cmds = append(cmds, []string{"ip", "netns", "add", ns})
		cmds = append(cmds, s.netnsSysctls(ns, true)...)
		cmds = append(cmds,
			[]string{"ip", "-n", ns, "link", "set", "lo", "up"},
			[]string{"ip", "link", "add", fabDev, "netns", fab, "type", "veth", "peer", "name", "eth0", "netns", ns},
			[]string{"ip", "-n", fab, "link", "set", fabDev, "master", "br0", "up"})
		for _, a := range s.NodeIPs(node) {
			cmds = append(cmds, addrAdd(ns, a, prefixLen(a), "eth0"))
		}
		cmds = append(cmds, []string{"ip", "-n", ns, "link", "set", "eth0", "up"})
		switch s.Network {
		case NetworkBridge:
			// cni0 holds the gateway; the node's pods share its /24 (and /64).
			cmds = append(cmds, []string{"ip", "-n", ns, "link", "add", "cni0", "type", "bridge", "mcast_snooping", "0"})
			for _, a := range s.addrsOf(s.gateway(node)) {
				cmds = append(cmds, addrAdd(ns, a, prefixLen(a), "cni0"))
			}
			cmds = append(cmds, []string{"ip", "-n", ns, "link", "set", "cni0", "up"})
		case NetworkOverlay:
			// vxlan0 carries pod traffic between nodes, encapsulated on the fabric (over
			// the nodes' primary family; the inner packets are of either).
			cmds = append(cmds, []string{"ip", "-n", ns, "link", "add", "vxlan0", "type", "vxlan", "id", "42", "dstport", "4789",
				"local", s.NodeIP(node).String(), "dev", "eth0", "nolearning"})
			for _, a := range s.overlayIPs(node) {
				cmds = append(cmds, addrAdd(ns, a, prefixLen(a), "vxlan0"))
			}
			cmds = append(cmds, []string{"ip", "-n", ns, "link", "set", "vxlan0", "up"})
		}
		for _, other := range s.Nodes {
			if other == node {
				continue
			}
			if s.Network == NetworkOverlay {
				cmds = append(cmds, []string{"bridge", "-n", ns, "fdb", "append", "00:00:00:00:00:00", "dev", "vxlan0", "dst", s.NodeIP(other).String()})
			}
			vias := s.NodeIPs(other)
			if s.Network == NetworkOverlay {
				vias = s.overlayIPs(other)
			}
			for _, via := range vias {
				// The other node's pod range: 10.100.j.0/24, fd00:100:j::/64.
				gw, _ := inFamily(s.addrsOf(s.gateway(other)), familyOf(via))
				cidr := netip.PrefixFrom(gw, prefixLen(gw)).Masked().String()
				cmds = append(cmds, []string{"ip", "-n", ns, "route", "add", cidr, "via", via.String()})
			}
		}
	}
	cmds = append(cmds, l.fabricPodRoutes()...)
	podOnNode := map[string]int{}
	for i := range s.Pods {
		p := &s.Pods[i]
		ns, node := l.podNS(p), l.nodeNS(p.Node)
		hostDev := fmt.Sprintf("vp%d", podOnNode[p.Node])
		podOnNode[p.Node]++
		cmds = append(cmds, []string{"ip", "netns", "add", ns})
		cmds = append(cmds, s.netnsSysctls(ns, false)...)
		cmds = append(cmds,
			[]string{"ip", "-n", ns, "link", "set", "lo", "up"},
			[]string{"ip", "link", "add", hostDev, "netns", node, "type", "veth", "peer", "name", "eth0", "netns", ns})
		if s.Network == NetworkBridge {
			for _, a := range s.PodIPs(p) {
				cmds = append(cmds, addrAdd(ns, a, prefixLen(a), "eth0"))
			}
			cmds = append(cmds, []string{"ip", "-n", ns, "link", "set", "eth0", "up"})
			if s.has4() {
				cmds = append(cmds, []string{"ip", "-n", ns, "route", "add", "default", "via", s.gateway(p.Node).String()})
			}
			if s.has6() {
				cmds = append(cmds, []string{"ip", "-n", ns, "-6", "route", "add", "default", "via", s.gateway6(p.Node).String()})
			}
			cmds = append(cmds, []string{"ip", "-n", node, "link", "set", hostDev, "master", "cni0", "up"})
			continue
		}
		// Routed: the pod's address is a host route behind its veth. IPv4 reaches the
		// node through a /32 gateway on the node side of every veth; IPv6 through a
		// link-local one (fe80::1), as a routed CNI's IPv6 does.
		for _, a := range s.PodIPs(p) {
			cmds = append(cmds, addrAdd(ns, a, a.BitLen(), "eth0"))
		}
		cmds = append(cmds, []string{"ip", "-n", ns, "link", "set", "eth0", "up"})
		if s.has4() {
			gw := s.gateway(p.Node).String()
			cmds = append(cmds,
				[]string{"ip", "-n", ns, "route", "add", gw, "dev", "eth0"},
				[]string{"ip", "-n", ns, "route", "add", "default", "via", gw},
				[]string{"ip", "-n", node, "addr", "add", gw + "/32", "dev", hostDev})
		}
		if s.has6() {
			gw := s.gateway6(p.Node)
			cmds = append(cmds,
				[]string{"ip", "-n", ns, "-6", "route", "add", "default", "via", gw.String(), "dev", "eth0"},
				addrAdd(node, gw, 64, hostDev))
		}
		cmds = append(cmds, []string{"ip", "-n", node, "link", "set", hostDev, "up"})
		for _, a := range s.PodIPs(p) {
			cmds = append(cmds, []string{"ip", "-n", node, "route", "add", hostLen(a), "dev", hostDev})
		}
	}
	for _, c := range cmds {
		if err := sh(c...); err != nil {
			return fmt.Errorf("lab: %w", err)
		}
	}
	return nil
}

func (l *Lab) writeTokens() error {
	var b strings.Builder
	for _, node := range l.Spec.Nodes {
		t := make([]byte, 24)
		rand.Read(t)
		tok := hex.EncodeToString(t)
		fmt.Fprintf(&b, "%s: %s\n", node, tok)
		if err := os.WriteFile(l.path("tokens", node), []byte(tok+"\n"), 0o600); err != nil {
			return err
		}
	}
	return os.WriteFile(l.path("tokens.yaml"), []byte(b.String()), 0o600)
}

// start runs a program in a namespace, detached from veilctl, logging to logs/<name>.log.
func (l *Lab) start(name, ns string, argv ...string) error {
	logf, err := os.OpenFile(l.path("logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, "--"}, argv...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("lab: start %s: %w", name, err)
	}
	pid := cmd.Process.Pid
	// Reaped when it ends, so a long-lived caller (the tests) sees it gone; a veilctl
	// that exits first leaves it to init.
	go cmd.Wait()
	return os.WriteFile(l.path("pids", name+".pid"), []byte(strconv.Itoa(pid)+"\n"), 0o600)
}

func (l *Lab) bin(name string) string { return filepath.Join(l.opts.BinDir, name) }

// startController runs the controller with the lab's CA, reading the config directory
// and the nodes' bootstrap tokens, or in a kube lab the API server, with TokenReview.
func (l *Lab) startController(ctx context.Context) error {
	argv := []string{l.bin("veil-controller"), "--ca-dir", l.path("ca"),
		"--listen", net.JoinHostPort(l.Spec.controllerIP().String(), "15012"), "--server-name", "veil-controller"}
	if l.kube != nil {
		// The lab runs no kubelet: the waypoints it declares are its own, not deployed.
		argv = append(argv, "--kubeconfig", l.controllerKubeconfig(), "--agent-service-account", agentSA, "--waypoint-deploy=false")
	} else {
		argv = append(argv, "--node-tokens", l.path("tokens.yaml"), "--config-dir", l.ConfigDir(),
			"--workload-tokens", l.path("workload-tokens.yaml"))
	}
	if err := l.start("controller", l.fabricNS(), argv...); err != nil {
		return err
	}
	return l.waitFor(ctx, "the controller", func(ctx context.Context) error {
		if _, err := os.Stat(l.path("ca", identity.RootCertFile)); err != nil {
			return err
		}
		c, err := dialIn(ctx, l.fabricNS(), net.JoinHostPort(l.Spec.controllerIP().String(), "15012"))
		if err == nil {
			c.Close()
		}
		return err
	}, "controller")
}

// AgentDrainGrace is how long a lab agent that is stopped or replaced lets the
// connections it holds finish (veil-agent --drain-grace; a DaemonSet uses 29 s).
const AgentDrainGrace = 2 * time.Second

// StartAgent starts (or restarts) a node's agent and waits until it is ready: a config
// in force and its pods' certificates loaded. A running agent of the node hands its
// listeners over to the new one and drains.
func (l *Lab) StartAgent(ctx context.Context, node string) error {
	return l.startAgent(ctx, node, false)
}

// CNISocket is where a node's agent serves veil-cni (veil-agent --cni-socket).
func (l *Lab) CNISocket(node string) string { return l.path("run", node, "cni.sock") }

// StartAgentCached starts a node's agent while the controller is away: it waits until
// the agent enforces its cached config, not for certificates, which need the CA.
func (l *Lab) StartAgentCached(ctx context.Context, node string) error {
	return l.startAgent(ctx, node, true)
}

func (l *Lab) startAgent(ctx context.Context, node string, cached bool) error {
	argv := []string{l.bin("veil-agent"),
		"--node", node, "--config-cache", l.path("cache", node+".config"),
		"--ca-addr", net.JoinHostPort(l.Spec.controllerIP().String(), "15012"), "--ca-server-name", "veil-controller",
		"--ca-root", l.path("ca", identity.RootCertFile), "--token-file", l.path("tokens", node),
		"--uplink", "eth0", "--pin-dir", l.path("bpffs", node),
		"--handover-dir", l.path("run", node), "--drain-grace", AgentDrainGrace.String(),
		"--cni-socket", l.CNISocket(node)}
	if l.Spec.Network == NetworkOverlay {
		argv = append(argv, "--uplink", "vxlan0")
	}
	err := l.start("agent-"+node, l.nodeNS(node), append(argv, l.opts.AgentArgs...)...)
	if err != nil {
		return err
	}
	pid, err := l.pid("agent-" + node)
	if err != nil {
		return err
	}
	want := []byte(fmt.Sprintf("ready (pid %d)", pid))
	certs := []byte(fmt.Sprintf("waiting (pid %d): waiting for certificates", pid))
	return l.waitFor(ctx, "the agent of "+node, func(ctx context.Context) error {
		body, err := l.NodeGet(ctx, node, "127.0.0.1:15021", "/healthz/ready")
		if cached && bytes.HasPrefix(body, certs) {
			return nil
		}
		if err == nil && !bytes.Contains(body, want) {
			err = fmt.Errorf("not ready: %q", bytes.TrimSpace(body))
		}
		if err != nil && len(body) > 0 {
			err = fmt.Errorf("%w: %s", err, bytes.TrimSpace(body))
		}
		return err
	}, "agent-"+node)
}

// RestartAgent replaces a node's agent as a DaemonSet rolling update does: a new agent
// starts beside the running one (same flags), takes its listening sockets over and
// becomes ready; then the old one gets SIGTERM, drains what it holds for the grace
// period and exits. Not a connection is refused. With kill, the old agent is killed
// (SIGKILL, as a crash) before the new one starts: the pinned capture fails closed
// meanwhile.
func (l *Lab) RestartAgent(ctx context.Context, node string, kill bool) error {
	if kill {
		if err := l.StopAgent(node); err != nil {
			return err
		}
		return l.StartAgent(ctx, node)
	}
	old, err := l.pid("agent-" + node)
	if err != nil {
		return err
	}
	if err := l.StartAgent(ctx, node); err != nil {
		return err
	}
	if err := syscall.Kill(old, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	deadline := time.Now().Add(AgentDrainGrace + 10*time.Second)
	for syscall.Kill(old, 0) == nil {
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: the old agent of %s (pid %d) did not exit after draining", node, old)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

func (l *Lab) pid(name string) (int, error) {
	b, err := os.ReadFile(l.path("pids", name+".pid"))
	if err != nil {
		return 0, fmt.Errorf("lab: %s is not running: %w", name, err)
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// TerminateAgent stops a node's agent as the kubelet does (SIGTERM): it drains and
// exits; whether it removes the capture is its --uninstall flag's call.
func (l *Lab) TerminateAgent(node string) error { return l.kill("agent-"+node, syscall.SIGTERM) }

// StopAgent kills a node's agent (SIGKILL: as a crash would). Its capture stays pinned.
func (l *Lab) StopAgent(node string) error { return l.kill("agent-"+node, syscall.SIGKILL) }

// StopController kills the controller.
func (l *Lab) StopController() error { return l.kill("controller", syscall.SIGKILL) }

// RestartController starts the controller again with the same CA.
func (l *Lab) RestartController(ctx context.Context) error { return l.startController(ctx) }

func (l *Lab) kill(name string, sig syscall.Signal) error {
	b, err := os.ReadFile(l.path("pids", name+".pid"))
	if err != nil {
		return fmt.Errorf("lab: %s is not running: %w", name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return err
	}
	if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	for range 100 {
		if syscall.Kill(pid, 0) != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return os.Remove(l.path("pids", name+".pid"))
}

func (l *Lab) startApp(ctx context.Context, p *PodSpec) error {
	argv := []string{l.bin("veilctl"), "lab", "app", "--name", p.Namespace + "/" + p.Name}
	for _, port := range p.Ports {
		argv = append(argv, "--listen", ":"+strconv.Itoa(int(port)))
	}
	if err := l.start("app-"+p.Namespace+"-"+p.Name, l.podNS(p), argv...); err != nil {
		return err
	}
	return l.waitFor(ctx, "the application of "+p.Name, func(ctx context.Context) error {
		for _, ip := range l.Spec.PodIPs(p) { // each family
			c, err := dialIn(ctx, l.podNS(p), net.JoinHostPort(ip.String(), strconv.Itoa(int(p.Ports[0]))))
			if err != nil {
				return err
			}
			c.Close()
		}
		return nil
	}, "app-"+p.Namespace+"-"+p.Name)
}

// waitFor polls check for up to 30s; on failure it names the process whose log to read.
func (l *Lab) waitFor(ctx context.Context, what string, check func(context.Context) error, proc string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var err error
	for {
		cctx, ccancel := context.WithTimeout(ctx, time.Second)
		err = check(cctx)
		ccancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			tail, _ := os.ReadFile(l.path("logs", proc+".log"))
			if len(tail) > 2000 {
				tail = tail[len(tail)-2000:]
			}
			return fmt.Errorf("lab: %s did not come up: %v\nlast lines of %s:\n%s", what, err, l.path("logs", proc+".log"), tail)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// NodeGet fetches http://addr/path from inside a node's namespace: the agent's admin
// (127.0.0.1:15000), readiness (:15021) and metrics (:15020) endpoints.
func (l *Lab) NodeGet(ctx context.Context, node, addr, path string) ([]byte, error) {
	ns := l.nodeNS(node)
	client := &http.Client{Transport: &http.Transport{
		DialContext:       func(ctx context.Context, _, a string) (net.Conn, error) { return dialIn(ctx, ns, a) },
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("%s%s: %s", addr, path, resp.Status)
	}
	return body, err
}

// DialFrom opens a TCP connection from inside a pod, as its application would.
func (l *Lab) DialFrom(ctx context.Context, pod, addr string) (net.Conn, error) {
	p, err := l.Spec.Pod(pod)
	if err != nil {
		return nil, err
	}
	return dialIn(ctx, l.podNS(p), addr)
}

// Exec runs argv inside a pod's network namespace with the given standard streams.
func (l *Lab) Exec(ctx context.Context, pod string, argv []string, stdin io.Reader, stdout, stderr io.Writer) error {
	p, err := l.Spec.Pod(pod)
	if err != nil {
		return err
	}
	if len(argv) == 0 {
		return errors.New("lab exec: no command")
	}
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=/run/netns/" + l.podNS(p), "--"}, argv...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, stdout, stderr
	return cmd.Run()
}

// Apply validates the security.istio.io objects in data as Istio's admission webhook
// would and, if all are valid, adds them to the lab's config under name: a file of the
// config directory or, in a kube lab, every object of data applied server-side to the
// API server. An invalid object rejects the whole file with an error naming it and its
// field; what is in force stays in force.
func (l *Lab) Apply(name string, data []byte) error {
	man := policy.Parse(name, data)
	errs := append([]error(nil), man.Errors...)
	for _, o := range man.Objects {
		if _, err := policy.Validate(o, policy.Options{}); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("lab apply: rejected, nothing changed:\n%w", errors.Join(errs...))
	}
	if len(man.Objects) == 0 {
		return fmt.Errorf("lab apply: %s holds no security.istio.io object", name)
	}
	if l.kube != nil {
		return l.kubeApply(name, data)
	}
	// Atomically: the controller polls the directory, and a half-written file would read
	// as a change.
	return identity.WriteFileAtomic(filepath.Join(l.ConfigDir(), configName(name)), data, 0o644)
}

// Delete removes a file applied under name (in a kube lab, deletes its objects).
func (l *Lab) Delete(name string) error {
	if l.kube != nil {
		return l.kubeDelete(name)
	}
	err := os.Remove(filepath.Join(l.ConfigDir(), configName(name)))
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("lab delete: %s was not applied", name)
	}
	return err
}

func configName(name string) string {
	base := strings.TrimSuffix(filepath.Base(name), filepath.Ext(name))
	return "applied-" + base + ".yaml"
}

// Open returns a running lab by name.
func Open(name string, opts Options) (*Lab, error) {
	if err := CheckName(name); err != nil {
		return nil, err
	}
	opts = opts.withDefaults()
	dir := filepath.Join(opts.StateRoot, name)
	b, err := os.ReadFile(filepath.Join(dir, "spec.yaml"))
	if err != nil {
		return nil, fmt.Errorf("lab %s is not up (%w)", name, err)
	}
	spec, err := ParseSpec(b)
	if err != nil {
		return nil, err
	}
	l := &Lab{Spec: spec, opts: opts, dir: dir}
	if err := l.openKube(); err != nil {
		return nil, err
	}
	return l, nil
}

// Status describes a lab: its namespaces, processes and pods.
func (l *Lab) Status() string {
	var b strings.Builder
	fmt.Fprintf(&b, "lab %s (state in %s)\n", l.Spec.Name, l.dir)
	procs, _ := os.ReadDir(l.path("pids"))
	names := make([]string, 0, len(procs))
	for _, p := range procs {
		names = append(names, strings.TrimSuffix(p.Name(), ".pid"))
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(&b, "  %-32s %s\n", n, procState(l.path("pids", n+".pid")))
	}
	if l.kube != nil {
		b.WriteString(l.kubeStatus())
	}
	for _, node := range l.Spec.sortedNodes() {
		fmt.Fprintf(&b, "node %s %s\n", node, joinAddrs(l.Spec.NodeIPs(node)))
		for i := range l.Spec.Pods {
			p := &l.Spec.Pods[i]
			if p.Node == node {
				fmt.Fprintf(&b, "  pod %-24s %s ports %v\n", p.Namespace+"/"+p.Name, joinAddrs(l.Spec.PodIPs(p)), p.Ports)
			}
		}
	}
	for i, svc := range l.Spec.Services {
		var vips []string
		for _, a := range l.Spec.ServiceIPs(i) {
			vips = append(vips, net.JoinHostPort(a.String(), strconv.Itoa(int(svc.Port))))
		}
		fmt.Fprintf(&b, "service %s/%s %s\n", svc.Namespace, svc.Name, strings.Join(vips, " "))
	}
	return b.String()
}

// Down removes a lab: its processes, capture, bpffs mount, namespaces and state. It
// works from the namespaces' names alone, so it also cleans up after a crash, and it
// is idempotent.
func Down(name string, opts Options) error {
	if err := CheckName(name); err != nil {
		return err
	}
	opts = opts.withDefaults()
	dir := filepath.Join(opts.StateRoot, name)
	prefix := "veil-" + name + "-"
	all, err := netnsList()
	if err != nil {
		return err
	}
	var mine []string
	for _, n := range all {
		if strings.HasPrefix(n, prefix) {
			mine = append(mine, n)
		}
	}
	// Processes first, politely then firmly; never this one, whose threads may visit.
	self := os.Getpid()
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		alive := false
		for _, n := range mine {
			for _, p := range netnsPids(n) {
				if pid, err := strconv.Atoi(p); err == nil && pid != self {
					syscall.Kill(pid, sig)
					alive = true
				}
			}
		}
		if !alive {
			break
		}
		for range 50 {
			left := 0
			for _, n := range mine {
				for _, p := range netnsPids(n) {
					if p != strconv.Itoa(self) {
						left++
					}
				}
			}
			if left == 0 {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	var errs []error
	// The capture's pins: uninstall from each node namespace, then drop the mount.
	if entries, err := os.ReadDir(filepath.Join(dir, "bpffs")); err == nil {
		agentBin := filepath.Join(opts.BinDir, "veil-agent")
		for _, e := range entries {
			ns := prefix + e.Name()
			if _, err := os.Stat(agentBin); err == nil && contains(mine, ns) {
				if err := sh("nsenter", "--net=/run/netns/"+ns, "--", agentBin, "uninstall", "--pin-dir", filepath.Join(dir, "bpffs", e.Name())); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	if err := unix.Unmount(filepath.Join(dir, "bpffs"), unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("lab: unmount bpffs: %w", err))
	}
	for _, n := range mine {
		if err := sh("ip", "netns", "del", n); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// procState says whether the process of a pid file runs.
func procState(pidFile string) string {
	raw, err := os.ReadFile(pidFile)
	if err != nil {
		return "unknown"
	}
	if pid, _ := strconv.Atoi(strings.TrimSpace(string(raw))); pid <= 0 || syscall.Kill(pid, 0) != nil {
		return "dead"
	}
	return "running"
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
