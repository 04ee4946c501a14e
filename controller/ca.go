package controller

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/internal/cluster"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/veilmesh/veil/identity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"sigs.k8s.io/yaml"
)

// CAServer serves identity's CA over gRPC with TLS.
type CAServer struct {
	// CA signs, and its signing certificate issues the server's own TLS certificate. A
	// CASource that changes (CAReloader: a rotation) applies to the next request and the
	// next handshake; the serving certificate is issued anew under each CA.
	CA        identity.CASource
	Auth      identity.Authenticator
	Workloads identity.WorkloadIndex
	// ServerNames are the DNS names agents dial the CA by; the listener's IP is added.
	ServerNames []string
	// Services are registered on the same gRPC server (the config stream). Streaming
	// services must end their streams when ctx ends: Serve stops gracefully, and stops
	// hard after StopTimeout.
	Services []interface{ Register(*grpc.Server) }
	// MaxConnectionIdle closes (GOAWAY) a connection with no call in progress for this
	// long. A config stream is one call in progress for as long as it lasts, so an
	// agent's connection is never idle while it subscribes. Default
	// DefaultMaxConnectionIdle.
	MaxConnectionIdle time.Duration
	// KeepaliveTime and KeepaliveTimeout: after KeepaliveTime without activity on a
	// connection the server pings the client, and closes the connection when no answer
	// comes within KeepaliveTimeout. Defaults DefaultKeepaliveTime and
	// DefaultKeepaliveTimeout.
	KeepaliveTime, KeepaliveTimeout time.Duration
	Log                             *slog.Logger
}

const (
	// DefaultMaxConnectionIdle is how long a connection may stay open with no call.
	DefaultMaxConnectionIdle = 15 * time.Minute
	// DefaultKeepaliveTime and DefaultKeepaliveTimeout are the server's pings.
	DefaultKeepaliveTime    = 30 * time.Second
	DefaultKeepaliveTimeout = 10 * time.Second
	// KeepaliveMinTime is how often a client may ping: agents ping every 30s; more
	// often than this gets a client's connection closed (GOAWAY "too_many_pings").
	KeepaliveMinTime = 10 * time.Second
)

// keepalive returns the server's keepalive settings. Config streams are long-lived: the
// server pings quiet connections so a vanished agent frees its stream, lets agents ping
// as often as every KeepaliveMinTime to notice a vanished controller (with or without a
// call in progress: pings do not keep a connection from being idle), and closes
// connections with no call for MaxConnectionIdle.
func (s *CAServer) keepalive() (keepalive.ServerParameters, keepalive.EnforcementPolicy) {
	or := func(d, def time.Duration) time.Duration {
		if d <= 0 {
			return def
		}
		return d
	}
	return keepalive.ServerParameters{
			MaxConnectionIdle: or(s.MaxConnectionIdle, DefaultMaxConnectionIdle),
			Time:              or(s.KeepaliveTime, DefaultKeepaliveTime),
			Timeout:           or(s.KeepaliveTimeout, DefaultKeepaliveTimeout),
		},
		keepalive.EnforcementPolicy{MinTime: KeepaliveMinTime, PermitWithoutStream: true}
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
	serving := &servingCerts{names: s.ServerNames, ips: ips}
	if _, err := serving.get(s.CA.Current()); err != nil {
		return err
	}
	kp, ep := s.keepalive()
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return serving.get(s.CA.Current())
		},
	})),
		grpc.KeepaliveParams(kp),
		grpc.KeepaliveEnforcementPolicy(ep),
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
	log.Info("ca: serving", "addr", lis.Addr().String(), "trust_domain", s.CA.Current().TrustDomain().String(), "server_names", s.ServerNames)
	err := g.Serve(lis)
	<-stopped
	if errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}

// servingCerts holds the CA server's TLS certificate, issued by the CA in force and
// issued again when the CA changes: after a rotation switched signing to a new root,
// the server's certificate chains to it too, so agents that trust only the new root (the
// old one removed) still connect.
type servingCerts struct {
	names []string
	ips   []net.IP

	mu   sync.Mutex
	ca   *identity.CA
	cert *tls.Certificate
}

func (s *servingCerts) get(ca *identity.CA) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ca != ca {
		cert, err := ca.ServingCertificate(s.names, s.ips, servingLifetime)
		if err != nil {
			return nil, err
		}
		s.ca, s.cert = ca, &cert
	}
	return s.cert, nil
}

// LoadNodeTokens reads a YAML map of node name -> bootstrap token. The file holds
// secrets: it is refused when others may read it.
func LoadNodeTokens(path string) (*identity.NodeTokens, error) {
	data, err := readSecretFile(path, "node tokens")
	if err != nil {
		return nil, err
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

// readSecretFile reads a file of secrets (what names it in errors), refusing it when
// others than its owner may read it.
func readSecretFile(path, what string) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("controller: %s: %w", what, err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("controller: %s: %s has mode %v; make it readable by its owner only (chmod 600)", what, path, st.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("controller: %s: %w", what, err)
	}
	return data, nil
}

// LoadWorkloadTokens reads a workload-token file: a YAML list of {token, node, namespace,
// serviceAccount}, mode 0600, for workloads (waypoints) outside Kubernetes.
func LoadWorkloadTokens(path string, td spiffeid.TrustDomain) (*identity.WorkloadTokens, error) {
	data, err := readSecretFile(path, "workload tokens")
	if err != nil {
		return nil, err
	}
	var tokens []identity.WorkloadToken
	if err := yaml.UnmarshalStrict(data, &tokens); err != nil {
		return nil, fmt.Errorf("controller: workload tokens: %s: want a list of {token, node, namespace, serviceAccount}: %w", path, err)
	}
	w, err := identity.NewWorkloadTokens(td, tokens)
	if err != nil {
		return nil, fmt.Errorf("controller: workload tokens: %s: %w", path, err)
	}
	return w, nil
}

// WaypointIdentities returns the identities of st's usable waypoints (Gateways of class
// istio-waypoint with a ready pod, refused neither for a shared nor for a second service
// account): the workloads that may subscribe to the config.
func WaypointIdentities(td spiffeid.TrustDomain, st *cluster.State) map[spiffeid.ID]bool {
	ids := map[spiffeid.ID]bool{}
	if st == nil {
		return ids
	}
	// Only waypoints that resolve (one service account that runs no other pod): a pod
	// that merely carries a Gateway's label is not one.
	b := st.Bindings()
	for _, g := range st.Gateways {
		if g.ClassName != cluster.WaypointClass {
			continue
		}
		w, err := b.Resolve(g.Namespace, g.Name)
		if err != nil {
			continue
		}
		if id, err := identity.NewID(td, g.Namespace, w.ServiceAccount); err == nil {
			ids[id] = true
		}
	}
	return ids
}
