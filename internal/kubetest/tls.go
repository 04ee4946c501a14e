package kubetest

import "crypto/tls"

// insecureTLS trusts the API server's self-signed serving certificate (loopback, a
// throwaway cluster).
func insecureTLS() *tls.Config { return &tls.Config{InsecureSkipVerify: true} }
