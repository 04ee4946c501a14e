package waypoint

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/veilmesh/veil/tunnel"
)

// Route is what the router answers for one accepted CONNECT: how to treat the stream
// and how to decide what it carries.
type Route struct {
	Protocol Protocol
	// Decide authenticates and authorizes one HTTP request and either names the upstream
	// or returns the response to send instead (401/403 from JWT or RBAC, 503 when no
	// endpoint is ready). It sees the request as it will be forwarded: the path
	// normalized (r.URL.EscapedPath() and r.URL.RequestURI() as Envoy's RBAC sees them,
	// r.URL.Path decoded), hop-by-hop headers removed. It may rewrite r.Header (JWT
	// outputs, token removal); it must not read r.Body. It is called from as many
	// goroutines as the stream has HTTP/2 requests in flight.
	Decide func(r *http.Request) (Upstream, *Response)
	// DecideTCP decides a stream that carries no HTTP (ProtocolTCP, or ProtocolAuto that
	// did not look like HTTP), returning the upstream to splice it with, or an error: the
	// stream is then reset.
	DecideTCP func() (Upstream, error)
	// Labels are the metric labels of the stream's requests.
	Labels MetricLabels
}

// Upstream names where one request (or a TCP stream) goes.
type Upstream struct {
	// Addr is the endpoint's address, for logs.
	Addr netip.AddrPort
	// Key is opaque to the proxy and handed to the Dialer. It must be comparable:
	// connections to the same (Addr, Key) are reused within a stream.
	Key any
	// Workload, when set, names the endpoint's workload in the destination_* labels of
	// the request's metrics, replacing the Route's.
	Workload *Workload
}

// Workload names a workload in metric labels.
type Workload struct {
	Name, Namespace, Principal, CanonicalService string
}

// Response is a reply the proxy sends instead of forwarding. It is written as Envoy
// writes a local reply: the status, the headers of Header, content-length, content-type
// text/plain (unless Header sets one), date, and Body verbatim.
type Response struct {
	Status int
	Body   string
	Header http.Header
	// Flags is the response_flags label of the request's metrics ("UH" when no endpoint
	// is ready, ...); empty is "-".
	Flags string
}

// A Dialer opens the connection to an upstream: an HBONE stream to the endpoint with the
// waypoint's identity, or plain TCP. It is called from many goroutines.
type Dialer func(ctx context.Context, up Upstream) (net.Conn, error)

// Defaults of Proxy's limits.
const (
	// DefaultMaxHeaderBytes is Envoy's max_request_headers_kb default, 60 KiB.
	DefaultMaxHeaderBytes = 60 << 10
	// DefaultMaxHeaderCount is Envoy's max_request_headers_count default.
	DefaultMaxHeaderCount = 100
	// DefaultMaxStreams is the HTTP/2 concurrent streams of one client, Istio's
	// waypoint setting.
	DefaultMaxStreams = 100
	// DefaultMaxUpstreamConns bounds the upstream connections of one stream.
	DefaultMaxUpstreamConns = 16
	// DefaultReadHeaderTimeout bounds the time from a request's first byte to the end
	// of its header.
	DefaultReadHeaderTimeout = 10 * time.Second
	// DefaultIdleTimeout closes a stream with no request in flight for this long,
	// Envoy's idle_timeout default.
	DefaultIdleTimeout = time.Hour
)

// Proxy is the waypoint's L7 engine: it terminates one accepted stream and proxies the
// HTTP (or TCP) it carries. Set its fields before the first Serve; the zero value is
// usable (every dial then fails: 503). Safe for concurrent use.
type Proxy struct {
	Dial    Dialer
	Log     *slog.Logger // default slog.Default()
	Metrics *Metrics     // nil: no metrics

	// MaxHeaderBytes bounds an HTTP/1.1 request's header (request line included) and
	// an HTTP/2 request's header list; beyond it the answer is 431. Default
	// DefaultMaxHeaderBytes.
	MaxHeaderBytes int
	// MaxHeaderCount bounds an HTTP/1.1 request's header lines (431 beyond). Default
	// DefaultMaxHeaderCount.
	MaxHeaderCount int
	// MaxStreams is the HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS of a client. Default
	// DefaultMaxStreams.
	MaxStreams uint32
	// MaxUpstreamConns bounds the connections to endpoints one stream holds, in use or
	// idle; a request that needs one more waits for one. Default
	// DefaultMaxUpstreamConns.
	MaxUpstreamConns int
	// ReadHeaderTimeout bounds the time from a request's first byte to the end of its
	// HTTP/1.1 header (or the HTTP/2 preface); past it the stream is closed. Default
	// DefaultReadHeaderTimeout.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes an HTTP stream that has no request in flight for this long.
	// Default DefaultIdleTimeout.
	IdleTimeout time.Duration

	initOnce sync.Once
	h2       h2Upstream
	// now is the clock of the date header of local replies (tests fix it).
	now func() time.Time
}

