// Package tunnel speaks HBONE, the tunnel protocol of Istio ambient: one TCP connection
// per HTTP/2 CONNECT stream, over mutual TLS 1.3 with ALPN h2. The :authority is the
// destination ip:port, a Forwarded header carries the original source, and the server
// answers 200 to proceed, 401 when policy denies, 503 when the destination cannot be
// reached and 400 for a malformed request.
//
// [Pool] is the client: streams multiplexed over pooled connections keyed by (source
// identity, destination identity, destination address). [Server] is the server: it
// hands each stream to a [Handler] and splices it with the connection the handler
// returns. [Join] is the copy loop both use. The package knows nothing of Kubernetes or
// policy; TLS configurations come from the caller (package identity builds them).
//
// Pool, Server and their streams are safe for concurrent use.
package tunnel
