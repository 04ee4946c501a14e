package api

// internal/protoc compiles config.proto in pure Go and runs protoc-gen-go and
// protoc-gen-go-grpc, all pinned in go.mod, so the output depends on go.mod alone. The
// istio.io/api protos (and the google/api ones they import) come from the module cache at
// the version go.mod requires.
//go:generate go run github.com/veilmesh/veil/internal/protoc -I . -I module:istio.io/api -I module:istio.io/api/common-protos -plugin go:paths=source_relative -plugin go-grpc:paths=source_relative config.proto