func (p *Proxy) init() {
	p.initOnce.Do(func() {
		if p.Log == nil {
			p.Log = slog.Default()
		}
		if p.MaxHeaderBytes <= 0 {
			p.MaxHeaderBytes = DefaultMaxHeaderBytes
		}
		if p.MaxHeaderCount <= 0 {
			p.MaxHeaderCount = DefaultMaxHeaderCount
		}
		if p.MaxStreams == 0 {
			p.MaxStreams = DefaultMaxStreams
		}
		if p.MaxUpstreamConns <= 0 {
			p.MaxUpstreamConns = DefaultMaxUpstreamConns
		}
		if p.ReadHeaderTimeout <= 0 {
			p.ReadHeaderTimeout = DefaultReadHeaderTimeout
		}
		if p.IdleTimeout <= 0 {
			p.IdleTimeout = DefaultIdleTimeout
		}
		if p.now == nil {
			p.now = time.Now
		}
		p.h2.init(p)
	})
}

// Serve proxies one accepted stream until it ends, and closes c: c is the HBONE stream
// (it reads the client's bytes). It blocks; when ctx ends the stream is closed. The
// goroutines Serve starts end with it (the frame readers of HTTP/2 connections a moment
// later, once they see their connection closed).
func (p *Proxy) Serve(ctx context.Context, c net.Conn, rt *Route) {
	p.init()
	if rt == nil {
		c.Close()
		return
	}
	s := newSession(ctx, p, c, rt)
	defer s.close()
	stop := context.AfterFunc(s.ctx, func() { c.Close() })
	defer stop()
	switch rt.Protocol {
	case ProtocolTCP:
		s.serveTCP(c)
	case ProtocolHTTP1, ProtocolHTTP2, ProtocolAuto:
		s.serveHTTP()
	default:
		p.Log.Error("waypoint: route with an unknown protocol; closing the stream", "protocol", int(rt.Protocol))
	}
}

// session is one Serve: the stream, its route, its upstream connections.
type session struct {
	p      *Proxy
	ctx    context.Context
	cancel context.CancelFunc
	c      net.Conn
	rt     *Route
	// upstream is the protocol to endpoints, set once the client's is known.
	upstream Protocol

	slots chan struct{} // a token per upstream connection held (MaxUpstreamConns)

	mu sync.Mutex // guards the fields below
	// idle are the idle HTTP/1.1 upstream connections, oldest first.
	idle []*h1Conn
	// h2 are the HTTP/2 upstream connections, one per upstream.
	h2 map[poolKey]*h2Entry
	// live are the upstream connections open, idle or in use.
	live   map[*slotConn]struct{}
	closed bool
	// handlers counts the HTTP/2 handlers running; done is signalled when one ends.
	handlers int
	done     *sync.Cond

	stats statCache
}

type poolKey struct {
	addr netip.AddrPort
	key  any
}

func newSession(ctx context.Context, p *Proxy, c net.Conn, rt *Route) *session {
	s := &session{p: p, c: c, rt: rt, slots: make(chan struct{}, p.MaxUpstreamConns), live: map[*slotConn]struct{}{}}
	s.ctx, s.cancel = context.WithCancel(ctx)
	s.done = sync.NewCond(&s.mu)
	s.stats.m = p.Metrics
	return s
}

// close ends the session: it closes the stream and every upstream connection (which
// ends the requests in flight), then waits for the HTTP/2 handlers still running.
func (s *session) close() {
	s.cancel()
	s.c.Close()
	s.mu.Lock()
	s.closed = true
	live := make([]*slotConn, 0, len(s.live))
	for c := range s.live {
		live = append(live, c)
	}
	s.mu.Unlock()
	for _, c := range live {
		c.Close()
	}
	s.mu.Lock()
	for s.handlers > 0 {
		s.done.Wait()
	}
	idle := s.idle
	s.idle = nil
	h2 := s.h2
	s.h2 = nil
	s.mu.Unlock()
	for _, uc := range idle {
		uc.close()
	}
	for _, e := range h2 {
		<-e.ready
		if e.cc != nil {
			e.cc.Close()
		}
	}
}

