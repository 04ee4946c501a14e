package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// DialCA opens a gRPC connection to a CA at target over TLS, trusting roots for the
// server's certificate (whose DNS or IP SAN must match serverName), and authenticating
// every call with the node's bootstrap token. It does not block.
func DialCA(target, serverName string, roots []*x509.Certificate, token string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	return DialCAWith(target, serverName, roots, BearerToken(token), opts...)
}

// DialCAWith is DialCA with the per-call credential given: TokenFile for a projected
// service-account token, which the kubelet rotates.
func DialCAWith(target, serverName string, roots []*x509.Certificate, cred credentials.PerRPCCredentials, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	if len(roots) == 0 {
		return nil, errors.New("identity: dial CA: no roots to trust")
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	creds := credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: serverName})
	opts = append([]grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithPerRPCCredentials(cred),
	}, opts...)
	return grpc.NewClient(target, opts...)
}

// A RootSource returns the roots to trust now: a TrustBundle, a CA.
type RootSource interface {
	Roots() []*x509.Certificate
}

// DialCABundle is DialCAWith trusting, at every handshake, the roots roots holds then:
// the agent passes its trust bundle, so a root rotation (the CA's serving certificate
// re-issued under the new root) reaches the next connection to the CA without a restart.
func DialCABundle(target, serverName string, roots RootSource, cred credentials.PerRPCCredentials, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	if len(roots.Roots()) == 0 {
		return nil, errors.New("identity: dial CA: no roots to trust")
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: serverName,
		// Verified below against the roots in force: crypto/tls has no hook for roots that
		// change, so its own verification (against fixed RootCAs) is replaced, not skipped.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyServer(cs, serverName, roots.Roots())
		},
	}
	opts = append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)),
		grpc.WithPerRPCCredentials(cred),
	}, opts...)
	return grpc.NewClient(target, opts...)
}

// verifyServer checks a TLS server's chain as crypto/tls does for a client: to one of
// roots, for serverAuth, with a DNS or IP SAN matching serverName.
func verifyServer(cs tls.ConnectionState, serverName string, roots []*x509.Certificate) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("identity: CA server presented no certificate")
	}
	opts := x509.VerifyOptions{
		DNSName:       serverName,
		Roots:         x509.NewCertPool(),
		Intermediates: x509.NewCertPool(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, r := range roots {
		opts.Roots.AddCert(r)
	}
	for _, c := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(c)
	}
	if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
		return fmt.Errorf("identity: CA server certificate: %w", err)
	}
	return nil
}

// TokenFile is a gRPC per-call credential read from a file at every call: a projected
// service-account token, which the kubelet rewrites before it expires, or a bootstrap
// token. It requires transport security.
type TokenFile string

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (f TokenFile) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	b, err := os.ReadFile(string(f))
	if err != nil {
		return nil, fmt.Errorf("identity: token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return nil, fmt.Errorf("identity: token file %s is empty", string(f))
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (TokenFile) RequireTransportSecurity() bool { return true }
