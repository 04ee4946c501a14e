#!/usr/bin/env bash
# deps.sh: the one dependency step of `make demo`, `make test`, `make bench-path` and .ci/run.
#
#   scripts/deps.sh demo|test|bench ...
#
# Each set names what its command runs, as "check package": the check is a command on PATH or
# an absolute file path, the package is Debian's (and Ubuntu's) name for what provides it.
# What is present is left alone. What is missing is installed with apt-get on Debian and
# Ubuntu when running as root; anywhere else (another distribution, or not root) the script
# stops and prints the exact packages to install, with the names other distributions use.
set -euo pipefail

# "check debian-package fedora-package arch-package"
demo=(
	"make make make make"
	"ip iproute2 iproute iproute2"
	"nsenter util-linux util-linux util-linux"
)
test=(
	"${demo[@]}"
	"git git git git"
	# bpf/: bpf2go compiles capture.c with clang, strips with llvm-strip, and includes
	# libbpf's helper headers and the kernel's UAPI headers.
	"clang clang clang clang"
	"llvm-strip llvm llvm llvm"
	"/usr/include/bpf/bpf_helpers.h libbpf-dev libbpf-devel libbpf"
	"/usr/include/linux/bpf.h linux-libc-dev kernel-headers linux-api-headers"
	# The capture's kernel tests load nftables rules with nft and fetch pages with curl.
	"nft nftables nftables nftables"
	"curl curl curl curl"
	# The controller's Kubernetes tests run a real API server on etcd.
	"etcd etcd-server etcd etcd"
	# TestCASecretRotation runs the README's root rotation commands, which use openssl.
	"openssl openssl openssl openssl"
)
bench=(
	"${demo[@]}"
	"iperf3 iperf3 iperf3 iperf3"
	"stunnel stunnel4 stunnel stunnel"
	"openssl openssl openssl openssl"
)

[ $# -gt 0 ] || { echo "usage: scripts/deps.sh demo|test|bench ..." >&2; exit 2; }

go_ok() {
	command -v go >/dev/null || return 1
	local v
	v=$(go env GOVERSION 2>/dev/null | sed 's/^go//')
	[ "$(printf '%s\n1.26\n' "${v%%[-+ ]*}" | sort -V | head -1)" = 1.26 ]
}
if ! go_ok; then
	echo "deps: Go >= 1.26 is required (found: $(command -v go >/dev/null && go env GOVERSION || echo none))." >&2
	echo "      Install it from go.dev/dl into /usr/local/go; Debian's and Ubuntu's golang-go packages are older." >&2
	exit 1
fi

declare -A seen
missing=() deb=() rpm=() arch=()
for set in "$@"; do
	case $set in
	demo) entries=("${demo[@]}") ;;
	test) entries=("${test[@]}") ;;
	bench) entries=("${bench[@]}") ;;
	*) echo "deps: unknown set '$set' (demo, test, bench)" >&2; exit 2 ;;
	esac
	for e in "${entries[@]}"; do
		read -r check d f a <<<"$e"
		[ -z "${seen[$check]:-}" ] || continue
		seen[$check]=1
		if [ "${check#/}" != "$check" ]; then
			[ -e "$check" ] && continue
		else
			command -v "$check" >/dev/null && continue
		fi
		missing+=("$check")
		deb+=("$d") rpm+=("$f") arch+=("$a")
	done
done
[ ${#missing[@]} -gt 0 ] || exit 0

debian_like=false
if [ -r /etc/os-release ]; then
	# shellcheck disable=SC1091
	. /etc/os-release
	case " ${ID:-} ${ID_LIKE:-} " in *" debian "* | *" ubuntu "*) debian_like=true ;; esac
fi
if $debian_like && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
	pkgs=$(printf '%s\n' "${deb[@]}" | sort -u | tr '\n' ' ')
	echo "deps: installing $pkgs(missing: ${missing[*]})" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# shellcheck disable=SC2086
	apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
	exit 0
fi

uniq_words() { printf '%s\n' "$@" | sort -u | tr '\n' ' '; }
{
	echo "deps: missing: ${missing[*]}"
	if $debian_like; then
		echo "  as root:         apt-get install --no-install-recommends $(uniq_words "${deb[@]}")"
	else
		echo "  Debian/Ubuntu:   apt-get install --no-install-recommends $(uniq_words "${deb[@]}")"
		echo "  Fedora/RHEL:     dnf install $(uniq_words "${rpm[@]}")"
		echo "  Arch:            pacman -S $(uniq_words "${arch[@]}")"
	fi
	echo "  then run the command again (it installs these itself on Debian and Ubuntu when run as root)."
} >&2
exit 1
