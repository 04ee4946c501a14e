// Package waypoint is the optional L7 proxy: it terminates HBONE, applies
// RequestAuthentication (JWT) and HTTP-level AuthorizationPolicy, and forwards over HBONE.
//
// Not built yet.
package waypoint
