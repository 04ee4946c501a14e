// Command veil-waypoint is veil's waypoint: the optional L7 proxy a namespace, Service or
// pod is bound to with istio.io/use-waypoint. It terminates HBONE with its own identity,
// enforces RequestAuthentication (JWT) and HTTP-level AuthorizationPolicy, and forwards
// each request over HBONE to a ready endpoint.
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
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/agent"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/waypoint"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "veil-waypoint:", err)
		os.Exit(1)
	}
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func run(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("veil-waypoint", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		namespace     = fs.String("namespace", env("POD_NAMESPACE", ""), "the waypoint's namespace (default $POD_NAMESPACE)")
		gateway       = fs.String("gateway", env("GATEWAY_NAME", ""), "the waypoint's Gateway name (default $GATEWAY_NAME)")
		sa            = fs.String("service-account", env("SERVICE_ACCOUNT", ""), "the waypoint pods' service account: its identity (default $SERVICE_ACCOUNT, else the Gateway name)")
		podIP         = fs.String("pod-ip", env("POD_IP", ""), "this pod's address (default $POD_IP)")
		node          = fs.String("node", env("NODE_NAME", ""), "this pod's node (default $NODE_NAME)")
		caAddr        = fs.String("ca-addr", "", "address of the controller (CA and config stream), host:port (required)")
		caServerName  = fs.String("ca-server-name", "veil-controller", "name in the controller's TLS certificate")
		caRoot        = fs.String("ca-root", "", "PEM file of the trust bundle (required)")
		tokenFile     = fs.String("token-file", "", "file holding the waypoint's own token, read at every call: its projected service-account token (audience istio-ca) in Kubernetes, else its workload bootstrap token (required)")
		trustDomain   = fs.String("trust-domain", identity.DefaultTrustDomain, "trust domain of the mesh")
		rootNamespace = fs.String("root-namespace", policy.DefaultRootNamespace, "Istio root namespace")
		placement     = fs.String("policy-placement", "veil", "veil: also enforce the policies that select the destination workload (veil's extension); istio: only targetRefs policies, as Istio's waypoint")
		certTTL       = fs.Duration("cert-ttl", identity.DefaultMaxTTL, "lifetime asked of the CA for the waypoint's certificate")
		hboneAddr     = fs.String("hbone-addr", "[::]:15008", "HBONE listener")
		metricsAddr   = fs.String("metrics-addr", ":15020", "Prometheus metrics (/metrics); empty disables")
		readyAddr     = fs.String("ready-addr", ":15021", "readiness (/healthz/ready); empty disables")
		logLevel      = fs.String("log-level", "info", "debug, info, warn or error")
		drainGrace    = fs.Duration("drain-grace", 25*time.Second, "how long a stopping waypoint lets open streams finish")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	for _, f := range []struct{ name, v string }{{"--namespace", *namespace}, {"--gateway", *gateway}, {"--pod-ip", *podIP}, {"--ca-addr", *caAddr}, {"--ca-root", *caRoot}, {"--token-file", *tokenFile}} {
		if f.v == "" {
			return fmt.Errorf("%s is required", f.name)
		}
	}
	if *sa == "" {
		*sa = *gateway
	}
	ip, err := netip.ParseAddr(*podIP)
	if err != nil {
		return fmt.Errorf("--pod-ip: %w", err)
	}
	pl, err := policy.ParsePlacement(*placement)
	if err != nil {
		return fmt.Errorf("--policy-placement: %w", err)
	}
	td, err := spiffeid.TrustDomainFromString(*trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain %q: %w", *trustDomain, err)
	}
	ctl, err := identity.ConnectController(ctx, identity.ControllerOptions{Addr: *caAddr, ServerName: *caServerName,
		RootFile: *caRoot, TokenFile: *tokenFile, TrustDomain: td, TTL: *certTTL, Log: log})
	if err != nil {
		return err
	}
	defer ctl.Close()
	conn, bundleFile, certs := ctl.Conn, ctl.BundleFile, ctl.Certs
	go bundleFile.Watch(ctx, 5*time.Second)

	reg := prometheus.NewRegistry()
	metrics, err := waypoint.NewMetrics(reg)
	if err != nil {
		return err
	}
	popts := policy.Options{RootNamespace: *rootNamespace, TrustDomain: td.String(), Placement: pl}
	w, err := waypoint.New(waypoint.Options{Namespace: *namespace, Name: *gateway, ServiceAccount: *sa, PodIP: ip,
		TrustDomain: td, Policy: popts, Certs: certs, Metrics: metrics, Log: log})
	if err != nil {
		return err
	}
	// The waypoint's certificate, issued from its own token, before it takes traffic.
	if _, err := certs.Get(ctx, w.ID()); err != nil {
		return fmt.Errorf("certificate for %s: %w", w.ID(), err)
	}
	source := &agent.ControllerSource{Sink: w.Router(), Node: *node, Policy: popts, Conn: conn, Log: log}
	go func() {
		if err := source.Run(ctx); err != nil {
			log.Error("config stream", "err", err)
		}
	}()

	lis, err := net.Listen("tcp", *hboneAddr)
	if err != nil {
		return err
	}
	serveHTTP := func(addr string, h http.Handler) {
		if addr == "" {
			return
		}
		l, err := net.Listen("tcp", addr)
		if err != nil {
			log.Error("listen", "addr", addr, "err", err)
			return
		}
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(l)
		go func() { <-ctx.Done(); srv.Close() }()
	}
	serveHTTP(*metricsAddr, promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	ready := http.NewServeMux()
	ready.HandleFunc("/healthz/ready", func(rw http.ResponseWriter, _ *http.Request) {
		if err := w.Router().Ready(); err != nil {
			http.Error(rw, "waiting: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		if _, err := certs.Get(context.Background(), w.ID()); err != nil {
			http.Error(rw, "waiting: certificate: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(rw, "ready")
	})
	serveHTTP(*readyAddr, ready)
	log.Info("waypoint serving", "gateway", *namespace+"/"+*gateway, "identity", w.ID().String(), "hbone", lis.Addr().String(),
		"policy_placement", string(pl))
	errc := make(chan error, 1)
	go func() { errc <- w.Serve(lis) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	dctx, cancel := context.WithTimeout(context.Background(), *drainGrace)
	defer cancel()
	if err := w.Shutdown(dctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
}
