#!/bin/sh
# Regenerates the bpf2go output (capture_bpfel.{go,o}, capture_bpfeb.{go,o}) from capture.c
# (run by `make generate` through gen.go), and records in toolchain.txt the compiler and
# libbpf headers that built it. bpf2go itself is pinned in go.mod, but clang is the
# machine's, and another clang emits other bytes: `make check-generate` rebuilds and compares
# only where the recorded toolchain is present (scripts/check-generate.sh).
#
#   gen.sh            regenerate
#   gen.sh toolchain  print this machine's toolchain line (fails, naming the package, when
#                     an input is missing)
set -eu
cd "$(dirname "$0")"
missing() { echo "bpf: $1 not found: install $2 (Debian/Ubuntu: apt-get install $2; or run scripts/deps.sh test as root)" >&2; exit 1; }
command -v clang >/dev/null || missing clang clang
command -v llvm-strip >/dev/null || missing llvm-strip llvm
[ -f /usr/include/bpf/bpf_helpers.h ] || missing /usr/include/bpf/bpf_helpers.h libbpf-dev
[ -f /usr/include/linux/bpf.h ] || missing /usr/include/linux/bpf.h linux-libc-dev
libbpf=$(awk '/define LIBBPF_MAJOR_VERSION/{M=$3} /define LIBBPF_MINOR_VERSION/{m=$3} END{if (M != "") print M"."m}' /usr/include/bpf/libbpf_version.h 2>/dev/null || true)
toolchain="$(clang --version | head -n 1); libbpf ${libbpf:-unknown}"
if [ "${1:-}" = toolchain ]; then
	echo "$toolchain"
	exit 0
fi
# The include paths name the multiarch directories because Debian keeps <asm/types.h> there;
# clang -target bpf does not search them on its own.
go tool bpf2go -tags linux -target bpfel,bpfeb -go-package bpf capture capture.c -- \
	-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
echo "$toolchain" >toolchain.txt
