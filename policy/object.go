package policy

import (
	"fmt"
	"net/netip"
	"time"

	securityv1beta1 "istio.io/api/security/v1beta1"
)

// Kind is the kind of a security.istio.io object.
type Kind uint8

// The kinds of security.istio.io objects veil reads.
const (
	KindPeerAuthentication Kind = iota + 1
	KindAuthorizationPolicy
	KindRequestAuthentication
)

func (k Kind) String() string {
	switch k {
	case KindPeerAuthentication:
		return "PeerAuthentication"
	case KindAuthorizationPolicy:
		return "AuthorizationPolicy"
	case KindRequestAuthentication:
		return "RequestAuthentication"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// DefaultRootNamespace is Istio's default meshConfig.rootNamespace.
const DefaultRootNamespace = "istio-system"

// DefaultTrustDomain is Istio's default meshConfig.trustDomain.
const DefaultTrustDomain = "cluster.local"

// Meta is the part of an object's metadata that policy decisions depend on.
type Meta struct {
	Name string
	// Namespace defaults to "default" when the manifest omits it, as kubectl does.
	Namespace   string
	Labels      map[string]string
	Annotations map[string]string
	// Created is metadata.creationTimestamp. Manifests written by hand usually lack it; it is then
	// the zero time, so such objects sort as the oldest and ties are broken by name, then namespace
	// (ISTIO-SEMANTICS §0), independent of file order.
	Created time.Time
	// Source says where the object was read, as "file:line" of its document; empty if not read from
	// a file.
	Source string
}

// Object is one parsed PeerAuthentication, AuthorizationPolicy or RequestAuthentication. Exactly
// one of the spec pointers, the one matching Kind, is non-nil. An Object must not be modified once
// it is handed to a Store.
type Object struct {
	Kind Kind
	// APIVersion is the manifest's apiVersion (security.istio.io/v1 or v1beta1).
	APIVersion string
	Meta

	PeerAuthentication    *securityv1beta1.PeerAuthentication
	AuthorizationPolicy   *securityv1beta1.AuthorizationPolicy
	RequestAuthentication *securityv1beta1.RequestAuthentication
}

// Key identifies an object within a Store: kind, namespace and name.
type Key struct {
	Kind      Kind
	Namespace string
	Name      string
}

// Key returns the object's identity.
func (o *Object) Key() Key { return Key{o.Kind, o.Namespace, o.Name} }

// String returns "Kind namespace/name".
func (k Key) String() string { return k.Kind.String() + " " + k.Namespace + "/" + k.Name }

// Workload is a pod (or any addressable workload) as far as policy is concerned.
type Workload struct {
	Namespace string
	Name      string
	Labels    map[string]string
	// ServiceAccount defaults to "default".
	ServiceAccount string
	// IPs are the workload's addresses; Snapshot.WorkloadByIP finds it by any of them.
	IPs []netip.Addr
	// Waypoint marks a waypoint proxy (a Gateway of class istio-waypoint). Waypoints enforce only
	// targetRefs policies (ISTIO-SEMANTICS §0).
	Waypoint bool
	// Source says where the workload was read, if from a file.
	Source string
}

// gatewayNameLabel marks a pod of a Gateway API gateway or waypoint.
const gatewayNameLabel = "gateway.networking.k8s.io/gateway-name"

// WorkloadKey identifies a workload within a Store.
type WorkloadKey struct{ Namespace, Name string }
