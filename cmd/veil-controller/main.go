// Command veil-controller runs veil's control plane: today, the CA that signs the
// SPIFFE identities of pods for the node agents (Istio's IstioCertificateService on
// gRPC, TLS, default port 15012 as istiod's).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/controller"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
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
		tokens      = fs.String("node-tokens", "", "YAML file, mode 0600, mapping node name to its bootstrap token (required)")
		pods        = fs.String("pods", "", "directory of Pod manifests (spec.nodeName, spec.serviceAccountName) deciding which node may obtain which identity (required)")
		logLevel    = fs.String("log-level", "info", "debug, info, warn or error")
		serverNames listFlag
	)
	fs.Var(&serverNames, "server-name", "DNS name agents dial the CA by; repeatable (default veil-controller, localhost)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *tokens == "" || *pods == "" {
		return errors.New("--node-tokens and --pods are required")
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
	ca, err := identity.LoadOrCreateCA(*caDir, identity.CAOptions{TrustDomain: td, MaxTTL: *maxTTL})
	if err != nil {
		return err
	}
	auth, err := controller.LoadNodeTokens(*tokens)
	if err != nil {
		return err
	}
	state, loadErrs, err := cluster.LoadDir(*pods)
	if err != nil {
		return err
	}
	for _, e := range loadErrs {
		log.Warn("pods: object ignored", "err", e)
	}
	placement, err := controller.Placement(td, state.Pods)
	if err != nil {
		return err
	}
	log.Info("pods loaded", "pods", len(state.Pods), "nodes", len(placement))

	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "veil-controller: CA on %s, trust bundle %s\n", lis.Addr(), filepath.Join(*caDir, identity.RootCertFile))
	srv := &controller.CAServer{CA: ca, Auth: auth, Workloads: placement, ServerNames: serverNames, Log: log}
	return srv.Serve(ctx, lis)
}
