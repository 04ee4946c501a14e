// Package api is the agent<->controller config stream: config.proto (package
// veil.config.v1), its generated Go code, and the conversions between its messages and
// the types the controller and agent work with (internal/cluster, policy).
//
// The stream: an agent calls ConfigService.Subscribe with its node's bootstrap token over
// TLS, names its node and the (epoch, version) it holds; the controller sends a full
// snapshot or, when it can, a delta from that version; the agent answers every Push with
// an Ack or a Nack and the controller sends the next push, a delta from the last
// acknowledged version, only then. Policies travel as Istio's own messages
// (istio.security.v1beta1) with their metadata.
//
// Regenerate with `make generate` (protoc from the system, protoc-gen-go and
// protoc-gen-go-grpc pinned as Go tools in go.mod).
package api
