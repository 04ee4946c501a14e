package bpf

// gen.sh runs bpf2go (a tool dependency in go.mod, so go mod tidy keeps what it needs) and
// records the toolchain that built the committed output in toolchain.txt.
//go:generate ./gen.sh
