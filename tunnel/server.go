package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
)

// Flow-control windows, as ztunnel sizes them: a stream may have 4 MiB in flight, a
// connection 16 MiB.
const (
	streamWindow = 4 << 20
	connWindow   = 16 << 20
)

// Request is one CONNECT stream as the server received it.
type Request struct {
	// Peer is the client's SPIFFE ID, from its certificate.
	Peer spiffeid.ID
	// Source is the original client address from the Forwarded header.
	Source netip.AddrPort
	// Destination is the :authority, the address the original client dialled.
	Destination netip.AddrPort
	// Local and Remote are the tunnel connection's own addresses.
	Local, Remote netip.AddrPort
}

// A Handler decides a CONNECT stream. It returns the upstream connection to splice the
// stream with, or an error: Denied (401), Unreachable (503) or any other error (503).
type Handler interface {
	Connect(ctx context.Context, req *Request) (net.Conn, error)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req *Request) (net.Conn, error)

// Connect implements Handler.
func (f HandlerFunc) Connect(ctx context.Context, req *Request) (net.Conn, error) {
	return f(ctx, req)
}

// Server is the HBONE server. Set its fields, then call Serve; Close stops it.
type Server struct {
	// TLSConfig must require and verify client certificates, TLS 1.3, ALPN h2:
	// identity.ServerConfig builds one.
	TLSConfig *tls.Config
	Handler   Handler
	// Done, when set, is called as each accepted stream ends, with the bytes moved:
	// AToB from the upstream to the client, BToA from the client to the upstream.
	Done func(req *Request, c Counts, err error)
	// HandshakeTimeout bounds the TLS handshake. Default 10s.
	HandshakeTimeout time.Duration
	Log              *slog.Logger

	initOnce sync.Once
	h2       *http2.Server
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	mu sync.Mutex // guards the fields below
	// conns are the live tunnel connections, closed by Close.
	conns     map[net.Conn]struct{}
	listeners map[net.Listener]struct{}
	closed    bool
}

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("hbone: server closed")

func (s *Server) init() {
	s.initOnce.Do(func() {
		s.h2 = &http2.Server{
			MaxUploadBufferPerConnection: connWindow,
			MaxUploadBufferPerStream:     streamWindow,
			MaxConcurrentStreams:         1000,
			ReadIdleTimeout:              30 * time.Second,
			PingTimeout:                  10 * time.Second,
		}
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.conns = make(map[net.Conn]struct{})
		s.listeners = make(map[net.Listener]struct{})
		if s.HandshakeTimeout <= 0 {
			s.HandshakeTimeout = 10 * time.Second
		}
		if s.Log == nil {
			s.Log = slog.Default()
		}
	})
}

// Serve accepts tunnel connections on lis until Close; it blocks and returns
// ErrServerClosed after Close.
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

// Close stops every listener and connection and waits for their goroutines.
func (s *Server) Close() error {
	s.init()
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.Close()
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
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

type connInfo struct {
	peer          spiffeid.ID
	local, remote netip.AddrPort
}

type connInfoKey struct{}

func (s *Server) serveConn(c net.Conn) {
	tc := tls.Server(c, s.TLSConfig)
	ctx, cancel := context.WithTimeout(s.ctx, s.HandshakeTimeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		s.Log.Debug("hbone: handshake failed", "remote", c.RemoteAddr().String(), "err", err)
		return
	}
	cs := tc.ConnectionState()
	if cs.NegotiatedProtocol != http2.NextProtoTLS || len(cs.PeerCertificates) == 0 {
		s.Log.Debug("hbone: refused: need ALPN h2 and a client certificate", "remote", c.RemoteAddr().String())
		return
	}
	peer, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		s.Log.Debug("hbone: refused: client certificate has no SPIFFE ID", "remote", c.RemoteAddr().String(), "err", err)
		return
	}
	info := &connInfo{peer: peer, local: addrPort(c.LocalAddr()), remote: addrPort(c.RemoteAddr())}
	s.h2.ServeConn(tc, &http2.ServeConnOpts{
		Context: context.WithValue(s.ctx, connInfoKey{}, info),
		Handler: http.HandlerFunc(s.serveStream),
	})
}

func (s *Server) serveStream(w http.ResponseWriter, r *http.Request) {
	info := r.Context().Value(connInfoKey{}).(*connInfo)
	req, err := parseConnect(r, info)
	if err != nil {
		s.Log.Debug("hbone: bad request", "peer", info.peer.String(), "err", err)
		http.Error(w, err.Error(), StatusCode(err))
		return
	}
	up, err := s.Handler.Connect(r.Context(), req)
	if err != nil {
		code := StatusCode(err)
		w.WriteHeader(code)
		if s.Done != nil {
			s.Done(req, Counts{}, err)
		}
		return
	}
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil {
		up.Close()
		if s.Done != nil {
			s.Done(req, Counts{}, err)
		}
		return
	}
	c, err := Join(up, &serverStream{body: r.Body, w: w, rc: rc})
	if s.Done != nil {
		s.Done(req, c, err)
	}
}

// parseConnect checks a request is a well-formed HBONE CONNECT and that its authority
// is the address the client dialled.
func parseConnect(r *http.Request, info *connInfo) (*Request, error) {
	if r.Method != http.MethodConnect {
		return nil, badRequest("method %s, want CONNECT", r.Method)
	}
	if r.Header.Get(":protocol") != "" {
		return nil, badRequest("extended CONNECT is not HBONE")
	}
	dst, err := netip.ParseAddrPort(r.Host)
	if err != nil {
		return nil, badRequest("authority %q is not ip:port: %v", r.Host, err)
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if dst.Port() == 0 {
		return nil, badRequest("authority %q has port 0", r.Host)
	}
	if dst.Addr() != info.local.Addr() {
		return nil, badRequest("authority %s is not the dialled address %s", dst.Addr(), info.local.Addr())
	}
	fwd := r.Header.Values("Forwarded")
	if len(fwd) != 1 {
		return nil, badRequest("want one Forwarded header, got %d", len(fwd))
	}
	src, err := ParseForwarded(fwd[0])
	if err != nil {
		return nil, badRequest("%v", err)
	}
	return &Request{Peer: info.peer, Source: src, Destination: dst, Local: info.local, Remote: info.remote}, nil
}

// serverStream is the server's end of a CONNECT stream as a connection.
//
// net/http ends a response only when its handler returns, and then resets a request
// body still being sent. So CloseWrite cannot send END_STREAM by itself: the handler
// returns (and END_STREAM goes out) once both directions are done. A client that
// half-closes first, the common case, sees every byte and the FIN in order; when the
// destination half-closes first, the client sees the FIN only after it half-closes too.
type serverStream struct {
	body io.ReadCloser
	w    http.ResponseWriter
	rc   *http.ResponseController
}

func (s *serverStream) Read(p []byte) (int, error) { return s.body.Read(p) }

func (s *serverStream) Write(p []byte) (int, error) {
	n, err := s.w.Write(p)
	if err != nil {
		return n, err
	}
	return n, s.rc.Flush()
}

func (s *serverStream) CloseWrite() error { return nil }

func (s *serverStream) Close() error { return s.body.Close() }

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
