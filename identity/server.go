package identity

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

// ImpersonatedIdentityKey is the key in IstioCertificateRequest.metadata under which a
// node agent names the workload identity it asks for, as Istio's ztunnel does.
const ImpersonatedIdentityKey = "ImpersonatedIdentity"

// A Caller is who a CA request comes from once authenticated: a node agent, which may
// obtain the identities of the pods on its node, or a workload (a waypoint, a pod that
// runs its own client), which may obtain only its own identity, as istiod signs for
// sidecars.
type Caller struct {
	// Node is the node the caller runs on.
	Node string
	// Workload, when set, is the caller's own identity, and the only one it may obtain.
	// Unset for a node agent.
	Workload spiffeid.ID
	// Name says who the caller is, for logs (a pod, a bootstrap token's node).
	Name string
}

// An Authenticator establishes the caller of a CA request from its context (gRPC
// metadata, peer certificate). It returns an error when the caller cannot be
// authenticated; the service answers Unauthenticated.
type Authenticator interface {
	Authenticate(ctx context.Context) (Caller, error)
}

// A WorkloadIndex answers whether a pod with the given identity is scheduled on a node.
// The CA consults it so that an agent obtains only its own pods' identities.
type WorkloadIndex interface {
	IdentityOnNode(node string, id spiffeid.ID) bool
}

// NodeTokens authenticates node agents by a per-node bootstrap credential sent as
// gRPC metadata "authorization: Bearer <token>". It stands in for Kubernetes TokenReview
// in the lab and on machines without Kubernetes. Safe for concurrent use once built.
type NodeTokens struct {
	byHash map[[sha256.Size]byte]string // sha256(token) -> node
}

// NewNodeTokens builds an Authenticator from node name -> token. Tokens must be unique
// and at least 16 bytes.
func NewNodeTokens(tokens map[string]string) (*NodeTokens, error) {
	n := &NodeTokens{byHash: make(map[[sha256.Size]byte]string, len(tokens))}
	for node, tok := range tokens {
		if node == "" {
			return nil, errors.New("identity: node tokens: empty node name")
		}
		if len(tok) < 16 {
			return nil, fmt.Errorf("identity: node tokens: token of node %q is shorter than 16 bytes", node)
		}
		h := sha256.Sum256([]byte(tok))
		if other, dup := n.byHash[h]; dup {
			return nil, fmt.Errorf("identity: node tokens: nodes %q and %q share a token", other, node)
		}
		n.byHash[h] = node
	}
	return n, nil
}

// Authenticate implements Authenticator. Tokens are compared by their SHA-256, so the
// lookup time does not depend on how much of a guess is right.
func (n *NodeTokens) Authenticate(ctx context.Context) (Caller, error) {
	tok, err := BearerFrom(ctx)
	if err != nil {
		return Caller{}, err
	}
	node, ok := n.byHash[sha256.Sum256([]byte(tok))]
	if !ok {
		return Caller{}, errors.New("unknown bootstrap token")
	}
	return Caller{Node: node, Name: "the bootstrap token of node " + node}, nil
}

// BearerFrom returns the token of a call's one "authorization: Bearer <token>" metadata
// entry.
func BearerFrom(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) != 1 {
		return "", errors.New("want exactly one authorization header")
	}
	tok, ok := strings.CutPrefix(vals[0], "Bearer ")
	if !ok || tok == "" {
		return "", errors.New("authorization header is not a Bearer token")
	}
	return tok, nil
}

// BearerToken is a gRPC per-RPC credential carrying a node's bootstrap token. It
// requires transport security, so the token never crosses the network in clear.
type BearerToken string

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (t BearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (BearerToken) RequireTransportSecurity() bool { return true }

// Server is the CA's gRPC service: Istio's IstioCertificateService.CreateCertificate,
// so an Istio client can use veil's CA. Every call is authenticated, node-authorized
// and logged when refused.
type Server struct {
	pb.UnimplementedIstioCertificateServiceServer

	// CA signs; a CASource that changes (a rotation) applies from the next request on.
	CA        CASource
	Auth      Authenticator
	Workloads WorkloadIndex
	Log       *slog.Logger // nil means slog.Default()
}

// Register adds the service to a gRPC server.
func (s *Server) Register(g *grpc.Server) { pb.RegisterIstioCertificateServiceServer(g, s) }

// CreateCertificate implements IstioCertificateService. The identity asked for is the
// CSR's URI SAN; a request that also carries ImpersonatedIdentity metadata must name
// the same identity. The response's cert_chain is the leaf, then intermediates, and the
// trust bundle (root-cert.pem) as the last element, as Istio's CA answers.
func (s *Server) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	log := s.Log
	if log == nil {
		log = slog.Default()
	}
	ca := s.CA.Current()
	caller, err := s.Auth.Authenticate(ctx)
	if err != nil {
		log.Warn("ca: refused: unauthenticated", "peer", peerAddr(ctx), "err", err)
		return nil, status.Errorf(codes.Unauthenticated, "ca: %v", err)
	}
	csr, id, err := ParseCSR([]byte(req.GetCsr()), ca.TrustDomain())
	if err != nil {
		log.Warn("ca: refused: invalid CSR", "node", caller.Node, "err", err)
		return nil, status.Errorf(codes.InvalidArgument, "ca: %v", err)
	}
	if imp := req.GetMetadata().GetFields()[ImpersonatedIdentityKey].GetStringValue(); imp != "" && imp != id.String() {
		log.Warn("ca: refused: impersonated identity differs from CSR", "node", caller.Node, "identity", id.String(), "impersonated", imp)
		return nil, status.Errorf(codes.InvalidArgument, "ca: %s %q does not match the CSR's URI SAN %q", ImpersonatedIdentityKey, imp, id)
	}
	if !caller.Workload.IsZero() {
		if caller.Workload != id {
			log.Warn("ca: refused: a workload asked for another identity", "caller", caller.Name, "node", caller.Node, "identity", id.String(), "own", caller.Workload.String())
			return nil, status.Errorf(codes.PermissionDenied, "ca: %s (identity %s, on node %q) may obtain only its own identity, not %s", caller.Name, caller.Workload, caller.Node, id)
		}
	} else if !s.Workloads.IdentityOnNode(caller.Node, id) {
		log.Warn("ca: refused: identity not on caller's node", "caller", caller.Name, "node", caller.Node, "identity", id.String())
		return nil, status.Errorf(codes.PermissionDenied, "ca: node %q runs no pod with identity %s", caller.Node, id)
	}
	if req.GetValidityDuration() < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "ca: negative validity_duration %d", req.GetValidityDuration())
	}
	issued, err := ca.sign(csr, id, time.Duration(req.GetValidityDuration())*time.Second)
	if err != nil {
		log.Error("ca: signing failed", "node", caller.Node, "identity", id.String(), "err", err)
		if errors.Is(err, ErrInvalidCSR) {
			return nil, status.Errorf(codes.InvalidArgument, "ca: %v", err)
		}
		return nil, status.Errorf(codes.Internal, "ca: %v", err)
	}
	chain := make([]string, 0, len(issued.Chain)+1)
	for _, c := range issued.Chain {
		chain = append(chain, string(encodeCerts(c)))
	}
	chain = append(chain, string(ca.rootsPEM))
	if log.Enabled(ctx, slog.LevelDebug) {
		log.Debug("ca: issued", "node", caller.Node, "identity", id.String(), "serial", issued.Leaf().SerialNumber.Text(16), "not_after", issued.Leaf().NotAfter)
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}
