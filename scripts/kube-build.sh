#!/usr/bin/env bash
# kube-build.sh: builds a real kube-apiserver (and kubectl) from the k8s.io/kubernetes Go
# module, for the tests that need a real API server on a machine without container
# images. The binaries are cached, keyed by version, so only the first run pays for the
# build (a few minutes on two cores).
#
#   scripts/kube-build.sh [VERSION]      prints the directory holding kube-apiserver and kubectl
#
# VERSION defaults to KUBE_VERSION or v1.35.4. The cache is $VEIL_CACHE (default
# ~/.cache/veil). etcd comes from Debian's etcd-server (scripts/deps.sh kube).
set -euo pipefail
ver=${1:-${KUBE_VERSION:-v1.35.4}}
cache=${VEIL_CACHE:-$HOME/.cache/veil}
out=$cache/kube-$ver
if [ -x "$out/kube-apiserver" ] && [ -x "$out/kubectl" ]; then
	echo "$out"
	exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# k8s.io/kubernetes requires its staging modules at v0.0.0 with replace directives into
# its own tree; a module that requires it must point each at the published v0.x of the
# same minor version instead.
staging=v0.${ver#v1.}
(
	cd "$work"
	go mod init veil.local/kubebuild >/dev/null 2>&1
	gomod=$(go mod download -json "k8s.io/kubernetes@$ver" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
	[ -n "$gomod" ] || { echo "kube-build: cannot download k8s.io/kubernetes@$ver" >&2; exit 1; }
	echo "require k8s.io/kubernetes $ver" >>go.mod
	awk -v v="$staging" '$1 ~ /^k8s\.io\// && $2 == "=>" && $3 ~ /^\.\/staging\// { print "replace " $1 " => " $1 " " v }' "$gomod" >>go.mod
	cat >tools.go <<'GO'
package main

import (
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {}
GO
	go mod tidy >/dev/null 2>&1
	mkdir -p "$out.tmp"
	go build -o "$out.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
	go build -o "$out.tmp/kubectl" k8s.io/kubernetes/cmd/kubectl
) >&2
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
