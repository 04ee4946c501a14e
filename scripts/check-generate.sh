#!/usr/bin/env bash
# check-generate.sh: fail if committed generated code is stale (`make check-generate`).
#
# deploy/manifests/veil.yaml and the Helm chart's files/crds are rendered from the chart
# and the module cache (`make manifests`), so they are regenerated and compared everywhere.
#
# api/*.pb.go depend on go.mod alone (internal/protoc: a pure-Go proto compiler and the
# plugins pinned in go.mod), so they are regenerated and compared on every machine.
# The bpf2go output depends on the machine's clang as well: it is regenerated and compared
# where the toolchain recorded in bpf/toolchain.txt is present (Debian 12's clang 14 and
# libbpf 1.1, what scripts/deps.sh installs there, and what CI runs). Elsewhere the check
# says it is skipped and why; under CI=true a mismatch fails, so CI never passes without
# checking.
set -euo pipefail
cd "$(dirname "$0")/.."

stale() { # paths...
	if ! git diff --quiet -- "$@" || [ -n "$(git ls-files --others --exclude-standard -- "$@")" ]; then
		echo "check-generate: committed generated code is stale; run 'make generate' and commit:" >&2
		git status --short -- "$@" >&2
		exit 1
	fi
}

go generate ./api/...
stale 'api/*.pb.go'

# The chart's CRD files and deploy/manifests/veil.yaml, rendered from deploy/helm/veil by
# deploy/helm/render (a module of its own; Helm and the module cache only, no cluster).
(cd deploy/helm/render && go run . >/dev/null)
stale deploy/manifests/veil.yaml deploy/helm/veil/files/crds

want=$(cat bpf/toolchain.txt)
have=$(bpf/gen.sh toolchain)
if [ "$want" = "$have" ]; then
	go generate ./bpf/...
	stale 'bpf/*_bpfe[lb].go' 'bpf/*_bpfe[lb].o' bpf/toolchain.txt
elif [ "${CI:-}" = true ]; then
	echo "check-generate: CI must check the bpf2go output, but it was built with '$want' and this machine has '$have'" >&2
	exit 1
else
	echo "check-generate: bpf2go output NOT checked: it was built with '$want', this machine has '$have' (another clang emits other bytes; Debian 12 with scripts/deps.sh test has the recorded one)" >&2
fi
