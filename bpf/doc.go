// Package bpf holds veil's BPF programs (TCX at the pods' host-side veths, sk_assign to
// the agent's transparent listeners), their bpf2go output, and the loader that loads,
// pins and attaches them and updates the enrollment map.
//
// Not built yet: issue 5.
package bpf
