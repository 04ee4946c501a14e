package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
)

// Request is one CONNECT stream as the server received it.
type Request struct {
	// Peer is the client's SPIFFE ID, from its certificate.
	Peer spiffeid.ID
	// Source is the original client address: the Forwarded header's for= when Forwarded
	// is present, else the tunnel connection's own peer address (Remote).
	Source netip.AddrPort
	// Forwarded reports whether Source came from a Forwarded header. The handler must
	// check that Source belongs to Peer either way.
	Forwarded bool
	// Host is Forwarded's ;host= (the Service the client dialled), for logs and metrics
	// only: it never selects a Service or a policy.
	Host string
	// Baggage and TraceParent are the W3C headers, as sent, for logs only.
	Baggage, TraceParent string
	// Destination is the :authority, the address the original client dialled.
	Destination netip.AddrPort
	// Local and Remote are the tunnel connection's own addresses.
	Local, Remote netip.AddrPort
}

// A Handler decides a CONNECT stream. It returns the upstream connection to splice the
// stream with (or Take, to serve the stream itself), or an error: Denied (401),
// Unreachable (503) or any other error (503).
type Handler interface {
	Connect(ctx context.Context, req *Request) (net.Conn, error)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req *Request) (net.Conn, error)

// Connect implements Handler.
func (f HandlerFunc) Connect(ctx context.Context, req *Request) (net.Conn, error) {
	return f(ctx, req)
}

// Server is the HBONE server. Set its fields, then call Serve; Shutdown or Close stops it.
type Server struct {
	// TLSConfig must require and verify client certificates, TLS 1.3, ALPN h2:
	// identity.ServerConfig builds one.
	TLSConfig *tls.Config
	Handler   Handler
	// Done, when set, is called as each accepted stream ends, with the bytes moved:
	// AToB from the upstream to the client, BToA from the client to the upstream.
	Done func(req *Request, c Counts, err error)
	// HandshakeTimeout bounds the TLS handshake and the HTTP/2 preface. Default 10s.
	HandshakeTimeout time.Duration
	// MaxStreams is the MAX_CONCURRENT_STREAMS of each connection. Default 1000.
	MaxStreams uint32
	// IdleTimeout closes a connection with no open stream for this long. Default 10m.
	IdleTimeout time.Duration
	// KeepAlive pings a connection silent this long and closes it when the ping is not
	// answered in 10s. Default 30s.
	KeepAlive time.Duration
	// StreamWindow and ConnWindow are the receive windows granted to clients. Default 4
	// MiB and 16 MiB, as ztunnel.
	StreamWindow, ConnWindow int32
	// PeerBudget bounds the connection windows granted across all connections of one
	// peer identity: the bytes it may have in flight that the destinations have not read
	// yet. Default 64 MiB.
	PeerBudget int64
	// AnyDestination accepts a CONNECT whose :authority is not the address the tunnel was
	// dialled at: a waypoint's, where it names the original destination (a Service
	// address, or a pod's). The handler must then decide which destinations it serves.
	AnyDestination bool
	Log            *slog.Logger

	initOnce sync.Once
	budget   *budget
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	mu sync.Mutex // guards the fields below
	// conns are the live tunnel connections (nil *h2Conn while the handshake runs).
	conns     map[net.Conn]*h2Conn
	listeners map[net.Listener]struct{}
	closed    bool
}

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("hbone: server closed")

func (s *Server) init() {
	s.initOnce.Do(func() {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.conns = make(map[net.Conn]*h2Conn)
		s.listeners = make(map[net.Listener]struct{})
		if s.HandshakeTimeout <= 0 {
			s.HandshakeTimeout = 10 * time.Second
		}
		if s.MaxStreams == 0 {
			s.MaxStreams = 1000
		}
		if s.IdleTimeout <= 0 {
			s.IdleTimeout = 10 * time.Minute
		}
		if s.KeepAlive <= 0 {
			s.KeepAlive = 30 * time.Second
		}
		if s.StreamWindow <= 0 {
			s.StreamWindow = defaultStreamWindow
		}
		if s.ConnWindow <= 0 {
			s.ConnWindow = defaultConnWindow
		}
		if s.PeerBudget <= 0 {
			s.PeerBudget = 64 << 20
		}
		s.budget = newBudget(s.PeerBudget)
		if s.Log == nil {
			s.Log = slog.Default()
		}
	})
}

