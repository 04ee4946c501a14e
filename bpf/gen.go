package bpf

// bpf2go is a tool dependency in go.mod (go tool), so go mod tidy keeps what it needs.
// The include paths name the multiarch directories because Debian keeps <asm/types.h> there;
// clang -target bpf does not search it on its own.
//go:generate go tool bpf2go -tags linux -target bpfel,bpfeb -go-package bpf capture capture.c -- -O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
