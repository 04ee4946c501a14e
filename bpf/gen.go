package bpf

// The include paths name the multiarch directories because Debian keeps <asm/types.h> there;
// clang -target bpf does not search it on its own.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -tags linux -target bpfel,bpfeb -go-package bpf capture capture.c -- -O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
