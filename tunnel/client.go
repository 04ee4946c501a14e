package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
)

// Key identifies a pooled tunnel connection: streams share a connection only when they
// have the same source identity, destination identity and destination address.
type Key struct {
	Src, Dst spiffeid.ID
	// Addr is the HBONE endpoint dialled: the destination workload's ip:15008.
	Addr netip.AddrPort
}

func (k Key) String() string { return fmt.Sprintf("%s->%s@%s", k.Src, k.Dst, k.Addr) }

// Pool is the HBONE client. It multiplexes streams over TLS connections it dials and
// keeps, per Key: at most MaxStreams streams a connection, a new connection when all
// are full, idle connections closed after IdleTimeout, keepalive pings, and a
// connection that fails evicted. Set the fields before first use; safe for concurrent
// use.
type Pool struct {
	// TLSConfig returns the client configuration for a key: the source's certificate,
	// the destination identity to expect (identity.ClientConfig). Required.
	TLSConfig func(ctx context.Context, k Key) (*tls.Config, error)
	// Dial opens the TCP connection to k.Addr. Default a net.Dialer. The agent's dialer
	// marks its sockets so the capture lets them through.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// MaxStreams per connection. Default 100.
	MaxStreams int
	// IdleTimeout closes a connection that has carried no stream for this long.
	// Default 5m.
	IdleTimeout time.Duration
	// KeepAlive pings a connection that has been silent this long, and drops it when
	// the ping is not answered in 10s. Default 30s.
	KeepAlive time.Duration
	// ConnectTimeout bounds dialling and the TLS handshake. Default 10s.
	ConnectTimeout time.Duration

	initOnce sync.Once
	t        *http2.Transport

	mu sync.Mutex // guards the fields below
	// entries holds each key's connections and its dial in flight.
	entries map[Key]*poolEntry
	closed  bool
}

type poolEntry struct {
	conns   []*poolConn
	dialing *pendingDial // nil when no dial is in flight
}

type pendingDial struct {
	done chan struct{}
	err  error
}

type poolConn struct {
	cc *http2.ClientConn
	// streams is the number of open streams, guarded by Pool.mu.
	streams int
}

// ErrPoolClosed is returned by Connect after Close.
var ErrPoolClosed = errors.New("hbone: pool closed")

func (p *Pool) init() {
	p.initOnce.Do(func() {
		if p.MaxStreams <= 0 {
			p.MaxStreams = 100
		}
		if p.IdleTimeout <= 0 {
			p.IdleTimeout = 5 * time.Minute
		}
		if p.KeepAlive <= 0 {
			p.KeepAlive = 30 * time.Second
		}
		if p.ConnectTimeout <= 0 {
			p.ConnectTimeout = 10 * time.Second
		}
		if p.Dial == nil {
			p.Dial = (&net.Dialer{}).DialContext
		}
		// The transport's receive windows are already 4 MiB a stream and 1 GiB a
		// connection; it is used only through NewClientConn, never its own pool.
		p.t = &http2.Transport{
			IdleConnTimeout:  p.IdleTimeout,
			ReadIdleTimeout:  p.KeepAlive,
			PingTimeout:      10 * time.Second,
			MaxReadFrameSize: 1 << 20,
		}
		p.entries = make(map[Key]*poolEntry)
	})
}

// Connect opens a CONNECT stream to authority (the destination ip:port) through a
// connection for k, with Forwarded carrying src. It blocks until the server answers:
// a status other than 200 is a *StatusError (401 denied, 503 unreachable). ctx bounds
// the setup only; the stream lives until closed.
func (p *Pool) Connect(ctx context.Context, k Key, authority, src netip.AddrPort) (*Stream, error) {
	p.init()
	pc, err := p.get(ctx, k)
	if err != nil {
		return nil, err
	}
	pr, pw := io.Pipe()
	// The stream outlives ctx: it gets its own context, cancelled by Close, and by ctx
	// only until the server has answered.
	sctx, cancel := context.WithCancel(context.Background())
	stop := context.AfterFunc(ctx, cancel)
	req := (&http.Request{
		Method:        http.MethodConnect,
		URL:           &url.URL{Host: authority.String()},
		Host:          authority.String(),
		Header:        http.Header{"Forwarded": {FormatForwarded(src)}},
		Body:          pr,
		ContentLength: -1,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
	}).WithContext(sctx)
	resp, err := pc.cc.RoundTrip(req)
	stopped := stop()
	if err != nil {
		cancel()
		pw.Close()
		if ctx.Err() != nil {
			p.release(pc, false)
			return nil, fmt.Errorf("hbone: connect %s via %s: %w", authority, k, ctx.Err())
		}
		// A failed round trip means a broken connection: evict it.
		p.release(pc, true)
		return nil, fmt.Errorf("hbone: connect %s via %s: %w", authority, k, err)
	}
	if !stopped {
		// ctx ended just as the answer came: the stream's context is cancelled.
		resp.Body.Close()
		pw.Close()
		p.release(pc, false)
		return nil, fmt.Errorf("hbone: connect %s via %s: %w", authority, k, ctx.Err())
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		pw.Close()
		cancel()
		p.release(pc, false)
		return nil, &StatusError{Code: resp.StatusCode, Err: fmt.Errorf("connect %s via %s", authority, k)}
	}
	return &Stream{pool: p, pc: pc, body: resp.Body, pw: pw, cancel: cancel}, nil
}

