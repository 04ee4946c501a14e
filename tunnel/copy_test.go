package tunnel

import (
	"fmt"
	"io"
	"net"
	"testing"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	ch := make(chan net.Conn, 1)
	go func() { c, _ := lis.Accept(); ch <- c }()
	a, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-ch
	t.Cleanup(func() { a.Close(); b.Close() })
	return a.(*net.TCPConn), b.(*net.TCPConn)
}

// TestJoinTCPHalfClose joins two plain TCP legs (the splice path): client -> [proxy] ->
// server. The client's FIN reaches the server, whose reply still reaches the client.
func TestJoinTCPHalfClose(t *testing.T) {
	client, proxyIn := tcpPair(t)
	proxyOut, server := tcpPair(t)
	done := make(chan Counts, 1)
	go func() {
		c, err := Join(proxyIn, proxyOut)
		if err != nil {
			t.Error(err)
		}
		done <- c
	}()
	go func() {
		n, _ := io.Copy(io.Discard, server)
		fmt.Fprintf(server, "got %d", n)
		server.CloseWrite()
	}()
	fmt.Fprint(client, "0123456789")
	client.CloseWrite()
	reply, err := io.ReadAll(client)
	if err != nil || string(reply) != "got 10" {
		t.Fatalf("reply %q, %v", reply, err)
	}
	c := <-done
	if c.AToB != 10 || c.BToA != 6 {
		t.Fatalf("counts %+v, want 10 and 6", c)
	}
}

// TestJoinResetAbortsBothSides: a leg that fails takes the other down with it.
func TestJoinResetAbortsBothSides(t *testing.T) {
	client, proxyIn := tcpPair(t)
	proxyOut, server := tcpPair(t)
	done := make(chan struct{})
	go func() { Join(proxyIn, proxyOut); close(done) }()
	server.SetLinger(0)
	server.Close() // RST
	<-done
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Fatal("client still connected after the server reset")
	}
}
