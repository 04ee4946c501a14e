package identity

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultTrustDomain is the trust domain used when none is configured, as in Istio.
const DefaultTrustDomain = "cluster.local"

// ErrNotWorkloadID reports a SPIFFE ID that is not of the Istio workload shape
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
var ErrNotWorkloadID = errors.New("not a workload identity of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")

// NewID returns the SPIFFE ID of service account sa in namespace ns.
func NewID(td spiffeid.TrustDomain, ns, sa string) (spiffeid.ID, error) {
	if td.IsZero() {
		return spiffeid.ID{}, errors.New("identity: empty trust domain")
	}
	if ns == "" || sa == "" {
		return spiffeid.ID{}, fmt.Errorf("identity: namespace %q and service account %q must both be set", ns, sa)
	}
	id, err := spiffeid.FromSegments(td, "ns", ns, "sa", sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("identity: ns %q sa %q: %w", ns, sa, err)
	}
	return id, nil
}

// ParseID parses s as a SPIFFE ID and checks it has the Istio workload shape: exactly
// the four path segments ns/<namespace>/sa/<service-account>, both non-empty.
func ParseID(s string) (spiffeid.ID, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("identity: %q: %w", s, err)
	}
	if _, _, err := Parts(id); err != nil {
		return spiffeid.ID{}, err
	}
	return id, nil
}

// Parts returns the namespace and service account of a workload identity.
func Parts(id spiffeid.ID) (ns, sa string, err error) {
	seg := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" || seg[1] == "" || seg[3] == "" {
		return "", "", fmt.Errorf("identity: %q: %w", id, ErrNotWorkloadID)
	}
	return seg[1], seg[3], nil
}