// Serve accepts tunnel connections on lis until Close; it blocks and returns
// ErrServerClosed after Close or Shutdown.
func (s *Server) Serve(lis net.Listener) error {
	s.init()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[lis] = struct{}{}
	s.mu.Unlock()
	err := AcceptLoop(lis, func(c net.Conn) {
		if !s.track(c) {
			c.Close()
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			s.serveConn(c)
		}()
	}, func(err error) {
		s.Log.Error("hbone: accept failed; retrying", "addr", lis.Addr().String(), "err", err)
	})
	s.mu.Lock()
	delete(s.listeners, lis)
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("hbone: accept: %w", err)
	}
	return ErrServerClosed
}

// Shutdown stops accepting, sends GOAWAY on every connection (clients open new streams
// elsewhere; open streams go on), and waits until the open streams have ended or ctx
// ends; then it closes what is left, as Close.
func (s *Server) Shutdown(ctx context.Context) error {
	s.init()
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	var live []*h2Conn
	for _, c := range s.conns {
		if c != nil {
			live = append(live, c)
		}
	}
	s.mu.Unlock()
	for _, c := range live {
		c.shutdown()
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		s.mu.Lock()
		n := len(s.conns)
		s.mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-ctx.Done():
			s.Close()
			return ctx.Err()
		case <-tick.C:
		}
	}
	return s.Close()
}

// Close stops every listener and connection and waits for their goroutines.
func (s *Server) Close() error {
	s.init()
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for nc, c := range s.conns {
		if c != nil {
			c.close(ErrServerClosed)
		} else {
			nc.Close()
		}
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return nil
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = nil
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

type connInfo struct {
	peer           spiffeid.ID
	local, remote  netip.AddrPort
	anyDestination bool
}

func (s *Server) serveConn(nc net.Conn) {
	sock := newBufConn(nc)
	tc := tls.Server(sock, s.TLSConfig)
	ctx, cancel := context.WithTimeout(s.ctx, s.HandshakeTimeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		s.Log.Debug("hbone: handshake failed", "remote", nc.RemoteAddr().String(), "err", err)
		return
	}
	cs := tc.ConnectionState()
	if cs.NegotiatedProtocol != http2.NextProtoTLS || len(cs.PeerCertificates) == 0 {
		s.Log.Debug("hbone: refused: need ALPN h2 and a client certificate", "remote", nc.RemoteAddr().String())
		return
	}
	peer, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		s.Log.Debug("hbone: refused: client certificate has no SPIFFE ID", "remote", nc.RemoteAddr().String(), "err", err)
		return
	}
	tc.SetReadDeadline(time.Now().Add(s.HandshakeTimeout))
	if err := readPreface(tc); err != nil {
		s.Log.Debug("hbone: refused", "remote", nc.RemoteAddr().String(), "err", err)
		return
	}
	tc.SetReadDeadline(time.Time{})
	info := &connInfo{peer: peer, local: addrPort(nc.LocalAddr()), remote: addrPort(nc.RemoteAddr()), anyDestination: s.AnyDestination}
	window, release := s.budget.reserve(peer.String(), int64(s.ConnWindow))
	c := newH2Conn(tc, h2Config{
		server:       true,
		maxStreams:   s.MaxStreams,
		streamWindow: s.StreamWindow,
		connWindow:   int32(window),
		keepAlive:    s.KeepAlive,
		idleTimeout:  s.IdleTimeout,
		release:      release,
		onStream:     func(st *Stream) { s.serveStream(st, info) },
		log:          s.Log,
	})
	c.sock = sock
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		release()
		return
	}
	s.conns[nc] = c
	s.mu.Unlock()
	if err := c.start(); err != nil {
		c.wait()
		return
	}
	select {
	case <-c.done:
	case <-s.ctx.Done():
		c.close(ErrServerClosed)
	}
	c.wait()
}

func (s *Server) serveStream(st *Stream, info *connInfo) {
	req, err := parseConnect(st, info)
	if err != nil {
		s.Log.Debug("hbone: bad request", "peer", info.peer.String(), "err", err)
		st.respond(StatusCode(err))
		return
	}
	// The handler's context ends when the stream does (reset, connection gone) or the
	// server closes.
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	stop := context.AfterFunc(ctxOf(st), cancel)
	up, err := s.Handler.Connect(ctx, req)
	stop()
	if err != nil {
		st.respond(StatusCode(err))
		if s.Done != nil {
			s.Done(req, Counts{}, err)
		}
		return
	}
	if err := st.respond(http.StatusOK); err != nil {
		up.Close()
		st.Close()
		if s.Done != nil {
			s.Done(req, Counts{}, err)
		}
		return
	}
	if t, ok := up.(*taken); ok {
		sc := &streamConn{Stream: st, local: net.TCPAddrFromAddrPort(req.Destination), remote: net.TCPAddrFromAddrPort(req.Source)}
		t.serve(sc)
		sc.Close()
		if s.Done != nil {
			s.Done(req, Counts{AToB: sc.written.Load(), BToA: sc.read.Load()}, nil)
		}
		return
	}
	c, err := Join(up, st)
	if s.Done != nil {
		s.Done(req, c, err)
	}
}

