// Package interop tests veil against Istio's own Go code, over real TLS and real
// loopback sockets:
//
//   - Istio's HBONE dialer (istio.io/istio/pkg/hbone) through veil's HBONE server
//     (tunnel.Server), and veil's HBONE client (tunnel.Pool) through Istio's HBONE
//     server;
//   - Istio's CA client (the one istio-agent uses, citadel.CitadelClient) against
//     veil's CA server (controller.CAServer, as veil-controller runs it).
//
// It is a module of its own so that istio.io/istio and what it pulls in stay out of
// veil's go.mod; it uses veil through a replace of the parent directory. Run it with
// `make interop`, or `cd interop && go test ./...`.
package interop
