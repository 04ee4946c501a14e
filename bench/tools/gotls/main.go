// Command gotls is the plain Go TLS tunnel that `make bench-path` measures beside raw TCP,
// stunnel and veil: what a node-to-node mTLS tunnel costs with nothing but crypto/tls and
// io.Copy, one TLS 1.3 connection per tunnelled TCP connection.
//
//	gotls certs  -dir DIR -server-name NAME -server-ip IP
//	gotls server -dir DIR -listen NODE2:7443 -backend POD:PORT
//	gotls client -dir DIR -listen GW:7000 -peer NODE2:7443 -server-name NAME
//	gotls probe  -dir DIR -peer NODE2:7443 -server-name NAME
//
// certs writes a throwaway ECDSA P-256 CA (ca.crt) and two leaves signed by it, server.crt
// and client.crt with their keys, in PEM (stunnel reads the same files). server accepts TLS
// 1.3, requires a client certificate from that CA, and dials the backend in plaintext; client
// accepts plaintext and dials the server over mutual TLS 1.3, with no session cache, so every
// tunnelled connection is a full handshake. Both directions are copied with io.Copy and a
// half-close is passed on (FIN on TCP, close_notify on TLS). probe checks a server: with the
// client certificate it must negotiate TLS 1.3 and get an HTTP answer from the backend,
// without one it must be refused.
package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"
)

const (
	dialTimeout      = 5 * time.Second
	handshakeTimeout = 10 * time.Second
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout)
	stop()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "gotls:", err)
		}
		os.Exit(2)
	}
}

const usage = `usage:
  gotls certs  -dir DIR -server-name NAME [-server-ip IP]
  gotls server -dir DIR -listen ADDR -backend ADDR
  gotls client -dir DIR -listen ADDR -peer ADDR -server-name NAME
  gotls probe  -dir DIR -peer ADDR -server-name NAME`

// run is the whole program; the tests call it.
func run(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return errors.New(usage)
	}
	mode := args[0]
	fs := flag.NewFlagSet("gotls "+mode, flag.ContinueOnError)
	dir := fs.String("dir", "", "directory of ca.crt, server.crt/.key, client.crt/.key")
	listen := fs.String("listen", "", "address to accept on")
	backend := fs.String("backend", "", "server: plaintext address to dial for each connection")
	peer := fs.String("peer", "", "client, probe: the tunnel server's address")
	serverName := fs.String("server-name", "", "the name in the server certificate")
	serverIP := fs.String("server-ip", "", "certs: an IP SAN for the server certificate")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("-dir is required")
	}
	switch mode {
	case "certs":
		if *serverName == "" {
			return errors.New("certs: -server-name is required")
		}
		return writeCerts(*dir, *serverName, *serverIP)
	case "server":
		if *listen == "" || *backend == "" {
			return errors.New("server: -listen and -backend are required")
		}
		cfg, err := serverConfig(*dir)
		if err != nil {
			return err
		}
		return listenAndServe(ctx, *listen, func(c net.Conn) { serverConn(tls.Server(c, cfg), *backend) })
	case "client":
		if *listen == "" || *peer == "" || *serverName == "" {
			return errors.New("client: -listen, -peer and -server-name are required")
		}
		cfg, err := clientConfig(*dir, *serverName, true)
		if err != nil {
			return err
		}
		return listenAndServe(ctx, *listen, func(c net.Conn) { clientConn(c.(*net.TCPConn), *peer, cfg) })
	case "probe":
		if *peer == "" || *serverName == "" {
			return errors.New("probe: -peer and -server-name are required")
		}
		return probe(ctx, *dir, *peer, *serverName, stdout)
	}
	return fmt.Errorf("unknown mode %q\n%s", mode, usage)
}

func listenAndServe(ctx context.Context, addr string, handle func(net.Conn)) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	log.Printf("gotls: listening on %s", ln.Addr())
	return serve(ctx, ln, handle)
}

// serve runs handle on each connection ln accepts until ctx ends, then closes ln.
func serve(ctx context.Context, ln net.Listener, handle func(net.Conn)) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				time.Sleep(20 * time.Millisecond)
				continue
			}
			return err
		}
		go handle(c)
	}
}

func loadPool(dir string) (*x509.CertPool, error) {
	b, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no certificate", filepath.Join(dir, "ca.crt"))
	}
	return pool, nil
}

func loadPair(dir, name string) (tls.Certificate, error) {
	return tls.LoadX509KeyPair(filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"))
}

// serverConfig: TLS 1.3 only, the server certificate, a client certificate from the CA
// required.
func serverConfig(dir string) (*tls.Config, error) {
	pool, err := loadPool(dir)
	if err != nil {
		return nil, err
	}
	cert, err := loadPair(dir, "server")
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}, nil
}

