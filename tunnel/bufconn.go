package tunnel

import (
	"bufio"
	"net"
	"sync"
)

// sockBuf is the size of a tunnel connection's socket read buffer, and the most a corked
// write collects before it goes out anyway.
const sockBuf = 256 << 10

// bufConn batches the socket I/O under a TLS connection: a read takes whatever the
// kernel has, up to sockBuf, in one syscall (crypto/tls alone reads about a record at a
// time), and the records TLS writes while the connection is corked go out together at
// uncork (crypto/tls alone makes one syscall a record). The HTTP/2 writer corks around
// each batch of frames, so several frames and records share a write syscall.
type bufConn struct {
	net.Conn
	r *bufio.Reader

	mu     sync.Mutex // guards w and corked
	w      []byte
	corked bool
}

func newBufConn(c net.Conn) *bufConn {
	return &bufConn{Conn: c, r: bufio.NewReaderSize(c, sockBuf)}
}

func (b *bufConn) Read(p []byte) (int, error) { return b.r.Read(p) }

func (b *bufConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.corked {
		return b.Conn.Write(p)
	}
	if len(b.w)+len(p) > sockBuf && len(b.w) > 0 {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
	}
	b.w = append(b.w, p...)
	return len(p), nil
}

// cork makes writes collect until uncork.
func (b *bufConn) cork() {
	b.mu.Lock()
	b.corked = true
	b.mu.Unlock()
}

// uncork writes what collected and lets later writes through.
func (b *bufConn) uncork() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.corked = false
	return b.flushLocked()
}

func (b *bufConn) flushLocked() error {
	if len(b.w) == 0 {
		return nil
	}
	_, err := b.Conn.Write(b.w)
	b.w = b.w[:0]
	return err
}
