package tunnel

import (
	"errors"
	"net"
	"sync"
	"syscall"
	"testing"
)

// flakyListener fails its first Accepts as a listener out of file descriptors does.
type flakyListener struct {
	net.Listener
	mu    sync.Mutex
	fails int
}

func (f *flakyListener) Accept() (net.Conn, error) {
	f.mu.Lock()
	if f.fails > 0 {
		f.fails--
		f.mu.Unlock()
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	f.mu.Unlock()
	return f.Listener.Accept()
}

func TestAcceptLoopSurvivesTransientErrors(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := &flakyListener{Listener: l, fails: 3}
	accepted := make(chan net.Conn, 1)
	var reported []error
	done := make(chan error, 1)
	go func() {
		done <- AcceptLoop(fl, func(c net.Conn) { accepted <- c }, func(err error) { reported = append(reported, err) })
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	(<-accepted).Close()
	l.Close()
	if err := <-done; err != nil {
		t.Fatalf("AcceptLoop after Close: %v", err)
	}
	if len(reported) != 3 || !errors.Is(reported[0], syscall.EMFILE) {
		t.Fatalf("reported %v, want the 3 EMFILE errors", reported)
	}
}