// clientConfig: TLS 1.3 only, the server must present serverName from the CA, and no
// session cache (each connection a full handshake). withCert=false leaves the client
// certificate out, which the server must refuse.
func clientConfig(dir, serverName string, withCert bool) (*tls.Config, error) {
	pool, err := loadPool(dir)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: serverName}
	if withCert {
		cert, err := loadPair(dir, "client")
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// clientConn carries one accepted plaintext connection over a new mTLS connection.
func clientConn(in *net.TCPConn, peer string, cfg *tls.Config) {
	ctx, cancel := context.WithTimeout(context.Background(), dialTimeout+handshakeTimeout)
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: dialTimeout}, Config: cfg}
	out, err := d.DialContext(ctx, "tcp", peer) // returns once the handshake is done
	cancel()
	if err != nil {
		log.Printf("gotls: dial %s: %v", peer, err)
		in.Close()
		return
	}
	splice(in, out.(*tls.Conn))
}

// serverConn completes the handshake of one accepted connection, then dials the backend.
func serverConn(in *tls.Conn, backend string) {
	ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
	err := in.HandshakeContext(ctx)
	cancel()
	if err != nil {
		log.Printf("gotls: handshake from %s: %v", in.RemoteAddr(), err)
		in.Close()
		return
	}
	out, err := net.DialTimeout("tcp", backend, dialTimeout)
	if err != nil {
		log.Printf("gotls: dial %s: %v", backend, err)
		in.Close()
		return
	}
	splice(out.(*net.TCPConn), in)
}

// halfCloser is a connection whose sending side can be shut on its own: *net.TCPConn
// (FIN) and *tls.Conn (close_notify).
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// splice copies both directions between plain and secure until both have ended, then
// closes both.
func splice(plain *net.TCPConn, secure *tls.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		forward(secure, plain)
	}()
	forward(plain, secure)
	<-done
	plain.Close()
	secure.Close()
}

// forward copies src to dst. The end of src is passed on as a half-close of dst, so the
// other direction goes on; an error (a reset, a truncated TLS stream) closes both
// connections, which ends the other direction too.
func forward(dst, src halfCloser) {
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		src.Close()
		return
	}
	dst.CloseWrite()
}

// probe checks a tunnel server: mutual TLS 1.3 end to end to the backend's HTTP server, and
// a client without a certificate refused.
func probe(ctx context.Context, dir, peer, serverName string, stdout io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	get := func(withCert bool) (tls.ConnectionState, int, error) {
		cfg, err := clientConfig(dir, serverName, withCert)
		if err != nil {
			return tls.ConnectionState{}, 0, err
		}
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: dialTimeout}, Config: cfg}
		c, err := d.DialContext(ctx, "tcp", peer)
		if err != nil {
			return tls.ConnectionState{}, 0, err
		}
		defer c.Close()
		if dl, ok := ctx.Deadline(); ok {
			c.SetDeadline(dl)
		}
		st := c.(*tls.Conn).ConnectionState()
		// In TLS 1.3 a refused client certificate shows on the first read, not in Dial.
		if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"); err != nil {
			return st, 0, err
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return st, 0, err
		}
		resp.Body.Close()
		return st, resp.StatusCode, nil
	}
	st, code, err := get(true)
	if err != nil {
		return fmt.Errorf("probe %s with the client certificate: %w", peer, err)
	}
	if st.Version != tls.VersionTLS13 || len(st.PeerCertificates) == 0 {
		return fmt.Errorf("probe %s: negotiated %s, want TLS 1.3 with a server certificate", peer, tls.VersionName(st.Version))
	}
	fmt.Fprintf(stdout, "%s %s group=%s server=%s http=%d", tls.VersionName(st.Version), tls.CipherSuiteName(st.CipherSuite),
		st.CurveID, st.PeerCertificates[0].Subject.CommonName, code)
	if _, _, err := get(false); err == nil {
		fmt.Fprintln(stdout)
		return fmt.Errorf("probe %s: a client without a certificate was let through", peer)
	}
	fmt.Fprintln(stdout, "; without a client certificate: refused")
	return nil
}

// writeCerts writes a CA and a server and a client leaf, each ECDSA P-256, valid for two
// days, in PEM. Keys are mode 0600.
func writeCerts(dir, serverName, serverIP string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "veil bench CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(48 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, "ca.crt"), "CERTIFICATE", caDER, 0o644); err != nil {
		return err
	}
	leaf := func(name, cn string, ips []net.IP) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: cn},
			DNSNames:              []string{cn},
			IPAddresses:           ips,
			NotBefore:             now.Add(-time.Hour),
			NotAfter:              now.Add(48 * time.Hour),
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageDigitalSignature,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		if err := writePEM(filepath.Join(dir, name+".crt"), "CERTIFICATE", der, 0o644); err != nil {
			return err
		}
		return writePEM(filepath.Join(dir, name+".key"), "PRIVATE KEY", keyDER, 0o600)
	}
	var ips []net.IP
	if serverIP != "" {
		ip := net.ParseIP(serverIP)
		if ip == nil {
			return fmt.Errorf("certs: -server-ip %q is not an IP address", serverIP)
		}
		ips = append(ips, ip)
	}
	if err := leaf("server", serverName, ips); err != nil {
		return err
	}
	return leaf("client", "bench-client", nil)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		panic(err)
	}
	return n.Add(n, big.NewInt(1))
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}
