// Command veil-agent is veil's node agent: it proxies the node's enrolled pods'
// connections over HBONE with mutual TLS, enforces PeerAuthentication and L4
// AuthorizationPolicy, and exports Istio's TCP metrics.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/agent"
	"github.com/veilmesh/veil/bpf"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/handover"
	"github.com/veilmesh/veil/internal/removal"
	"github.com/veilmesh/veil/policy"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "veil-agent:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "uninstall" {
		return uninstall(args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("veil-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	hostname, _ := os.Hostname()
	if n := os.Getenv("NODE_NAME"); n != "" {
		hostname = n
	}
	var (
		node          = fs.String("node", hostname, "name of this node, as in the pods' spec.nodeName (default $NODE_NAME, else the hostname)")
		configCache   = fs.String("config-cache", "/var/lib/veil/config.cache", "file holding the last good config from the controller, enforced at start until the controller answers; empty disables")
		caAddr        = fs.String("ca-addr", "", "address of the CA (veil-controller, or istiod), host:port (required)")
		caServerName  = fs.String("ca-server-name", "veil-controller", "name in the CA's TLS certificate")
		caRoot        = fs.String("ca-root", "", "PEM file of the trust bundle: the roots that sign the CA's TLS certificate and the mesh's certificates, e.g. the controller's root-cert.pem, in Kubernetes the ConfigMap it publishes (required). Read again every --ca-root-check-interval: a root is trusted while this file or the CA's latest answer names it")
		caRootCheck   = fs.Duration("ca-root-check-interval", 5*time.Second, "how often --ca-root is read again (a root rotation); 0 disables")
		tokenFile     = fs.String("token-file", "", "file holding this agent's token, read at every call: its projected service-account token (audience istio-ca) in Kubernetes, or the node's bootstrap token (required)")
		trustDomain   = fs.String("trust-domain", identity.DefaultTrustDomain, "trust domain of the mesh")
		rootNamespace = fs.String("root-namespace", policy.DefaultRootNamespace, "Istio root namespace: its selector-less policies apply mesh-wide")
		certTTL       = fs.Duration("cert-ttl", identity.DefaultMaxTTL, "lifetime asked of the CA for workload certificates")
		outboundAddr  = fs.String("outbound-addr", "[::]:15001", "listener for connections captured from enrolled pods")
		plaintextAddr = fs.String("plaintext-addr", "[::]:15006", "listener for plaintext connections captured on their way to enrolled pods")
		hboneAddr     = fs.String("hbone-addr", "[::]:15008", "HBONE listener")
		metricsAddr   = fs.String("metrics-addr", ":15020", "Prometheus metrics (/metrics); empty disables")
		readyAddr     = fs.String("ready-addr", ":15021", "readiness (/healthz/ready); empty disables")
		adminAddr     = fs.String("admin-addr", "localhost:15000", "admin endpoints (/certs, /config_dump, /debug/pprof); keep it on localhost; empty disables")
		mark          = fs.Int("mark", agent.DefaultMark, "SO_MARK of the agent's sockets; the capture lets packets with it through")
		capture       = fs.Bool("capture", true, "load the eBPF capture that hands enrolled pods' connections to the agent")
		pinDir        = fs.String("pin-dir", bpf.DefaultPinDir, "bpffs directory where the capture's maps and links are pinned (they survive agent restarts)")
		captureHost   = fs.Bool("capture-host", false, "also capture connections the node itself opens to enrolled pods (kubelet probes from 169.254.7.127 stay exempt)")
		failOpen      = fs.Bool("fail-open", false, "while no agent listens, let enrolled pods' traffic through in plaintext instead of dropping it")
		uplinks       listFlag
		logLevel      = fs.String("log-level", "info", "debug, info, warn or error")
		handoverDir   = fs.String("handover-dir", "/var/run/veil", "directory (root only) of the unix socket through which a new agent takes the running one's listeners over")
		ztunnelSocket = fs.String("ztunnel-socket", "/var/run/ztunnel/ztunnel.sock", "the socket through which Istio's CNI hands pods to ztunnel: when something serves it, ztunnel captures this node's ambient pods and veil refuses to capture them too; empty skips the check")
		placement     = fs.String("policy-placement", "veil", "where the policies that select a workload are enforced for traffic a waypoint carries: veil (at the waypoint too; this agent skips them only for connections from a waypoint serving the workload, and refuses in-mesh connections to a workload bound to a waypoint that bypass it) or istio (Istio's placement: this agent applies its L4 policies to the waypoint's identity). Waypoints and agents must agree")
		allowBypass   = fs.Bool("allow-waypoint-bypass", false, "with --policy-placement=veil, accept in-mesh connections to a workload bound to a waypoint that did not come through it (Istio's behaviour)")
		drainGrace    = fs.Duration("drain-grace", 29*time.Second, "how long a stopping or replaced agent lets the connections it holds finish (the DaemonSet's grace period minus 1s)")
		cni           cniOptions
	)
	fs.StringVar(&cni.socket, "cni-socket", "", "root-only unix socket on which veil-cni hands new pods to this agent before their network comes up (e.g. /var/run/veil/cni.sock); empty serves none")
	fs.StringVar(&cni.confDir, "cni-conf-dir", "", "the node's CNI configuration directory as mounted here (e.g. /host/etc/cni/net.d): veil-cni is chained into its first configuration and kept there; empty installs nothing")
	fs.StringVar(&cni.binDir, "cni-bin-dir", "", "the node's CNI binary directory as mounted here (e.g. /host/opt/cni/bin): veil-cni, found beside this binary, is copied there")
	fs.StringVar(&cni.hostConfDir, "cni-host-conf-dir", "/etc/cni/net.d", "--cni-conf-dir as the node sees it (the plugin's kubeconfig is named by that path)")
	fs.StringVar(&cni.kubeconfig, "cni-kubeconfig", "", "kubeconfig the plugin reads pods and namespaces with, as the node sees it; empty: one written into --cni-conf-dir from this pod's service account and kept fresh")
	fs.StringVar(&cni.uninstall, "uninstall", "auto", "when stopping without a successor, remove veil-cni from the CNI configuration and the capture from the node (after the drain): auto (when the agents' DaemonSet is deleted), always, never")
	fs.StringVar(&cni.daemonSet, "daemonset", "veil-agent", "the agents' DaemonSet in this pod's namespace (for --uninstall=auto)")
	fs.Var(&uplinks, "uplink", "interface through which other nodes' traffic arrives; repeatable (default: the interfaces of the default routes)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var missing []string
	for name, v := range map[string]string{"--ca-addr": *caAddr, "--ca-root": *caRoot, "--token-file": *tokenFile, "--node": *node} {
		if v == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("required: %s", strings.Join(missing, ", "))
	}
	switch {
	case cni.uninstall != "auto" && cni.uninstall != "always" && cni.uninstall != "never":
		return fmt.Errorf("--uninstall %q: must be auto, always or never", cni.uninstall)
	case cni.confDir != "" && cni.socket == "":
		return errors.New("--cni-conf-dir needs --cni-socket: the plugin it installs talks to the agent there")
	case cni.socket != "" && !*capture:
		return errors.New("--cni-socket needs the capture (--capture=false cannot enroll pods)")
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})).With("node", *node)
	td, err := spiffeid.TrustDomainFromString(*trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain %q: %w", *trustDomain, err)
	}
	pl, err := policy.ParsePlacement(*placement)
	if err != nil {
		return fmt.Errorf("--policy-placement: %w", err)
	}
	if *caRootCheck < 0 {
		return fmt.Errorf("--ca-root-check-interval %v: must not be negative", *caRootCheck)
	}
	// One connection to the controller carries the CA and the config stream; the trust
	// bundle follows --ca-root and the CA's answers, so a root rotation needs no restart.
	ctl, err := identity.ConnectController(ctx, identity.ControllerOptions{Addr: *caAddr, ServerName: *caServerName,
		RootFile: *caRoot, TokenFile: *tokenFile, TrustDomain: td, TTL: *certTTL, Log: log})
	if err != nil {
		return err
	}
	defer ctl.Close()
	conn, bundleFile, certs := ctl.Conn, ctl.BundleFile, ctl.Certs

	// A running agent on this node hands its listeners over (a DaemonSet surge, or
	// `veilctl lab restart-agent`): the sockets never close, so not a connection is lost.
	// Then the lock on the pin directory makes this agent the capture's only writer.
	if err := os.MkdirAll(*handoverDir, 0o700); err != nil {
		return fmt.Errorf("--handover-dir: %w", err)
	}
	sock := filepath.Join(*handoverDir, "agent.sock")
	takeCtx, cancelTake := context.WithTimeout(ctx, 15*time.Second)
	taken, err := handover.Take(takeCtx, sock)
	cancelTake()
	if err != nil && !errors.Is(err, handover.ErrNoPredecessor) {
		return err
	}
	inherited := map[string]net.Listener{}
	for _, t := range taken {
		l, err := net.FileListener(t.File)
		t.File.Close()
		if err != nil {
			return fmt.Errorf("handover: listener %s: %w", t.Name, err)
		}
		inherited[t.Name] = l
	}
	if len(inherited) > 0 {
		log.Info("handover: took the running agent's listeners over", "listeners", len(inherited))
	}
	lockPath := *handoverDir
	if *capture {
		if err := os.MkdirAll(*pinDir, 0o700); err != nil {
			return fmt.Errorf("--pin-dir: %w", err)
		}
		lockPath = *pinDir
	}
	lockCtx, cancelLock := context.WithTimeout(ctx, *drainGrace+30*time.Second)
	lock, err := handover.Acquire(lockCtx, lockPath)
	cancelLock()
	if err != nil {
		return fmt.Errorf("another agent owns this node's capture and did not hand it over: %w", err)
	}
	defer lock.Release()

	var capt agent.Capture
	if *capture {
		if err := checkNoZtunnel(*ztunnelSocket); err != nil {
			return err
		}
		if _, err := bpf.CheckFeatures(); err != nil {
			return fmt.Errorf("capture: %w", err)
		}
		if len(uplinks) == 0 {
			if uplinks, err = defaultUplinks(); err != nil {
				return fmt.Errorf("--uplink not given and %w", err)
			}
		}
		c, err := bpf.Load(bpf.Options{PinDir: *pinDir, Uplinks: uplinks, AgentMark: uint32(*mark), CaptureHost: *captureHost, FailOpen: *failOpen})
		if err != nil {
			return err
		}
		// Close keeps the pinned programs: until the next agent, enrolled pods' new
		// connections are dropped (or passed, with --fail-open). Uninstall removes them.
		defer c.Close()
		capt = c
		log.Info("capture loaded", "pin_dir", *pinDir, "uplinks", strings.Join(uplinks, ","), "fail_open", *failOpen, "capture_host", *captureHost)
	}
	a, err := agent.New(agent.Options{
		Capture:       capt,
		Node:          *node,
		TrustDomain:   td,
		Policy:        policy.Options{RootNamespace: *rootNamespace, TrustDomain: td.String(), Placement: pl, AllowWaypointBypass: *allowBypass},
		Certs:         certs,
		Sockets:       agent.HostSockets{Mark: *mark},
		OutboundAddr:  *outboundAddr,
		PlaintextAddr: *plaintextAddr,
		HBONEAddr:     *hboneAddr,
		Inherited:     inherited,
		CNIStateDir:   filepath.Join(*handoverDir, "cni-pods"),
		Log:           log,
	})
	if err != nil {
		return err
	}
	// The config comes from the controller's stream; what the cache holds is enforced
	// before the listeners open, so a restart while the controller is away fails closed
	// on the last good config, not open on none.
	if *configCache != "" {
		if err := os.MkdirAll(filepath.Dir(*configCache), 0o700); err != nil {
			return fmt.Errorf("--config-cache: %w", err)
		}
	}
	source := &agent.ControllerSource{Agent: a, Conn: conn, CacheFile: *configCache, Log: log}
	if err := source.LoadCache(); err != nil {
		log.Warn("config cache not used", "file", *configCache, "err", err)
	}
	if err := a.Start(); err != nil {
		return err
	}
	defer a.Close()
	// From here new pods can be enrolled before their network comes up.
	var cniListener *net.UnixListener
	if cni.socket != "" {
		if cniListener, err = serveCNISocket(a, cni.socket); err != nil {
			return err
		}
		defer cniListener.Close()
		log.Info("cni: serving veil-cni", "socket", cni.socket)
	}
	cniCtx, stopCNI := context.WithCancel(ctx)
	defer stopCNI()
	if cni.confDir != "" {
		if err := installCNI(cniCtx, cni, log); err != nil {
			return err
		}
	}
	var uwatch *removal.Watch
	if cni.uninstall == "auto" && *capture {
		uwatch = watchUninstall(cniCtx, cni.daemonSet, log)
	}
	httpListeners := map[string]net.Listener{}

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var ready atomic.Bool
	serve := func(name, addr string, h http.Handler) error {
		if addr == "" {
			return nil
		}
		l := inherited[name]
		if l == nil {
			var err error
			if l, err = net.Listen("tcp", addr); err != nil {
				return fmt.Errorf("--%s %s: %w", name, addr, err)
			}
		}
		httpListeners[name] = l
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
		wg.Add(2)
		go func() { defer wg.Done(); _ = srv.Serve(l) }()
		go func() { defer wg.Done(); <-ctx.Done(); srv.Close() }()
		fmt.Fprintf(stdout, "veil-agent: %s on %s\n", name, l.Addr())
		return nil
	}
	metrics := http.NewServeMux()
	metrics.Handle("/metrics", a.MetricsHandler())
	readyMux := http.NewServeMux()
	// Ready once a config is in force (the controller's, or the cache's) and the node's
	// enrolled pods have certificates: a DaemonSet surge waits for that before the old
	// agent is stopped. The pid tells a restart which agent answers.
	readyMux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		why := ""
		if _, v := source.Version(); v == 0 {
			why = "no config applied yet"
		} else if pending := pendingCerts(certs.States()); len(pending) > 0 {
			why = "waiting for certificates: " + strings.Join(pending, ", ")
		}
		if !ready.Load() {
			why = "starting or stopping"
		}
		if why != "" {
			http.Error(w, fmt.Sprintf("waiting (pid %d): %s", os.Getpid(), why), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintf(w, "ready (pid %d)\n", os.Getpid())
	})
	if err := errors.Join(
		serve("metrics-addr", *metricsAddr, metrics),
		serve("ready-addr", *readyAddr, readyMux),
		serve("admin-addr", *adminAddr, a.AdminHandler()),
	); err != nil {
		return err
	}
	for _, l := range a.Addrs() {
		fmt.Fprintf(stdout, "veil-agent: proxy listening on %s\n", l)
	}
	// Offer the listeners to a successor. When one takes them, this agent stops changing
	// the capture, lets the lock go, and drains.
	removeCapture := false
	handedOver := make(chan struct{})
	files := func() ([]handover.Listener, error) {
		ls, err := a.ListenerFiles()
		if err != nil {
			return nil, err
		}
		for name, l := range httpListeners {
			f, err := l.(*net.TCPListener).File()
			if err != nil {
				for _, x := range ls {
					x.File.Close()
				}
				return nil, err
			}
			ls = append(ls, handover.Listener{Name: name, File: f})
		}
		return ls, nil
	}
	offer, err := handover.NewOffer(sock, files, func() { close(handedOver) })
	if err != nil {
		return err
	}
	defer offer.Close()
	ready.Store(true)
	runCtx, stopSource := context.WithCancel(ctx)
	defer stopSource()
	wg.Add(1)
	go func() { defer wg.Done(); _ = source.Run(runCtx) }()
	if *caRootCheck > 0 {
		wg.Add(1)
		go func() { defer wg.Done(); bundleFile.Watch(ctx, *caRootCheck) }()
	}
	select {
	case <-ctx.Done():
		log.Info("stopping: draining the connections held", "grace", drainGrace.String())
		stopCNI()
		// Stopped without a successor: when the agents are being uninstalled, new pods
		// start outside the mesh from now on, and the capture goes once the connections
		// held have drained.
		if *capture && uninstalling(cni, uwatch, log) {
			removeCapture = true
			if cni.confDir != "" {
				uninstallCNI(cni, log)
			}
		}
	case <-handedOver:
		log.Info("handover: a new agent took the listeners over; draining the connections held", "grace", drainGrace.String())
		stopCNI()
	}
	ready.Store(false)
	// No more CNI requests: a successor serves them, or nobody (the plugin fails and
	// the runtime retries). Closed before the drain, which waits for the agent's work.
	if cniListener != nil {
		cniListener.Close()
	}
	a.StopCapture()
	// The lock goes to a successor now, unless this agent removes the capture: then it
	// holds it until the capture is gone, so an agent starting meanwhile (a reinstall)
	// waits and loads a fresh one instead of adopting pins about to be deleted.
	if !removeCapture {
		lock.Release()
	}
	offer.Close()
	for _, l := range httpListeners {
		l.Close()
	}
	graceCtx, cancelGrace := context.WithTimeout(context.Background(), *drainGrace)
	defer cancelGrace()
	a.Drain(graceCtx)
	if removeCapture {
		capt.(*bpf.Capture).Close()
		if err := bpf.Uninstall(*pinDir); err != nil {
			log.Error("uninstall: cannot remove the capture; run veil-agent uninstall on the node", "pin_dir", *pinDir, "err", err)
		} else {
			log.Info("uninstall: the capture is removed; this node's pods are outside the mesh", "pin_dir", *pinDir)
		}
	}
	stopSource()
	cancel()
	return nil
}

// pendingCerts names the identities whose first certificate has not arrived.
func pendingCerts(states []identity.CertState) []string {
	var out []string
	for _, s := range states {
		if s.State == "pending" {
			out = append(out, s.ID)
		}
	}
	return out
}
