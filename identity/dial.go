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
