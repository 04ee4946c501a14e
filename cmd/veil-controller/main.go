// Command veil-controller runs veil's control plane on one gRPC port (TLS, default 15012
// as istiod's): the CA that signs the SPIFFE identities of pods for the node agents
// (Istio's IstioCertificateService), and the config stream (api.ConfigService) that
// sends the agents the workloads, services, namespaces and Istio policies read from a
// directory of YAML, which it watches for changes. The CA's node placement follows the
// same directory. The CA's own files (--ca-dir, or --ca-secret) are read again every
// --ca-check-interval: a root rotation (README "Rotating the root CA") happens while it
// runs. With --kubeconfig it also deploys the waypoint of each Gateway of class
// istio-waypoint, as istiod does (--waypoint-*; controller.Waypoints).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/controller"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/policy"
	"google.golang.org/grpc"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "veil-controller:", err)
		os.Exit(1)
	}
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("veil-controller", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		caDir       = fs.String("ca-dir", "/var/lib/veil/ca", "CA directory in Istio's cacerts layout (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem); a root is generated there on first start when it is empty")
		trustDomain = fs.String("trust-domain", identity.DefaultTrustDomain, "trust domain of the identities the CA signs")
		maxTTL      = fs.Duration("max-ttl", identity.DefaultMaxTTL, "longest lifetime of an issued workload certificate")
		listen      = fs.String("listen", ":15012", "address of the CA's gRPC service")
		wlTokens    = fs.String("workload-tokens", "", "YAML file, mode 0600, listing workloads' bootstrap tokens ({token, node, namespace, serviceAccount}): how waypoints authenticate without Kubernetes")
		tokens      = fs.String("node-tokens", "", "YAML file, mode 0600, mapping node name to its bootstrap token (required without --kubeconfig)")
		caSecret    = fs.String("ca-secret", "", "with --kubeconfig: namespace/name of a Secret holding the CA in Istio's cacerts layout, used instead of --ca-dir; created with a new root when absent (replicas share it)")
		rootCM      = fs.String("root-configmap", "", "with --kubeconfig: namespace/name of a ConfigMap the trust bundle is published to (key root-cert.pem), for agents to mount")
		agentSA     = fs.String("agent-service-account", "veil-system/veil-agent", "with --kubeconfig: namespace/name of the node agents' service account; their projected tokens (audience istio-ca) authorize the identities of their node's pods, any other pod's only its own")
		configDir   = fs.String("config-dir", "", "directory of Kubernetes YAML (Namespaces, Pods, Services, PeerAuthentication, AuthorizationPolicy, RequestAuthentication), watched for changes: what the agents receive, and which node may obtain which identity (required)")
		pods        = fs.String("pods", "", "old name of --config-dir")
		rootNS      = fs.String("root-namespace", policy.DefaultRootNamespace, "meshConfig.rootNamespace: policies there apply mesh-wide")
		poll        = fs.Duration("poll-interval", 200*time.Millisecond, "how often --config-dir is checked for changes")
		ackTimeout  = fs.Duration("ack-timeout", controller.DefaultAckTimeout, "how long an agent has to answer a push (and to subscribe once connected); a stream not answered in time is ended, and the agent reconnects and resumes")
		maxStreams  = fs.Int("max-streams-per-node", controller.DefaultMaxStreamsPerNode, "most config streams one node may hold open at once (at least 2: a restarting agent's old and new process overlap)")
		logLevel    = fs.String("log-level", "info", "debug, info, warn or error")
		caCheck     = fs.Duration("ca-check-interval", controller.DefaultCAReloadInterval, "how often the CA (--ca-dir's files, or --ca-secret) is read again: a change (a root rotation, README \"Rotating the root CA\") is taken while running when agents can follow it, refused and logged otherwise; 0 disables")
		kubeconfig  = fs.String("kubeconfig", "", `read the cluster from a Kubernetes API server instead of --config-dir: a kubeconfig file, or "in-cluster" for the pod's service account`)
		jwksBlocked = fs.String("jwks-blocked-cidrs", "", "comma-separated CIDRs never connected to when fetching RequestAuthentication keys (jwksUri, OpenID discovery), besides link-local and cloud metadata addresses, which are always refused (istiod's BLOCKED_CIDRS_IN_JWKS_URIS)")
		jwksRoots   = fs.String("jwks-extra-roots", "", "PEM file of CA certificates trusted besides the system roots when fetching RequestAuthentication keys over https (istiod's /cacerts/extra.pem)")
		jwksSkipTLS = fs.Bool("jwks-insecure-skip-verify", false, "do not verify the certificates of https JWKS servers (istiod's JWKS_RESOLVER_INSECURE_SKIP_VERIFY)")
		serverNames listFlag
	)
	fs.Var(&serverNames, "server-name", "DNS name agents dial the CA by; repeatable (default veil-controller, localhost)")
	var (
		waypointDeploy    = fs.Bool("waypoint-deploy", true, "with --kubeconfig: deploy a waypoint (ServiceAccount, Deployment of --waypoint-image, Service) for each Gateway of class istio-waypoint, as istiod does, unless GatewayClass istio-waypoint is Istio's")
		waypointImage     = fs.String("waypoint-image", "veil/veil-waypoint:dev", "the veil-waypoint image of the waypoints deployed")
		waypointPull      = fs.String("waypoint-image-pull-policy", "IfNotPresent", "pull policy of --waypoint-image: Always, IfNotPresent or Never")
		waypointCAAddr    = fs.String("waypoint-ca-addr", "", "host:port at which the waypoints deployed reach this CA; its host is their TLS server name (default the first --server-name and --listen's port)")
		waypointPlacement = fs.String("waypoint-policy-placement", "veil", "the --policy-placement of the waypoints deployed: veil (they also enforce the selector policies of the workloads they serve) or istio")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	switch {
	case *configDir != "" && *pods != "" && *configDir != *pods:
		return errors.New("--pods is the old name of --config-dir; give one of them")
	case *configDir == "":
		*configDir = *pods
	}
	if (*configDir == "") == (*kubeconfig == "") {
		return errors.New("give one of --config-dir and --kubeconfig")
	}
	if *tokens == "" && *kubeconfig == "" {
		return errors.New("--node-tokens is required (or --kubeconfig, for Kubernetes token review)")
	}
	if *poll <= 0 {
		return fmt.Errorf("--poll-interval %v: must be positive", *poll)
	}
	if *ackTimeout <= 0 {
		return fmt.Errorf("--ack-timeout %v: must be positive", *ackTimeout)
	}
	if *maxStreams < 2 {
		return fmt.Errorf("--max-streams-per-node %d: must be at least 2, for an agent restarting while its old process is still connected", *maxStreams)
	}
	if len(serverNames) == 0 {
		serverNames = listFlag{"veil-controller", "localhost"}
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	td, err := spiffeid.TrustDomainFromString(*trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain %q: %w", *trustDomain, err)
	}
	if *maxTTL < time.Minute {
		return fmt.Errorf("--max-ttl %v: must be at least 1m", *maxTTL)
	}
	var rc *rest.Config
	var cs kubernetes.Interface
	if *kubeconfig != "" {
		if rc, err = kubeRESTConfig(*kubeconfig); err != nil {
			return err
		}
		if cs, err = kubernetes.NewForConfig(rc); err != nil {
			return fmt.Errorf("--kubeconfig: %w", err)
		}
	} else if *caSecret != "" || *rootCM != "" {
		return errors.New("--ca-secret and --root-configmap need --kubeconfig")
	}
	caOpts := identity.CAOptions{TrustDomain: td, MaxTTL: *maxTTL}
	if *caCheck < 0 {
		return fmt.Errorf("--ca-check-interval %v: must not be negative", *caCheck)
	}
	var ca *identity.CA
	trustBundle := filepath.Join(*caDir, identity.RootCertFile)
	readCA := func(context.Context) (map[string][]byte, error) { return identity.ReadCAFiles(*caDir) }
	caWhere := "ca dir " + *caDir
	if *caSecret != "" {
		ns, name, ok := strings.Cut(*caSecret, "/")
		if !ok || ns == "" || name == "" {
			return fmt.Errorf("--ca-secret %q: want namespace/name", *caSecret)
		}
		ca, err = controller.LoadOrCreateCASecret(ctx, cs, ns, name, caOpts)
		trustBundle = "Secret " + *caSecret
		readCA, caWhere = controller.SecretCAFiles(cs, ns, name), "CA secret "+*caSecret
	} else {
		ca, err = identity.LoadOrCreateCA(*caDir, caOpts)
	}
	if err != nil {
		return err
	}
	cas := controller.NewCAReloader(ca, readCA, caWhere, caOpts)
	cas.Interval, cas.Log = *caCheck, log
	if *rootCM != "" {
		ns, name, ok := strings.Cut(*rootCM, "/")
		if !ok || ns == "" || name == "" {
			return fmt.Errorf("--root-configmap %q: want namespace/name", *rootCM)
		}
		if err := controller.PublishRoot(ctx, cs, ns, name, ca); err != nil {
			return err
		}
		cas.Publish = func(ctx context.Context, ca *identity.CA) error { return controller.PublishRoot(ctx, cs, ns, name, ca) }
	}
	log.Info("ca: loaded", "from", caWhere, "signing", ca.SigningCertificate().Subject.String(),
		"signing_root", identity.Fingerprint(ca.SigningRoot()), "roots", strings.Join(controller.RootFingerprints(ca), ","))
	var auths controller.FirstOf
	if *tokens != "" {
		nt, err := controller.LoadNodeTokens(*tokens)
		if err != nil {
			return err
		}
		auths = append(auths, nt)
	}
	if *wlTokens != "" {
		wt, err := controller.LoadWorkloadTokens(*wlTokens, td)
		if err != nil {
			return err
		}
		auths = append(auths, wt)
	}
	popts := policy.Options{RootNamespace: *rootNS, TrustDomain: td.String()}
	jwks, err := jwksResolver(*jwksBlocked, *jwksRoots, *jwksSkipTLS, log)
	if err != nil {
		return err
	}
	var src controller.Source
	var first *controller.Config
	from := *configDir
	if *kubeconfig != "" {
		// The informers' first full list is served when it arrives; until then the CA
		// places nothing and agents wait.
		src, from = &controller.KubeSource{Config: rc, Policy: popts, Log: log}, "the API server at "+rc.Host
		auths = append(auths, &controller.TokenReview{Client: cs, AgentServiceAccount: *agentSA, TrustDomain: td})
	} else {
		dir := &controller.DirSource{Dir: *configDir, Policy: popts, Interval: *poll, Log: log}
		if first, err = dir.Load(); first == nil {
			return err
		}
		src = dir
	}
	placement := &controller.LivePlacement{}
	var waypoints atomic.Pointer[map[spiffeid.ID]bool]
	config := &controller.ConfigServer{
		Auth:   auths,
		Source: src,
		OnConfig: func(c *controller.Config) {
			if err := placement.Update(td, c.Cluster.Pods); err != nil {
				log.Warn("ca: pods left out of the placement", "err", err)
			}
			ids := controller.WaypointIdentities(td, c.Cluster)
			waypoints.Store(&ids)
		},
		Waypoint: func(id spiffeid.ID) bool {
			m := waypoints.Load()
			return m != nil && (*m)[id]
		},
		JWKS:              jwks,
		MaxStreamsPerNode: *maxStreams,
		AckTimeout:        *ackTimeout,
		Log:               log,
	}
	jwks.OnChange = config.Republish
	// Serve a clean first load at once: neither a CA request nor a subscription meets an
	// empty config. One with errors is not served at all (the source's Run logs them and
	// waits for a clean load): a partial config could loosen what agents enforce.
	if err == nil && first != nil {
		config.OnConfig(first)
		if _, err := config.Set(first); err != nil {
			log.Warn("config: objects not served", "err", err)
		}
	}

	// The waypoints of Gateways of class istio-waypoint, deployed as istiod does.
	var deployer *controller.Waypoints
	if *kubeconfig != "" && *waypointDeploy {
		caAddr := *waypointCAAddr
		if caAddr == "" {
			_, port, err := net.SplitHostPort(*listen)
			if err != nil {
				return fmt.Errorf("--listen %q: %w", *listen, err)
			}
			caAddr = net.JoinHostPort(serverNames[0], port)
		}
		deployer = &controller.Waypoints{Config: rc, Image: *waypointImage, PullPolicy: corev1.PullPolicy(*waypointPull), CAAddr: caAddr,
			Roots: func() []byte { return cas.Current().RootsPEM() }, TrustDomain: td.String(), RootNamespace: *rootNS,
			PolicyPlacement: *waypointPlacement, Log: log}
		if err := deployer.Validate(); err != nil {
			return fmt.Errorf("--waypoint-*: %w", err)
		}
		publish := cas.Publish
		cas.Publish = func(ctx context.Context, ca *identity.CA) error {
			deployer.Resync() // the waypoints' trust bundle
			if publish == nil {
				return nil
			}
			return publish(ctx, ca)
		}
	}

	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	caDone := make(chan struct{})
	deployerDone := make(chan struct{})
	go func() {
		defer close(deployerDone)
		if deployer != nil {
			if err := deployer.Run(ctx); err != nil {
				log.Error("waypoints: not deployed", "err", err)
			}
		}
	}()
	go func() {
		defer close(caDone)
		if *caCheck > 0 {
			cas.Run(ctx)
		}
	}()
	jwksDone := make(chan struct{})
	go func() {
		defer close(jwksDone)
		jwks.Run(ctx)
	}()
	configDone := make(chan error, 1)
	go func() {
		err := config.Run(ctx)
		if err != nil {
			cancel()
		}
		configDone <- err
	}()
	fmt.Fprintf(stdout, "veil-controller: CA on %s, trust bundle %s, config stream from %s\n", lis.Addr(), trustBundle, from)
	srv := &controller.CAServer{CA: cas, Auth: auths, Workloads: placement, ServerNames: serverNames, Services: []interface{ Register(*grpc.Server) }{config}, Log: log}
	err = srv.Serve(ctx, lis)
	cancel()
	<-caDone
	<-deployerDone
	<-jwksDone
	return errors.Join(err, <-configDone)
}

// jwksResolver builds the controller's JWKS resolver from the --jwks-* flags.
func jwksResolver(blocked, roots string, skipVerify bool, log *slog.Logger) (*controller.JWKSResolver, error) {
	r := &controller.JWKSResolver{InsecureSkipVerify: skipVerify, Log: log}
	for _, c := range strings.Split(blocked, ",") {
		if c = strings.TrimSpace(c); c == "" {
			continue
		}
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return nil, fmt.Errorf("--jwks-blocked-cidrs: %w", err)
		}
		r.BlockedCIDRs = append(r.BlockedCIDRs, p.Masked())
	}
	if roots != "" {
		pool, err := controller.JWKSRoots(roots)
		if err != nil {
			return nil, fmt.Errorf("--jwks-extra-roots: %w", err)
		}
		r.RootCAs = pool
	}
	return r, nil
}

// kubeRESTConfig reads a kubeconfig file, or the pod's service account for "in-cluster".
func kubeRESTConfig(path string) (*rest.Config, error) {
	if path == "in-cluster" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig in-cluster: %w", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("--kubeconfig %s: %w", path, err)
	}
	return c, nil
}
