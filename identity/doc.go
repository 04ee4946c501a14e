// Package identity is veil's workload identity layer: SPIFFE IDs of the Istio shape
// (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>), the certificate
// authority that signs them, the gRPC CA service (Istio's IstioCertificateService), the
// node agent's certificate manager, and the TLS configurations both ends of an HBONE
// tunnel use.
//
// The CA signs only what its rules allow: a CSR with exactly one URI SAN that is a
// SPIFFE ID in the CA's trust domain, nothing else in the SANs, an accepted key type,
// and a lifetime clamped to a maximum. The gRPC service adds node authorization: a
// caller proves which node it is (an [Authenticator]) and obtains only identities of
// pods scheduled on that node (a [WorkloadIndex]).
//
// [CA], [Server] and [Manager] are safe for concurrent use.
package identity
