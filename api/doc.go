// Package api holds the .proto of the agent<->controller config stream and its
// generated Go code.
//
// Not built yet: issue 6.
package api