// enter registers an HTTP/2 handler; false once the session is closing.
func (s *session) enter() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.handlers++
	return true
}

func (s *session) leave() {
	s.mu.Lock()
	s.handlers--
	s.done.Broadcast()
	s.mu.Unlock()
}

// acquire takes an upstream connection slot, closing idle connections to make room,
// and waiting for one while every slot is in use.
func (s *session) acquire() error {
	for {
		select {
		case s.slots <- struct{}{}:
			return nil
		default:
		}
		if s.evictIdle() {
			continue
		}
		select {
		case s.slots <- struct{}{}:
			return nil
		case <-s.ctx.Done():
			return s.ctx.Err()
		case <-time.After(50 * time.Millisecond): // an HTTP/2 connection may have gone idle
		}
	}
}

// evictIdle closes the oldest idle connection, HTTP/1.1 first; false if there is none.
func (s *session) evictIdle() bool {
	s.mu.Lock()
	if len(s.idle) > 0 {
		uc := s.idle[0]
		s.idle = s.idle[1:]
		s.mu.Unlock()
		uc.close()
		return true
	}
	for k, e := range s.h2 {
		select {
		case <-e.ready:
		default:
			continue
		}
		if e.cc != nil && e.cc.InFlight() == 0 {
			delete(s.h2, k)
			s.mu.Unlock()
			e.cc.Close() // its slotConn gives the slot back
			return true
		}
	}
	s.mu.Unlock()
	return false
}

// dial opens a connection to up, holding a slot for it: the caller gives it back.
func (s *session) dial(up Upstream) (net.Conn, error) {
	if err := s.acquire(); err != nil {
		return nil, &dialError{err}
	}
	if s.p.Dial == nil {
		<-s.slots
		return nil, &dialError{errors.New("no dialer")}
	}
	c, err := s.p.Dial(s.ctx, up)
	if err != nil {
		<-s.slots
		return nil, &dialError{err}
	}
	return c, nil
}

// dialError is a failure to reach the upstream: 503 no healthy upstream.
type dialError struct{ err error }

func (e *dialError) Error() string { return "dial: " + e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// Envoy's local replies for upstream failures.
var (
	replyNoUpstream = &Response{Status: http.StatusServiceUnavailable, Body: "no healthy upstream", Flags: "UF"}
	replyReset      = &Response{Status: http.StatusServiceUnavailable, Body: "upstream connect error or disconnect/reset before headers. reset reason: connection termination", Flags: "UC"}
	replyInternal   = &Response{Status: http.StatusInternalServerError, Body: "Internal Server Error"}
)

// upstreamFailure is the local reply for a round trip that failed before a response.
func upstreamFailure(err error) *Response {
	var de *dialError
	var he *headerError
	switch {
	case errors.As(err, &de):
		return replyNoUpstream
	case errors.As(err, &he):
		return replyInternal
	}
	return replyReset
}

// serveTCP decides the stream as TCP and splices it with the upstream. c may be a
// bufferedConn holding bytes already read.
func (s *session) serveTCP(c net.Conn) {
	if s.rt.DecideTCP == nil {
		s.p.Log.Error("waypoint: TCP route without DecideTCP; closing the stream")
		return
	}
	up, err := s.rt.DecideTCP()
	if err != nil {
		if s.p.Log.Enabled(s.ctx, slog.LevelDebug) {
			s.p.Log.Debug("waypoint: TCP stream refused", "source", s.c.RemoteAddr().String(), "err", err)
		}
		resetConn(s.c)
		return
	}
	uc, err := s.dial(up)
	if err != nil {
		s.p.Log.Debug("waypoint: TCP upstream unreachable", "upstream", up.Addr.String(), "err", err)
		resetConn(s.c)
		return
	}
	defer func() { <-s.slots }()
	tunnel.Join(c, uc)
}

// resetConn closes c with a reset where it can (TCP RST; a stream is reset by Close).
func resetConn(c net.Conn) {
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		l.SetLinger(0)
	}
	c.Close()
}