// get returns a connection for k with room for a stream, reserving the stream.
func (p *Pool) get(ctx context.Context, k Key) (*poolConn, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrPoolClosed
		}
		e := p.entries[k]
		if e == nil {
			p.sweepLocked()
			e = &poolEntry{}
			p.entries[k] = e
		}
		live := e.conns[:0]
		var pick *poolConn
		for _, pc := range e.conns {
			st := pc.cc.State()
			if st.Closed || st.Closing {
				continue // idle-closed, went away, or failed
			}
			live = append(live, pc)
			if pick == nil && pc.streams < p.MaxStreams && pc.cc.CanTakeNewRequest() {
				pick = pc
			}
		}
		clear(e.conns[len(live):])
		e.conns = live
		if pick != nil {
			pick.streams++
			p.mu.Unlock()
			return pick, nil
		}
		if d := e.dialing; d != nil {
			// Someone is already dialling this key: wait for that connection.
			p.mu.Unlock()
			select {
			case <-d.done:
				if d.err != nil {
					return nil, d.err
				}
				continue
			case <-ctx.Done():
				return nil, fmt.Errorf("hbone: waiting for a connection to %s: %w", k, ctx.Err())
			}
		}
		d := &pendingDial{done: make(chan struct{})}
		e.dialing = d
		p.mu.Unlock()

		pc, err := p.dial(ctx, k)

		p.mu.Lock()
		e.dialing = nil
		d.err = err
		close(d.done)
		if err == nil {
			if p.closed {
				err = ErrPoolClosed
				pc.cc.Close()
			} else {
				pc.streams++
				e.conns = append(e.conns, pc)
			}
		}
		p.mu.Unlock()
		if err != nil {
			return nil, err
		}
		return pc, nil
	}
}

// sweepLocked drops the entries of keys whose connections have all closed (idle, gone
// away) and that no one is dialling, so the map does not grow with every pod that ever
// talked. It runs when a new key arrives, which is rare next to streams. p.mu is held.
func (p *Pool) sweepLocked() {
	for k, e := range p.entries {
		if e.dialing != nil {
			continue
		}
		live := false
		for _, pc := range e.conns {
			if st := pc.cc.State(); !st.Closed && !st.Closing {
				live = true
				break
			}
		}
		if !live {
			delete(p.entries, k)
		}
	}
}

// dial opens a TLS connection for k. It is bounded by ConnectTimeout, not by the
// caller's ctx: other callers may be waiting for the same connection.
func (p *Pool) dial(ctx context.Context, k Key) (*poolConn, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.ConnectTimeout)
	defer cancel()
	cfg, err := p.TLSConfig(ctx, k)
	if err != nil {
		return nil, fmt.Errorf("hbone: tls config for %s: %w", k, err)
	}
	raw, err := p.Dial(ctx, "tcp", k.Addr.String())
	if err != nil {
		return nil, fmt.Errorf("hbone: dial %s: %w", k, err)
	}
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("hbone: handshake with %s: %w", k, err)
	}
	if tc.ConnectionState().NegotiatedProtocol != http2.NextProtoTLS {
		tc.Close()
		return nil, fmt.Errorf("hbone: %s did not negotiate ALPN h2", k)
	}
	cc, err := p.t.NewClientConn(tc)
	if err != nil {
		tc.Close()
		return nil, fmt.Errorf("hbone: http2 with %s: %w", k, err)
	}
	return &poolConn{cc: cc}, nil
}

// release returns a stream's slot; evict drops and closes the connection.
func (p *Pool) release(pc *poolConn, evict bool) {
	p.mu.Lock()
	pc.streams--
	if evict {
		for _, e := range p.entries {
			for i, c := range e.conns {
				if c == pc {
					e.conns = append(e.conns[:i], e.conns[i+1:]...)
					break
				}
			}
		}
	}
	p.mu.Unlock()
	if evict {
		pc.cc.Close()
	}
}

// Conns returns the number of live pooled connections for k.
func (p *Pool) Conns(k Key) int {
	p.init()
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	if e := p.entries[k]; e != nil {
		for _, pc := range e.conns {
			if st := pc.cc.State(); !st.Closed && !st.Closing {
				n++
			}
		}
	}
	return n
}

// Close closes every pooled connection, with their streams. Later Connects fail.
func (p *Pool) Close() error {
	p.init()
	p.mu.Lock()
	p.closed = true
	var all []*poolConn
	for _, e := range p.entries {
		all = append(all, e.conns...)
	}
	p.entries = map[Key]*poolEntry{}
	p.mu.Unlock()
	for _, pc := range all {
		pc.cc.Close()
	}
	return nil
}

// Stream is the client's end of a CONNECT stream: a connection to the destination.
// CloseWrite sends END_STREAM (the destination sees a FIN); Close resets the stream.
// Read and Write may be called concurrently with each other.
type Stream struct {
	pool   *Pool
	pc     *poolConn
	body   io.ReadCloser
	pw     *io.PipeWriter
	cancel context.CancelFunc
	once   sync.Once
}

func (s *Stream) Read(p []byte) (int, error) { return s.body.Read(p) }

func (s *Stream) Write(p []byte) (int, error) { return s.pw.Write(p) }

// CloseWrite half-closes the stream.
func (s *Stream) CloseWrite() error { return s.pw.Close() }

// Close ends both directions and frees the stream's slot in its connection.
func (s *Stream) Close() error {
	s.once.Do(func() {
		s.pw.CloseWithError(net.ErrClosed)
		s.body.Close()
		s.cancel()
		s.pool.release(s.pc, false)
	})
	return nil
}
