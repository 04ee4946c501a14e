// Package lab builds a veil mesh on one Linux machine: nodes and pods as network
// namespaces joined by veths and a bridge, a controller, and a real agent per node. It
// backs `veilctl lab` and the end-to-end tests.
//
// Not built yet: issue 6.
package lab
