// Package waypoint is veil's waypoint: the optional L7 proxy that namespaces, Services
// and pods are bound to with istio.io/use-waypoint. It terminates HBONE with its own
// identity (Waypoint), accepts a CONNECT only for a destination bound to it (Router),
// applies RequestAuthentication (JWT, package jwtauth) and HTTP-level
// AuthorizationPolicy in Envoy's order, and forwards each request to a ready endpoint
// over HBONE with its own identity (Proxy).
//
// Which policies apply: the targetRefs policies of its Gateway, of the Service being
// served and of GatewayClass istio-waypoint, as Istio's waypoint; and, under veil's
// policy placement (policy.PlacementVeil, the default), the policies that select the
// chosen endpoint, evaluated with the real client's identity, as a second decision that
// must also allow.
package waypoint
