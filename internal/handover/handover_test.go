package handover

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Two listening sockets cross to a successor: it accepts on them, the offering side is
// told once, and connections queued in between are not lost.
func TestHandOverListeners(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "agent.sock")
	var ls []net.Listener
	for range 2 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
	}
	taken := make(chan struct{})
	o, err := NewOffer(path, func() ([]Listener, error) {
		var out []Listener
		for i, l := range ls {
			f, err := l.(*net.TCPListener).File()
			if err != nil {
				return nil, err
			}
			out = append(out, Listener{Name: []string{"a", "b"}[i], File: f})
		}
		return out, nil
	}, func() { close(taken) })
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v; want 0600", st.Mode(), err)
	}
	offerWait = 100 * time.Millisecond
	if _, err := NewOffer(path, nil, nil); err == nil {
		t.Fatal("a second offer on a live socket was allowed")
	}
	// A connection that arrives while the sockets change hands waits in the backlog.
	c, err := net.Dial("tcp", ls[1].Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, err := Take(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-taken:
	case <-time.After(5 * time.Second):
		t.Fatal("the offering side was not told")
	}
	for _, l := range ls {
		l.Close() // the predecessor lets go; the sockets live on in the successor
	}
	if len(got) != 2 || got[0].Name != "a" || got[1].Name != "b" {
		t.Fatalf("took %+v", got)
	}
	nl, err := net.FileListener(got[1].File)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	got[1].File.Close()
	got[0].File.Close()
	c.Write([]byte("hi"))
	s, err := nl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	b := make([]byte, 2)
	if _, err := io.ReadFull(s, b); err != nil || string(b) != "hi" {
		t.Fatalf("read %q, %v", b, err)
	}
}

func TestTakeWithoutPredecessor(t *testing.T) {
	if _, err := Take(context.Background(), filepath.Join(t.TempDir(), "none.sock")); !errors.Is(err, ErrNoPredecessor) {
		t.Fatalf("Take: %v, want ErrNoPredecessor", err)
	}
}

func TestLockIsExclusive(t *testing.T) {
	dir := t.TempDir()
	l, err := Acquire(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := Acquire(ctx, dir); err == nil {
		t.Fatal("a second holder got the lock")
	}
	l.Release()
	l2, err := Acquire(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	l2.Release()
}
