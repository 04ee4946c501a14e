package waypoint

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
)

// h2Upstream opens HTTP/2 (prior knowledge, cleartext) connections to endpoints: one
// net/http Transport for the Proxy, whose dials go through the session that asked.
type h2Upstream struct {
	t    *http.Transport
	srv  *http2.Server
	base *http.Server
}

// sessionDial is the context value that routes a Transport dial to its session.
type sessionDial struct {
	s  *session
	up Upstream
}

type sessionDialKey struct{}

func (u *h2Upstream) init(p *Proxy) {
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	u.t = &http.Transport{
		Protocols: &protos,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			d, ok := ctx.Value(sessionDialKey{}).(*sessionDial)
			if !ok {
				return nil, errors.New("waypoint: upstream dial outside a session")
			}
			return d.s.dialCounted(d.up)
		},
		DisableCompression:     true,
		MaxResponseHeaderBytes: maxResponseHeader,
		HTTP2: &http.HTTP2Config{
			MaxReceiveBufferPerConnection: 1 << 20,
			MaxReceiveBufferPerStream:     1 << 20,
			SendPingTimeout:               30 * time.Second,
		},
	}
	u.srv = &http2.Server{
		MaxConcurrentStreams:         p.MaxStreams,
		IdleTimeout:                  p.IdleTimeout,
		MaxUploadBufferPerConnection: 1 << 20,
		MaxUploadBufferPerStream:     1 << 20,
	}
	u.base = &http.Server{
		MaxHeaderBytes: p.MaxHeaderBytes,
		ErrorLog:       slog.NewLogLogger(p.Log.Handler(), slog.LevelDebug),
	}
}

// h2Entry is a session's HTTP/2 connection to one upstream; ready is closed once the
// dial has ended.
type h2Entry struct {
	ready chan struct{}
	cc    *http.ClientConn
	err   error
}

// h2Conn returns the session's HTTP/2 connection to up, dialling it once.
func (s *session) h2Conn(up Upstream) (*http.ClientConn, error) {
	k := poolKey{up.Addr, up.Key}
	for {
		s.mu.Lock()
		if s.h2 == nil {
			s.h2 = map[poolKey]*h2Entry{}
		}
		e := s.h2[k]
		if e == nil {
			e = &h2Entry{ready: make(chan struct{})}
			s.h2[k] = e
			s.mu.Unlock()
			addr := up.Addr.String()
			if !up.Addr.IsValid() {
				addr = "upstream:80"
			}
			ctx := context.WithValue(s.ctx, sessionDialKey{}, &sessionDial{s: s, up: up})
			e.cc, e.err = s.p.h2.t.NewClientConn(ctx, "http", addr)
			close(e.ready)
			if e.err != nil {
				s.mu.Lock()
				if s.h2[k] == e {
					delete(s.h2, k)
				}
				s.mu.Unlock()
				return nil, e.err
			}
			return e.cc, nil
		}
		s.mu.Unlock()
		<-e.ready
		if e.err != nil {
			return nil, e.err
		}
		if e.cc.Err() == nil {
			return e.cc, nil
		}
		s.mu.Lock()
		if s.h2[k] == e {
			delete(s.h2, k)
		}
		s.mu.Unlock()
		e.cc.Close()
	}
}

// roundTrip sends r to up in the session's upstream protocol. An *upload is returned
// when a goroutine of ours sends r's body: the caller waits for it once done with the
// response.
func (s *session) roundTrip(r *http.Request, up Upstream) (*http.Response, *upload, error) {
	if s.upstream != ProtocolHTTP2 {
		return s.roundTripH1(r, up)
	}
	cc, err := s.h2Conn(up)
	if err != nil {
		return nil, nil, err
	}
	out := *r
	out.URL = &url.URL{Scheme: "http", Host: r.Host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery, ForceQuery: r.URL.ForceQuery}
	if out.URL.Host == "" {
		out.URL.Host = "upstream"
	}
	out.RequestURI = ""
	out.Close = false
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header["User-Agent"] = []string{""} // not Go's default
	}
	resp, err := cc.RoundTrip(&out)
	if err != nil {
		return nil, nil, err
	}
	return resp, nil, nil
}

// dialCounted dials up holding a connection slot, given back when the connection
// closes; the session closes it when it ends.
func (s *session) dialCounted(up Upstream) (net.Conn, error) {
	c, err := s.dial(up)
	if err != nil {
		return nil, err
	}
	sc := &slotConn{Conn: c, s: s}
	s.mu.Lock()
	closed := s.closed
	if !closed {
		s.live[sc] = struct{}{}
	}
	s.mu.Unlock()
	if closed {
		sc.Close()
		return nil, &dialError{errors.New("stream closed")}
	}
	return sc, nil
}

