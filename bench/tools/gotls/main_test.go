package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// tunnel starts a backend, a gotls server in front of it and a gotls client in front of
// that, all on loopback, and returns the client's address.
func tunnel(t *testing.T, backend func(net.Conn)) (clientAddr, serverAddr, dir string) {
	t.Helper()
	dir = t.TempDir()
	if err := writeCerts(dir, "node-2.bench.test", "127.0.0.1"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	listen := func(handle func(net.Conn)) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { defer close(done); serve(ctx, ln, handle) }()
		t.Cleanup(func() { cancel(); <-done })
		return ln.Addr().String()
	}
	backendAddr := listen(backend)
	scfg, err := serverConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	serverAddr = listen(func(c net.Conn) { serverConn(tls.Server(c, scfg), backendAddr) })
	ccfg, err := clientConfig(dir, "node-2.bench.test", true)
	if err != nil {
		t.Fatal(err)
	}
	clientAddr = listen(func(c net.Conn) { clientConn(c.(*net.TCPConn), serverAddr, ccfg) })
	return clientAddr, serverAddr, dir
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// The client half-closes first: the backend reads to EOF, then answers.
func TestClientHalfCloseFirst(t *testing.T) {
	addr, _, _ := tunnel(t, func(c net.Conn) {
		defer c.Close()
		b, _ := io.ReadAll(c)
		io.WriteString(c, strings.ToUpper(string(b)))
	})
	c := dial(t, addr)
	io.WriteString(c, "hello")
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "HELLO" {
		t.Fatalf("got %q, %v; want HELLO", got, err)
	}
}

// The backend half-closes first: the client sees EOF while its own side stays open, and
// what it sends afterwards still arrives.
func TestServerHalfCloseFirst(t *testing.T) {
	rest := make(chan string, 1)
	addr, _, _ := tunnel(t, func(c net.Conn) {
		defer c.Close()
		io.WriteString(c, "bye")
		c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		rest <- string(b)
	})
	c := dial(t, addr)
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "bye" {
		t.Fatalf("got %q, %v; want bye then EOF", got, err)
	}
	io.WriteString(c, "after")
	c.CloseWrite()
	select {
	case s := <-rest:
		if s != "after" {
			t.Fatalf("backend read %q after its half-close, want after", s)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("backend never saw the client's EOF")
	}
}

// probe passes against a server that requires a client certificate, and reports it.
func TestProbe(t *testing.T) {
	_, serverAddr, dir := tunnel(t, func(c net.Conn) {
		defer c.Close()
		if _, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		}
	})
	var out strings.Builder
	if err := probe(context.Background(), dir, serverAddr, "node-2.bench.test", &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "TLS 1.3") || !strings.Contains(out.String(), "refused") {
		t.Fatalf("probe printed %q", out.String())
	}
	if err := probe(context.Background(), dir, serverAddr, "other.bench.test", io.Discard); err == nil {
		t.Fatal("probe accepted a server certificate for another name")
	}
}