// serveHTTP finds the client's protocol (and, for ProtocolAuto, whether it is HTTP at
// all) from its first bytes, then serves it.
func (s *session) serveHTTP() {
	br := getReader(s.c)
	w := newWatchdog(s.c, s.p.IdleTimeout)
	defer w.stop()
	kind, err := sniff(br, s.rt.Protocol == ProtocolAuto, w, s.p.ReadHeaderTimeout)
	if err != nil {
		putReader(br)
		return
	}
	switch kind {
	case ProtocolTCP:
		w.stop()
		// br holds the bytes read so far: it stays the stream's reader.
		s.serveTCP(&bufferedConn{Conn: s.c, r: br})
		return
	case ProtocolHTTP2:
		s.upstream = s.rt.Protocol
		if s.upstream == ProtocolAuto {
			s.upstream = ProtocolHTTP2
		}
		w.stop()
		s.serveH2(br)
	default:
		s.upstream = s.rt.Protocol
		if s.upstream == ProtocolAuto {
			s.upstream = ProtocolHTTP1
		}
		h := &h1Server{s: s, br: br, bw: getWriter(s.c), w: w}
		h.serve()
	}
}

// sniff reads the client's first bytes: ProtocolHTTP2 for the HTTP/2 preface, else
// ProtocolHTTP1, or with auto ProtocolTCP for bytes that do not start an HTTP/1.1
// request line (Envoy's http_inspector).
func sniff(br *bufio.Reader, auto bool, w *watchdog, headerTimeout time.Duration) (Protocol, error) {
	if _, err := br.Peek(1); err != nil {
		return 0, err
	}
	w.arm(headerTimeout)
	for n := 1; ; n++ {
		b, err := br.Peek(n)
		if err != nil {
			if len(b) > 0 && (errors.Is(err, io.EOF) || errors.Is(err, bufio.ErrBufferFull)) {
				// The client's bytes end (or fill the buffer) before deciding: an
				// HTTP/1.1 parser answers what it makes of them; with auto, TCP.
				if auto && !bytes.HasPrefix([]byte(http2Preface), b) {
					return ProtocolTCP, nil
				}
				return ProtocolHTTP1, nil
			}
			return 0, err
		}
		if bytes.HasPrefix([]byte(http2Preface), b) {
			if n == len(http2Preface) {
				return ProtocolHTTP2, nil
			}
			continue
		}
		if !auto {
			return ProtocolHTTP1, nil
		}
		switch looksLikeHTTP1(b) {
		case 1:
			return ProtocolHTTP1, nil
		case -1:
			return ProtocolTCP, nil
		}
		if n < br.Buffered() {
			n = br.Buffered() - 1 // decide on what is there before waiting for more
		}
	}
}

const http2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// looksLikeHTTP1 judges the start of a stream: 1 for a complete HTTP/1.x request line,
// -1 for bytes that cannot start one, 0 when it needs more.
func looksLikeHTTP1(b []byte) int {
	i := 0
	for i < len(b) && isTokenChar(b[i]) {
		i++
	}
	if i == len(b) {
		if i > 32 {
			return -1 // no method is that long
		}
		return 0
	}
	if i == 0 || b[i] != ' ' {
		return -1
	}
	i++
	start := i
	for i < len(b) && b[i] > ' ' && b[i] < 0x7f {
		i++
	}
	if i == len(b) {
		return 0
	}
	if i == start || b[i] != ' ' {
		return -1
	}
	rest := b[i+1:]
	const v = "HTTP/1."
	if len(rest) < len(v)+3 {
		if bytes.HasPrefix([]byte(v), rest) || bytes.HasPrefix(rest, []byte(v)) {
			return 0
		}
		return -1
	}
	if string(rest[:len(v)]) != v || rest[len(v)] < '0' || rest[len(v)] > '9' || rest[len(v)+1] != '\r' || rest[len(v)+2] != '\n' {
		return -1
	}
	return 1
}

// bufferedConn is a connection whose first bytes were read into r.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// CloseWrite half-closes the underlying connection where it can.
func (c *bufferedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// watchdog closes a connection when the phase it is armed for lasts too long.
type watchdog struct {
	t *time.Timer
}

func newWatchdog(c net.Conn, d time.Duration) *watchdog {
	return &watchdog{t: time.AfterFunc(d, func() { c.Close() })}
}

func (w *watchdog) arm(d time.Duration) { w.t.Reset(d) }
func (w *watchdog) stop()               { w.t.Stop() }

// Buffers of the downstream and upstream HTTP/1.1 connections.
const ioBuf = 4 << 10

var (
	readerPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, ioBuf) }}
	writerPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, ioBuf) }}
	copyPool   = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}
)

