// Package jwtauth is the waypoint's RequestAuthentication: it verifies JSON Web Tokens the
// way Envoy's jwt_authn filter does under the configuration istiod generates for a proxy
// (ISTIO-SEMANTICS §3), and answers failures with Envoy's status, body and
// WWW-Authenticate header.
//
// New compiles the jwtRules of the RequestAuthentications that apply to a decision into an
// Authenticator: every rule is a provider, the providers sorted by issuer and each OR'ed
// with allow_missing, so a request without a token passes and any token present must be
// valid for a provider configured at the location it was found. Keys come only from each
// rule's inline jwks: the controller fetches jwksUri (or the issuer's OpenID discovery
// document) and inlines the keys before it pushes the policy. A rule left without keys
// rejects every token of its issuer.
//
// Response texts are jwt_verify_lib's current status strings, the body Envoy sends.
package jwtauth
