package identity

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// ControllerOptions say how a node agent or a waypoint reaches veil-controller, which
// serves the CA and the config stream on one address.
type ControllerOptions struct {
	Addr, ServerName string
	// RootFile is the trust bundle's PEM file (--ca-root); TokenFile the caller's token,
	// read again for every call (a projected service-account token, which the kubelet
	// rotates, or a bootstrap token).
	RootFile, TokenFile string
	TrustDomain         spiffeid.TrustDomain
	// TTL is the lifetime asked of the CA for certificates.
	TTL time.Duration
	Log *slog.Logger
}

// Controller is a connection to veil-controller with what rides on it: the trust bundle
// (RootFile and the CA's latest answer, followed as both change: every handshake reads
// it, so a root rotation needs no restart) and the certificate manager.
type Controller struct {
	Conn       *grpc.ClientConn
	Bundle     *TrustBundle
	BundleFile *BundleFile
	Certs      *Manager
}

// ConnectController loads the trust bundle, checks the token file, and opens the
// connection (keepalive notices a controller that vanished without closing) and the
// certificate manager. When RootFile changes (the caller runs BundleFile.Watch), an early
// renewal brings the CA's bundle in force: a root the file dropped goes once the CA's
// answer drops it too. Errors name the flag at fault (--ca-root, --token-file).
func ConnectController(ctx context.Context, o ControllerOptions) (*Controller, error) {
	bundle := NewTrustBundle(o.TrustDomain)
	bundleFile := &BundleFile{Path: o.RootFile, Bundle: bundle, Log: o.Log}
	if _, err := bundleFile.Load(); err != nil {
		return nil, fmt.Errorf("--ca-root: %w", err)
	}
	if _, err := TokenFile(o.TokenFile).GetRequestMetadata(ctx); err != nil {
		return nil, fmt.Errorf("--token-file: %w", err)
	}
	conn, err := DialCABundle(o.Addr, o.ServerName, bundle, TokenFile(o.TokenFile),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}))
	if err != nil {
		return nil, err
	}
	certs, err := NewManager(ManagerOptions{Issuer: NewClient(conn), TTL: o.TTL, Bundle: bundle, Log: o.Log})
	if err != nil {
		conn.Close()
		return nil, err
	}
	bundleFile.OnChange = func() { certs.Refresh(o.TrustDomain) }
	return &Controller{Conn: conn, Bundle: bundle, BundleFile: bundleFile, Certs: certs}, nil
}

// Close stops the certificate manager, then closes the connection.
func (c *Controller) Close() error {
	c.Certs.Close()
	return c.Conn.Close()
}