func getReader(r io.Reader) *bufio.Reader {
	br := readerPool.Get().(*bufio.Reader)
	br.Reset(r)
	return br
}

func putReader(br *bufio.Reader) {
	br.Reset(nil)
	readerPool.Put(br)
}

func getWriter(w io.Writer) *bufio.Writer {
	bw := writerPool.Get().(*bufio.Writer)
	bw.Reset(w)
	return bw
}

func putWriter(bw *bufio.Writer) {
	bw.Reset(nil)
	writerPool.Put(bw)
}

// Hop-by-hop headers (RFC 9110 7.6.1), removed by a proxy, and the client-certificate
// header Envoy sanitizes by default.
var hopHeaders = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Te", "Transfer-Encoding", "Upgrade"}

// removeHopHeaders deletes the hop-by-hop headers of h and the headers its Connection
// header names. A "TE: trailers" is kept (gRPC needs it end to end).
func removeHopHeaders(h http.Header) {
	for _, v := range h["Connection"] {
		for _, tok := range splitTokens(v) {
			if tok != "" && !httpEqualFold(tok, "te") {
				delete(h, http.CanonicalHeaderKey(tok))
			}
		}
	}
	te := h["Te"]
	for _, k := range hopHeaders {
		delete(h, k)
	}
	for _, v := range te {
		for _, tok := range splitTokens(v) {
			if httpEqualFold(tok, "trailers") {
				h["Te"] = []string{"trailers"}
			}
		}
	}
}

// splitTokens splits a comma-separated header value into its trimmed elements.
func splitTokens(v string) []string {
	var out []string
	for len(v) > 0 {
		var tok string
		if i := strings.IndexByte(v, ','); i >= 0 {
			tok, v = v[:i], v[i+1:]
		} else {
			tok, v = v, ""
		}
		out = append(out, trimOWS(tok))
	}
	return out
}

func trimOWS(s string) string {
	for len(s) > 0 && (s[0] == ' ' || s[0] == '\t') {
		s = s[1:]
	}
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		s = s[:len(s)-1]
	}
	return s
}

// httpEqualFold is ASCII case-insensitive equality.
func httpEqualFold(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

func hasToken(vs []string, tok string) bool {
	for _, v := range vs {
		for _, t := range splitTokens(v) {
			if httpEqualFold(t, tok) {
				return true
			}
		}
	}
	return false
}

// prepareRequest sets what the proxy adds to a request before Decide: the headers of
// Envoy's connection manager (x-forwarded-proto and x-request-id when absent; an
// x-forwarded-client-cert from the client is removed, Envoy's SANITIZE default).
// x-forwarded-for is left as sent: Istio's waypoint sets use_remote_address false, so
// Envoy does not append the client address.
func prepareRequest(h http.Header) {
	delete(h, "X-Forwarded-Client-Cert")
	if _, ok := h["X-Forwarded-Proto"]; !ok {
		h["X-Forwarded-Proto"] = []string{"http"}
	}
	if _, ok := h["X-Request-Id"]; !ok {
		h["X-Request-Id"] = []string{newRequestID()}
	}
}

// validResponse fixes a Decide reply that could not be sent as is.
// decide prepares r as it will be forwarded and asks the route: the upstream, or the
// local reply to send instead (a Route without Decide answers 500).
func (s *session) decide(r *http.Request) (Upstream, *Response) {
	prepareRequest(r.Header)
	if s.rt.Decide == nil {
		return Upstream{}, replyInternal
	}
	up, reply := s.rt.Decide(r)
	if reply != nil {
		reply = validResponse(reply)
	}
	return up, reply
}

func validResponse(r *Response) *Response {
	if r.Status < 200 || r.Status > 999 {
		return replyInternal
	}
	return r
}

func (s *session) logRefusal(status int, reason string) {
	if s.p.Log.Enabled(s.ctx, slog.LevelDebug) {
		s.p.Log.Debug("waypoint: request refused", "source", s.c.RemoteAddr().String(), "status", status, "reason", reason)
	}
}

func errorf(format string, args ...any) error { return fmt.Errorf("waypoint: "+format, args...) }

// newRequestID returns a random (version 4) UUID, as Envoy's x-request-id.
func newRequestID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	var out [36]byte
	const hexd = "0123456789abcdef"
	j := 0
	for i, v := range b {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			out[j] = '-'
			j++
		}
		out[j], out[j+1] = hexd[v>>4], hexd[v&15]
		j += 2
	}
	return string(out[:])
}
