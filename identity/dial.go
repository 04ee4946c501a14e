package identity

import (
	"crypto/tls"
	"crypto/x509"
	"errors"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// DialCA opens a gRPC connection to a CA at target over TLS, trusting roots for the
// server's certificate (whose DNS or IP SAN must match serverName), and authenticating
// every call with the node's bootstrap token. It does not block.
func DialCA(target, serverName string, roots []*x509.Certificate, token string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
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
		grpc.WithPerRPCCredentials(BearerToken(token)),
	}, opts...)
	return grpc.NewClient(target, opts...)
}
