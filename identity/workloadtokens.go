package identity

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// WorkloadToken is one workload's bootstrap credential: the token, the identity it
// proves and the node the workload runs on.
type WorkloadToken struct {
	Token          string `json:"token"`
	Node           string `json:"node"`
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"serviceAccount"`
}

// WorkloadTokens authenticates workloads (a waypoint) by a bootstrap token sent as gRPC
// metadata "authorization: Bearer <token>", where Kubernetes TokenReview is not
// available (the lab, machines without Kubernetes). The caller may obtain only its own
// identity. Safe for concurrent use once built.
type WorkloadTokens struct {
	byHash map[[sha256.Size]byte]Caller
}

// NewWorkloadTokens builds an Authenticator for the workloads of trust domain td. Tokens
// must be unique and at least 16 bytes.
func NewWorkloadTokens(td spiffeid.TrustDomain, tokens []WorkloadToken) (*WorkloadTokens, error) {
	w := &WorkloadTokens{byHash: make(map[[sha256.Size]byte]Caller, len(tokens))}
	for i, t := range tokens {
		if t.Node == "" {
			return nil, fmt.Errorf("identity: workload tokens: [%d].node: required", i)
		}
		id, err := NewID(td, t.Namespace, t.ServiceAccount)
		if err != nil {
			return nil, fmt.Errorf("identity: workload tokens: [%d]: %w", i, err)
		}
		if len(t.Token) < 16 {
			return nil, fmt.Errorf("identity: workload tokens: [%d].token: shorter than 16 bytes", i)
		}
		h := sha256.Sum256([]byte(t.Token))
		if other, dup := w.byHash[h]; dup {
			return nil, fmt.Errorf("identity: workload tokens: [%d] and %s share a token", i, other.Workload)
		}
		w.byHash[h] = Caller{Node: t.Node, Workload: id, Name: "the bootstrap token of workload " + id.String()}
	}
	return w, nil
}

// Authenticate implements Authenticator.
func (w *WorkloadTokens) Authenticate(ctx context.Context) (Caller, error) {
	tok, err := BearerFrom(ctx)
	if err != nil {
		return Caller{}, err
	}
	c, ok := w.byHash[sha256.Sum256([]byte(tok))]
	if !ok {
		return Caller{}, errors.New("unknown workload token")
	}
	return c, nil
}