// Take is what a Handler returns from Connect to serve the accepted stream itself
// instead of naming a connection to splice it with (an L7 proxy terminating the
// stream). The server sends the 200, then calls serve, in the stream's goroutine, with
// the stream as a net.Conn: Read and Write carry the tunnelled bytes, CloseWrite sends
// END_STREAM, Close resets the stream unless both directions have ended, LocalAddr is
// the Destination and RemoteAddr the Source; deadlines are not supported
// (os.ErrNoDeadline). serve owns the connection until it returns; the server closes it
// then, and Done reports the bytes serve read (BToA) and wrote (AToB). When the 200
// cannot be sent, serve is not called. The value Take returns is a marker for the
// Server only: its methods other than Close are not to be called.
func Take(serve func(c net.Conn)) net.Conn { return &taken{serve: serve} }

type taken struct {
	net.Conn // nil: never used
	serve    func(net.Conn)
}

func (*taken) Close() error { return nil }

// streamConn is a server stream handed to a Take handler.
type streamConn struct {
	*Stream
	local, remote net.Addr
	read, written atomic.Int64
}

func (c *streamConn) Read(p []byte) (int, error) {
	n, err := c.Stream.Read(p)
	c.read.Add(int64(n))
	return n, err
}

func (c *streamConn) Write(p []byte) (int, error) {
	n, err := c.Stream.Write(p)
	c.written.Add(int64(n))
	return n, err
}

func (c *streamConn) LocalAddr() net.Addr  { return c.local }
func (c *streamConn) RemoteAddr() net.Addr { return c.remote }

func (*streamConn) SetDeadline(time.Time) error      { return os.ErrNoDeadline }
func (*streamConn) SetReadDeadline(time.Time) error  { return os.ErrNoDeadline }
func (*streamConn) SetWriteDeadline(time.Time) error { return os.ErrNoDeadline }

// ctxOf is a context that ends when the stream is forgotten (reset, ended, connection
// closed).
func ctxOf(st *Stream) context.Context { return endedContext{st.ended} }

type endedContext struct{ ch chan struct{} }

func (endedContext) Deadline() (time.Time, bool) { return time.Time{}, false }
func (e endedContext) Done() <-chan struct{}     { return e.ch }
func (e endedContext) Err() error {
	select {
	case <-e.ch:
		return context.Canceled
	default:
		return nil
	}
}
func (endedContext) Value(any) any { return nil }

// parseConnect checks a stream's request is a well-formed HBONE CONNECT and that its
// authority is the address the client dialled.
func parseConnect(st *Stream, info *connInfo) (*Request, error) {
	if st.headersTooBig {
		return nil, badRequest("header list over %d bytes", maxHeaderList)
	}
	var method, authority string
	var fwd []string
	req := &Request{Peer: info.peer, Local: info.local, Remote: info.remote}
	for _, hf := range st.fields {
		switch hf.Name {
		case ":method":
			method = hf.Value
		case ":authority":
			authority = hf.Value
		case ":protocol":
			return nil, badRequest("extended CONNECT is not HBONE")
		case ":path", ":scheme":
			return nil, badRequest("CONNECT with %s", hf.Name)
		case "forwarded":
			fwd = append(fwd, hf.Value)
		case "baggage":
			req.Baggage = hf.Value
		case "traceparent":
			req.TraceParent = hf.Value
		}
	}
	if method != http.MethodConnect {
		return nil, badRequest("method %q, want CONNECT", method)
	}
	dst, err := netip.ParseAddrPort(authority)
	if err != nil {
		return nil, badRequest("authority %q is not ip:port: %v", authority, err)
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if dst.Port() == 0 {
		return nil, badRequest("authority %q has port 0", authority)
	}
	if dst.Addr() != info.local.Addr() && !info.anyDestination {
		return nil, badRequest("authority %s is not the dialled address %s", dst.Addr(), info.local.Addr())
	}
	req.Destination = dst
	switch len(fwd) {
	case 0:
		// Istio's Go dialer sends none; ztunnel's server accepts that. The source is the
		// tunnel's own peer, which the handler checks against the peer identity.
		req.Source = info.remote
	case 1:
		src, host, err := parseForwarded(fwd[0])
		if err != nil {
			return nil, badRequest("%v", err)
		}
		req.Source, req.Host, req.Forwarded = src, host, true
	default:
		return nil, badRequest("%d Forwarded headers, want at most one", len(fwd))
	}
	return req, nil
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
