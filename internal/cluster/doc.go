// Package cluster is veil's model of the Kubernetes objects the data plane needs —
// Namespaces, Pods, Services, EndpointSlices, Gateway API Gateways — and a loader for them from a directory of YAML
// manifests. The controller serves this model to agents; an agent without a controller
// reads the same directory. A State is immutable once loaded and safe for concurrent
// reads.
package cluster
