package identity

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	"k8s.io/utils/clock"
)

// An Issuer turns a CSR for one identity into a certificate. Client implements it over
// gRPC; the Manager consumes it.
type Issuer interface {
	// Issue asks for a certificate for id. csrPEM's key is key's public half. The result
	// is checked: a chain whose leaf names another identity, holds another key, or does not
	// verify to the returned roots is an error.
	Issue(ctx context.Context, id spiffeid.ID, csrPEM []byte, key crypto.Signer, ttl time.Duration) (*Issued, error)
}

// Client calls a CA's IstioCertificateService: veil's, or Istio's own (istiod), which
// accepts the same request with ImpersonatedIdentity metadata from a node agent.
// Safe for concurrent use.
type Client struct {
	rpc pb.IstioCertificateServiceClient
	// Clock checks the validity of what the CA returns. Nil means the real clock.
	Clock clock.PassiveClock
}

// NewClient returns a Client over conn. Authentication (a BearerToken, or a client
// certificate) is the connection's business.
func NewClient(conn grpc.ClientConnInterface) *Client {
	return &Client{rpc: pb.NewIstioCertificateServiceClient(conn)}
}

// Issue implements Issuer. It blocks for one RPC.
func (c *Client) Issue(ctx context.Context, id spiffeid.ID, csrPEM []byte, key crypto.Signer, ttl time.Duration) (*Issued, error) {
	md, err := structpb.NewStruct(map[string]any{ImpersonatedIdentityKey: id.String()})
	if err != nil {
		return nil, err
	}
	resp, err := c.rpc.CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr:              string(csrPEM),
		ValidityDuration: int64(ttl / time.Second),
		Metadata:         md,
	})
	if err != nil {
		return nil, fmt.Errorf("identity: create certificate for %s: %w", id, err)
	}
	now := time.Now()
	if c.Clock != nil {
		now = c.Clock.Now()
	}
	return parseResponse(id, resp.GetCertChain(), key, now)
}

// parseResponse splits Istio's cert_chain: leaf first, intermediates, and the trust
// bundle as the last element. It verifies what it got before anyone uses it.
func parseResponse(id spiffeid.ID, elems []string, key crypto.Signer, now time.Time) (*Issued, error) {
	if len(elems) < 2 {
		return nil, fmt.Errorf("identity: certificate for %s: response has %d cert_chain elements, want leaf and roots", id, len(elems))
	}
	var chain []*x509.Certificate
	for i, e := range elems[:len(elems)-1] {
		certs, err := ParseCertificates([]byte(e))
		if err != nil {
			return nil, fmt.Errorf("identity: certificate for %s: cert_chain[%d]: %w", id, i, err)
		}
		chain = append(chain, certs...)
	}
	roots, err := ParseCertificates([]byte(elems[len(elems)-1]))
	if err != nil || len(roots) == 0 {
		return nil, fmt.Errorf("identity: certificate for %s: roots (last cert_chain element): %v", id, errors.Join(err, errors.New("no certificates")))
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("identity: certificate for %s: no leaf", id)
	}
	iss := &Issued{ID: id, Chain: chain, Roots: roots}
	if err := iss.check(key, now); err != nil {
		return nil, fmt.Errorf("identity: certificate for %s: %w", id, err)
	}
	return iss, nil
}

// check verifies that the leaf names iss.ID, holds key's public key, and chains to Roots
// at time now.
func (iss *Issued) check(key crypto.Signer, now time.Time) error {
	leaf := iss.Leaf()
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != iss.ID.String() {
		return fmt.Errorf("leaf URI SANs %v, want exactly %s", leaf.URIs, iss.ID)
	}
	if key != nil && !publicKeysEqual(key.Public(), leaf.PublicKey) {
		return errors.New("leaf does not hold the requested key")
	}
	if _, err := verifyChain(leaf, iss.Chain[1:], iss.Roots, now); err != nil {
		return fmt.Errorf("chain does not verify to the returned roots: %w", err)
	}
	return nil
}

// Issue implements Issuer in process, without gRPC and without node authorization: for
// a CA embedded in the same process as its only user, and for tests. The CSR must ask
// for id.
func (ca *CA) Issue(_ context.Context, id spiffeid.ID, csrPEM []byte, key crypto.Signer, ttl time.Duration) (*Issued, error) {
	csr, asked, err := ParseCSR(csrPEM, ca.opts.TrustDomain)
	if err != nil {
		return nil, err
	}
	if asked != id {
		return nil, invalidCSR("CSR asks for %s, not %s", asked, id)
	}
	iss, err := ca.sign(csr, id, ttl)
	if err != nil {
		return nil, err
	}
	if err := iss.check(key, ca.opts.Clock.Now()); err != nil {
		return nil, fmt.Errorf("identity: certificate for %s: %w", id, err)
	}
	return iss, nil
}
