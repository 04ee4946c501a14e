package tunnel

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
)

// A handler that takes the stream serves it itself: it reads the client's bytes, answers
// on the same stream, sees the Destination and Source as the connection's addresses, and
// Done counts what it read and wrote.
func TestTakeServesTheStream(t *testing.T) {
	m := newMesh(t)
	dst := netip.MustParseAddrPort("127.0.0.1:9080")
	type seen struct {
		local, remote string
		deadline      error
	}
	got := make(chan seen, 1)
	hb := startServer(t, m.serverConfig(reviews), HandlerFunc(func(_ context.Context, r *Request) (net.Conn, error) {
		return Take(func(c net.Conn) {
			got <- seen{c.LocalAddr().String(), c.RemoteAddr().String(), c.SetReadDeadline(time.Now())}
			br := bufio.NewReader(c)
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					break
				}
				io.WriteString(c, strings.ToUpper(line))
			}
			c.(interface{ CloseWrite() error }).CloseWrite()
		}), nil
	}))
	s := connect(t, m.pool(t), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, dst)
	io.WriteString(s, "one\ntwo\n")
	s.CloseWrite()
	b, err := io.ReadAll(s)
	if err != nil || string(b) != "ONE\nTWO\n" {
		t.Fatalf("read %q, %v", b, err)
	}
	g := <-got
	if g.local != dst.String() || g.remote != testSrc.String() {
		t.Errorf("LocalAddr %s RemoteAddr %s, want %s %s", g.local, g.remote, dst, testSrc)
	}
	if !errors.Is(g.deadline, os.ErrNoDeadline) {
		t.Errorf("SetReadDeadline = %v, want os.ErrNoDeadline", g.deadline)
	}
	eventually(t, "Done", func() bool {
		hb.mu.Lock()
		defer hb.mu.Unlock()
		return len(hb.done) == 1
	})
	if c := hb.done[0]; c.BToA != 8 || c.AToB != 8 {
		t.Errorf("Done counts %+v, want 8 bytes each way", c)
	}
}

// A serve function that returns without ending its side resets the stream: the client
// reads a reset, not a clean EOF (a reset drops what it had not read yet).
func TestTakeResetsWhenServeReturns(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), HandlerFunc(func(_ context.Context, r *Request) (net.Conn, error) {
		return Take(func(c net.Conn) {
			io.WriteString(c, "partial")
		}), nil
	}))
	s := connect(t, m.pool(t), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, netip.MustParseAddrPort("127.0.0.1:9080"))
	_, err := io.ReadAll(s)
	var reset *StreamResetError
	if !errors.As(err, &reset) {
		t.Fatalf("read error %v, want a reset", err)
	}
}
