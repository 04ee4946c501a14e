#!/bin/sh
# Regenerates config.pb.go and config_grpc.pb.go from config.proto (run by `make generate`).
# protoc comes from the system (Debian: protobuf-compiler); protoc-gen-go and
# protoc-gen-go-grpc are the Go tools pinned in go.mod. The .proto files of istio.io/api,
# and the common protos they import, come from the module cache, so the generated code
# matches the istio.io/api version in go.mod. protoc's own include directory is searched
# before istio's common protos so that the well-known types map to
# google.golang.org/protobuf/types/known.
set -eu
cd "$(dirname "$0")"
command -v protoc >/dev/null || { echo "api: protoc not found; install it (Debian: apt-get install protobuf-compiler)" >&2; exit 1; }
wkt="$(dirname "$(dirname "$(command -v protoc)")")/include"
istio="$(go list -m -f '{{.Dir}}' istio.io/api)"
exec protoc -I . -I "$wkt" -I "$istio" -I "$istio/common-protos" \
	--plugin=protoc-gen-go="$(go tool -n protoc-gen-go)" \
	--plugin=protoc-gen-go-grpc="$(go tool -n protoc-gen-go-grpc)" \
	--go_out=. --go_opt=paths=source_relative \
	--go-grpc_out=. --go-grpc_opt=paths=source_relative \
	config.proto