// slotConn gives its session's slot back when closed.
type slotConn struct {
	net.Conn
	s    *session
	once sync.Once
}

func (c *slotConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.s.mu.Lock()
		delete(c.s.live, c)
		c.s.mu.Unlock()
		<-c.s.slots
	})
	return err
}

func (c *slotConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// serveH2 serves a client speaking HTTP/2 with prior knowledge; br holds its preface.
func (s *session) serveH2(br *bufio.Reader) {
	s.p.h2.srv.ServeConn(&bufferedConn{Conn: s.c, r: br}, &http2.ServeConnOpts{
		Context:    s.ctx,
		BaseConfig: s.p.h2.base,
		Handler:    s,
	})
	// The server's frame reader may still be in br until it sees the close: br is left
	// to the collector.
}

// ServeHTTP proxies one HTTP/2 request.
func (s *session) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !s.enter() {
		return
	}
	defer s.leave()
	start := time.Now()
	local := func(reply *Response, flags string) {
		s.stats.record(s.rt.Labels, nil, requestProtocol(r), reply.Status, flags, "", time.Since(start))
		writeLocalH2(w, reply)
	}
	if r.Method == http.MethodConnect {
		s.logRefusal(http.StatusForbidden, "CONNECT")
		local(&Response{Status: http.StatusForbidden}, "-")
		return
	}
	u, uri, err := normalizeTarget(r.RequestURI)
	if err == nil && (r.Host == "" || !httpguts.ValidHostHeader(r.Host)) {
		err = errorf("no valid :authority")
	}
	if err != nil {
		s.logRefusal(http.StatusBadRequest, err.Error())
		local(&Response{Status: http.StatusBadRequest, Body: http.StatusText(http.StatusBadRequest)}, "-")
		return
	}
	r.URL, r.RequestURI = u, uri
	removeHopHeaders(r.Header)
	up, reply := s.decide(r)
	if reply != nil {
		local(reply, reply.Flags)
		return
	}
	resp, ul, err := s.roundTrip(r, up)
	endUpload := func() {
		if ul != nil {
			if !ul.finished() {
				r.Body.Close() // ends its wait for the client
			}
			ul.wait()
		}
	}
	if err != nil {
		endUpload()
		s.logUpstream(up, err)
		reply := upstreamFailure(err)
		writeLocalH2(w, reply)
		s.stats.record(s.rt.Labels, up.Workload, requestProtocol(r), reply.Status, reply.Flags, "", time.Since(start))
		return
	}
	flags := copyResponseH2(w, resp)
	resp.Body.Close()
	endUpload()
	s.stats.record(s.rt.Labels, up.Workload, requestProtocol(r), resp.StatusCode, flags, grpcStatus(resp), time.Since(start))
	if flags != "-" {
		panic(http.ErrAbortHandler) // resets the stream: the client sees the response cut short
	}
}

// copyResponseH2 writes an upstream response to an HTTP/2 client, trailers included. It
// returns the response flags: "-", or "UPE" when the upstream's body failed midway and
// "DC" when the client went away.
func copyResponseH2(w http.ResponseWriter, resp *http.Response) string {
	h := w.Header()
	skip := responseSkip(resp.Header)
	for k, vv := range resp.Header {
		if !skip(k) {
			h[k] = vv
		}
	}
	if resp.ContentLength >= 0 {
		h["Content-Length"] = []string{strconv.FormatInt(resp.ContentLength, 10)}
	}
	w.WriteHeader(resp.StatusCode)
	rc := http.NewResponseController(w)
	bp := copyPool.Get().(*[]byte)
	defer copyPool.Put(bp)
	buf := *bp
	pb, _ := resp.Body.(pending)
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return "DC"
			}
			if pb == nil || pb.wouldBlock() {
				rc.Flush()
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return "UPE"
		}
	}
	for k, vv := range resp.Trailer {
		h[http.TrailerPrefix+k] = vv
	}
	return "-"
}

// writeLocalH2 writes a local reply to an HTTP/2 client.
func writeLocalH2(w http.ResponseWriter, reply *Response) {
	h := w.Header()
	for k, vv := range reply.Header {
		switch strings.ToLower(k) {
		case "content-length", "connection", "transfer-encoding":
			continue
		}
		h[k] = vv
	}
	if h.Get("Content-Type") == "" {
		h.Set("Content-Type", "text/plain")
	}
	h.Set("Content-Length", strconv.Itoa(len(reply.Body)))
	w.WriteHeader(reply.Status)
	io.WriteString(w, reply.Body)
}

func (s *session) logUpstream(up Upstream, err error) {
	if s.p.Log.Enabled(s.ctx, slog.LevelDebug) {
		s.p.Log.Debug("waypoint: upstream failed", "upstream", up.Addr.String(), "err", err)
	}
}
