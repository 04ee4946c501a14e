// Package controller is veil's control plane: it serves the CA to node agents and (to
// come) streams workloads and policies to them. Its inputs are config sources: today a
// directory of Kubernetes YAML; Kubernetes informers later, behind the same shape.
package controller
