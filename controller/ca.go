package controller

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/veilmesh/veil/identity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"sigs.k8s.io/yaml"
)

// CAServer serves identity's CA over gRPC with TLS.
type CAServer struct {
	CA        *identity.CA
	Auth      identity.Authenticator
	Workloads identity.WorkloadIndex
	// ServerNames are the DNS names agents dial the CA by; the listener's IP is added.
	ServerNames []string
	// Services are registered on the same gRPC server (the config stream). Streaming
	// services must end their streams when ctx ends: Serve stops gracefully, and stops
	// hard after StopTimeout.
	Services []interface{ Register(*grpc.Server) }
	Log      *slog.Logger
}

// StopTimeout is how long Serve waits for calls in progress when ctx ends.
const StopTimeout = 5 * time.Second

// servingLifetime is how long the CA's own TLS certificate lasts; it is minted anew at
// every start.
const servingLifetime = 365 * 24 * time.Hour

// Serve answers on lis until ctx ends, then stops gracefully. It blocks.
func (s *CAServer) Serve(ctx context.Context, lis net.Listener) error {
	log := s.Log
	if log == nil {
		log = slog.Default()
	}
	var ips []net.IP
	if a, ok := lis.Addr().(*net.TCPAddr); ok && !a.IP.IsUnspecified() {
		ips = append(ips, a.IP)
	}
	cert, err := s.CA.ServingCertificate(s.ServerNames, ips, servingLifetime)
	if err != nil {
		return err
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
	})),
		// Config streams are long-lived: ping idle agents so a vanished one frees its
		// stream, and let agents ping as often as every 10s to notice a vanished
		// controller.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	(&identity.Server{CA: s.CA, Auth: s.Auth, Workloads: s.Workloads, Log: log}).Register(g)
	for _, svc := range s.Services {
		svc.Register(g)
	}
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		<-ctx.Done()
		t := time.AfterFunc(StopTimeout, g.Stop)
		g.GracefulStop()
		t.Stop()
	}()
	log.Info("ca: serving", "addr", lis.Addr().String(), "trust_domain", s.CA.TrustDomain().String(), "server_names", s.ServerNames)
	err = g.Serve(lis)
	<-stopped
	if errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}

// LoadNodeTokens reads a YAML map of node name -> bootstrap token. The file holds
// secrets: it is refused when others may read it.
func LoadNodeTokens(path string) (*identity.NodeTokens, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("controller: node tokens: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("controller: node tokens: %s has mode %v; make it readable by its owner only (chmod 600)", path, st.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("controller: node tokens: %w", err)
	}
	var tokens map[string]string
	if err := yaml.UnmarshalStrict(data, &tokens); err != nil {
		return nil, fmt.Errorf("controller: node tokens: %s: want a map of node name to token: %w", path, err)
	}
	n, err := identity.NewNodeTokens(tokens)
	if err != nil {
		return nil, fmt.Errorf("controller: node tokens: %s: %w", path, err)
	}
	return n, nil
}
