// Package policy reads Istio's security.istio.io API (PeerAuthentication, AuthorizationPolicy,
// RequestAuthentication) and decides as Istio does.
//
// The flow is Parse (YAML to objects) → Validate (Istio's admission rules) → Store.Apply or
// Compile (objects plus workloads to an immutable Snapshot) → CompiledWorkload.EvaluateL4 for
// connections in the node agent (ztunnel semantics) or EvaluateHTTP for requests in a waypoint
// (Envoy semantics). ISTIO-SEMANTICS.md in the shared docs is the specification; comments cite
// its sections as §n.
//
// Where Istio's enforcement points differ, veil follows ztunnel at L4 and Envoy at L7:
//   - At L4, ALLOW rules that use HTTP attributes are dropped (fail closed) and DENY rules lose
//     their HTTP attributes; a DENY rule left with an empty clause never matches (a sidecar would
//     deny all TCP instead). CUSTOM, AUDIT and targetRefs policies are not enforced at L4.
//   - At L4, namespaces take only a leading or trailing *, serviceAccounts compare exactly, and
//     trust-domain aliases are not applied; at L7 they follow Envoy.
//   - PeerAuthentication DISABLE behaves as PERMISSIVE for the agent; STRICT becomes the DENY
//     policies istiod derives for ztunnel, so a refused plaintext connection names them.
//
// Concurrency: Parse, Validate, Compile and ResolvePeerAuthentication are pure and safe for
// concurrent use. A Snapshot and everything reachable from it are immutable and safe for
// concurrent use; decisions on it take no lock, and EvaluateL4 does not allocate. A Store is safe
// for concurrent use: writers are serialised by a mutex, readers load the current Snapshot
// through an atomic.Pointer without locking.
package policy
