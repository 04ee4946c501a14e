// Package agent is veil's node agent: it enrolls the node's pods into the BPF capture,
// keeps the workload cache, owns the outbound (15001), inbound plaintext (15006) and
// inbound HBONE (15008) listeners, enforces PeerAuthentication and L4
// AuthorizationPolicy, and serves admin and metrics endpoints.
//
// Not built yet: issue 4 (proxy core) and issue 5 (capture).
package agent
