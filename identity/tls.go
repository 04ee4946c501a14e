package identity

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ALPN is the protocol HBONE negotiates: HTTP/2.
const ALPN = "h2"

// A CertSource returns the current certificate of a local workload. Manager is one.
type CertSource interface {
	Get(ctx context.Context, id spiffeid.ID) (*Certificate, error)
}

// LocalWorkload names the local workload that owns a listening address: the workload
// being dialled on an inbound connection. ok is false when no local workload has addr.
type LocalWorkload func(local net.Addr) (id spiffeid.ID, ok bool)

// ServerConfig returns the TLS configuration of the inbound (HBONE server) side. For
// each connection it presents the certificate of the local workload being dialled,
// chosen by the connection's local address; it requires a client certificate that
// chains to the trust bundle and whose SPIFFE ID is in the same trust domain as that
// workload (as ztunnel: no trust domain aliases). TLS 1.3 only, ALPN h2.
func ServerConfig(local LocalWorkload, certs CertSource, bundle x509bundle.Source) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		// A resumed session skips the peer verification below (the bundle and trust
		// domain checks), and veil's clients never resume: no tickets.
		SessionTicketsDisabled: true,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			if hello.Conn == nil {
				return nil, errors.New("identity: TLS server: no connection to choose a certificate by")
			}
			id, ok := local(hello.Conn.LocalAddr())
			if !ok {
				return nil, fmt.Errorf("identity: TLS server: no local workload at %s", hello.Conn.LocalAddr())
			}
			c, err := certs.Get(hello.Context(), id)
			if err != nil {
				return nil, err
			}
			cfg := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}, SessionTicketsDisabled: true}
			tlsconfig.HookMTLSServerConfig(cfg, c, bundle, tlsconfig.AuthorizeMemberOf(id.TrustDomain()))
			cfg.MinVersion = tls.VersionTLS13
			return cfg, nil
		},
	}
}

// ClientConfig returns the TLS configuration of the outbound (HBONE client) side: it
// presents src and accepts only a server whose certificate chains to the trust bundle
// and names exactly the identity expected of the destination. TLS 1.3 only, ALPN h2.
func ClientConfig(src *Certificate, expected spiffeid.ID, bundle x509bundle.Source) *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN}}
	tlsconfig.HookMTLSClientConfig(cfg, src, bundle, tlsconfig.AuthorizeID(expected))
	cfg.MinVersion = tls.VersionTLS13
	return cfg
}

// PeerID returns the SPIFFE ID of the peer of a completed handshake.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, errors.New("identity: peer presented no certificate")
	}
	return x509svid.IDFromCert(cs.PeerCertificates[0])
}
