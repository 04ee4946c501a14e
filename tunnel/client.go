package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Key identifies a pooled tunnel connection: streams share a connection only when they
// have the same source identity, destination identity and destination address.
type Key struct {
	Src, Dst spiffeid.ID
	// Addr is the HBONE endpoint dialled: the destination workload's ip:15008.
	Addr netip.AddrPort
}

func (k Key) String() string { return fmt.Sprintf("%s->%s@%s", k.Src, k.Dst, k.Addr) }

// Target is what one CONNECT asks for.
type Target struct {
	// Authority is the destination as the original client dialled it (ip:port).
	Authority netip.AddrPort
	// Source is the original client address, sent as Forwarded for="ip:port".
	Source netip.AddrPort
	// Host, when set, is the Service host name the client dialled, sent as Forwarded
	// ;host= (for logs at the other end; it selects nothing there).
	Host string
	// Baggage, when set, is sent as the baggage header (W3C), as ztunnel does: the source
	// workload's k8s.namespace.name, k8s.deployment.name, service.name, ...
	Baggage string
}

// Pool is the HBONE client. It multiplexes streams over TLS connections it dials and
// keeps, per Key: at most MaxStreams streams a connection (or fewer, when the server says
// so), a new connection when all are full, a connection with no stream closed after
// IdleTimeout, keepalive pings, a dead or going-away connection replaced. A connection
// takes no new stream once a certificate its handshake presented or verified has
// expired: the next stream opens a connection with the certificates and trust bundle in
// force, so a renewed certificate and a rotated root reach pooled traffic too; the old
// connection's streams go on, and it closes when they have ended. Set the fields before first use; safe for concurrent use.
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
	// ResponseTimeout bounds the wait for the server's answer to a CONNECT (the server
	// dials the destination meanwhile). Default 15s.
	ResponseTimeout time.Duration
	// StreamWindow and ConnWindow are the receive windows granted to servers. Default 4
	// MiB and 16 MiB, as ztunnel.
	StreamWindow, ConnWindow int32
	// SourceBudget bounds the connection windows granted across all connections of one
	// source identity: the bytes the destinations may have in flight toward that source's
	// pods that it has not read yet. Default 64 MiB.
	SourceBudget int64
	Log          *slog.Logger

	initOnce sync.Once
	budget   *budget

	mu sync.Mutex // guards the fields below
	// entries holds each key's connections and its dial in flight.
	entries map[Key]*poolEntry
	closed  bool
	wg      sync.WaitGroup // connections' read loops, waited for by Close
}

type poolEntry struct {
	conns   []*h2Conn
	dialing *pendingDial // nil when no dial is in flight
}

type pendingDial struct {
	done chan struct{}
	err  error
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
		if p.ResponseTimeout <= 0 {
			p.ResponseTimeout = 15 * time.Second
		}
		if p.StreamWindow <= 0 {
			p.StreamWindow = defaultStreamWindow
		}
		if p.ConnWindow <= 0 {
			p.ConnWindow = defaultConnWindow
		}
		if p.SourceBudget <= 0 {
			p.SourceBudget = 64 << 20
		}
		if p.Dial == nil {
			p.Dial = (&net.Dialer{}).DialContext
		}
		if p.Log == nil {
			p.Log = slog.Default()
		}
		p.budget = newBudget(p.SourceBudget)
		p.entries = make(map[Key]*poolEntry)
	})
}

// Connect opens a CONNECT stream to authority through a connection for k, with Forwarded
// carrying src. See Open.
func (p *Pool) Connect(ctx context.Context, k Key, authority, src netip.AddrPort) (*Stream, error) {
	return p.Open(ctx, k, Target{Authority: authority, Source: src})
}

// Open opens a CONNECT stream for t through a connection for k. It sends Forwarded,
// baggage and traceparent as ztunnel does, and blocks until the server answers: a status
// other than 200 is a *StatusError (401 denied, 503 unreachable). ctx bounds the setup
// only; the stream lives until closed. A stream the server refused without processing it
// (REFUSED_STREAM, GOAWAY) is retried on another connection.
func (p *Pool) Open(ctx context.Context, k Key, t Target) (*Stream, error) {
	p.init()
	fwd := FormatForwarded(t.Source)
	if t.Host != "" {
		fwd += ";host=" + quoteForwarded(t.Host)
	}
	fields := []hpack.HeaderField{
		{Name: ":method", Value: http.MethodConnect},
		{Name: ":authority", Value: FormatAuthority(t.Authority)},
		{Name: "forwarded", Value: fwd},
		{Name: "traceparent", Value: newTraceparent()},
	}
	if t.Baggage != "" {
		fields = append(fields, hpack.HeaderField{Name: "baggage", Value: t.Baggage})
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		c, err := p.get(ctx, k)
		if err != nil {
			return nil, err
		}
		s, err := c.openStream(fields)
		if errors.Is(err, errConnFull) || errors.Is(err, ErrConnClosed) {
			lastErr = err
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("hbone: connect %s via %s: %w", t.Authority, k, err)
		}
		err = p.await(ctx, s)
		if errors.Is(err, errRefused) {
			lastErr = err
			continue
		}
		if err != nil {
			s.Close()
			var se *StatusError
			if errors.As(err, &se) {
				se.Err = fmt.Errorf("connect %s via %s", t.Authority, k)
				return nil, se
			}
			return nil, fmt.Errorf("hbone: connect %s via %s: %w", t.Authority, k, err)
		}
		return s, nil
	}
	return nil, fmt.Errorf("hbone: connect %s via %s: %w", t.Authority, k, lastErr)
}

// await waits for the response to a CONNECT.
func (p *Pool) await(ctx context.Context, s *Stream) error {
	timer := time.NewTimer(p.ResponseTimeout)
	defer timer.Stop()
	select {
	case <-s.respReady:
	case <-timer.C:
		return fmt.Errorf("no response in %v", p.ResponseTimeout)
	case <-ctx.Done():
		return ctx.Err()
	}
	s.c.mu.Lock()
	status, err := s.status, s.err
	s.c.mu.Unlock()
	if status == 0 {
		if err == nil {
			err = ErrConnClosed
		}
		return err
	}
	if status != http.StatusOK {
		return &StatusError{Code: status}
	}
	return nil
}

// get returns a connection for k with room for a stream, dialling one when needed.
func (p *Pool) get(ctx context.Context, k Key) (*h2Conn, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrPoolClosed
		}
		e := p.entries[k]
		if e == nil {
			e = &poolEntry{}
			p.entries[k] = e
		}
		var pick *h2Conn
		for _, c := range e.conns {
			if c.canTake() {
				pick = c
				break
			}
		}
		if pick != nil {
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

		c, err := p.dial(ctx, k)

		p.mu.Lock()
		e.dialing = nil
		d.err = err
		close(d.done)
		if err == nil {
			if p.closed {
				err = ErrPoolClosed
				p.mu.Unlock()
				c.close(ErrPoolClosed)
				c.wait()
				return nil, err
			}
			e.conns = append(e.conns, c)
		}
		p.mu.Unlock()
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}

// dial opens a TLS connection for k. It is bounded by ConnectTimeout, not by the
// caller's ctx: other callers may be waiting for the same connection.
func (p *Pool) dial(ctx context.Context, k Key) (*h2Conn, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.ConnectTimeout)
	defer cancel()
	cfg, err := p.TLSConfig(ctx, k)
	if err != nil {
		return nil, fmt.Errorf("hbone: tls config for %s: %w", k, err)
	}
	cfg, presented := recordClientCertificate(cfg)
	raw, err := p.Dial(ctx, "tcp", k.Addr.String())
	if err != nil {
		return nil, fmt.Errorf("hbone: dial %s: %w", k, err)
	}
	sock := newBufConn(raw)
	tc := tls.Client(sock, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("hbone: handshake with %s: %w", k, err)
	}
	if tc.ConnectionState().NegotiatedProtocol != http2.NextProtoTLS {
		tc.Close()
		return nil, fmt.Errorf("hbone: %s did not negotiate ALPN h2", k)
	}
	var expires time.Time
	if peer := tc.ConnectionState().PeerCertificates; len(peer) > 0 {
		expires = peer[0].NotAfter
	}
	if local := presented(); !local.IsZero() && (expires.IsZero() || local.Before(expires)) {
		expires = local
	}
	window, release := p.budget.reserve(k.Src.String(), int64(p.ConnWindow))
	c := newH2Conn(tc, h2Config{
		maxStreams:   uint32(p.MaxStreams),
		streamWindow: p.StreamWindow,
		connWindow:   int32(window),
		keepAlive:    p.KeepAlive,
		idleTimeout:  p.IdleTimeout,
		expires:      expires,
		release:      release,
		onClose:      func(c *h2Conn) { p.forget(k, c) },
		log:          p.Log,
	})
	c.sock = sock
	if err := c.start(); err != nil {
		c.wait()
		return nil, fmt.Errorf("hbone: http2 with %s: %w", k, err)
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		c.wait()
	}()
	return c, nil
}

// recordClientCertificate returns cfg (a copy, when it changes it) and a function that
// reports the expiry of the client certificate the handshake presented (zero if none).
func recordClientCertificate(cfg *tls.Config) (*tls.Config, func() time.Time) {
	var notAfter time.Time
	leafExpiry := func(c *tls.Certificate) time.Time {
		if c == nil || len(c.Certificate) == 0 {
			return time.Time{}
		}
		leaf := c.Leaf
		if leaf == nil {
			var err error
			if leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
				return time.Time{}
			}
		}
		return leaf.NotAfter
	}
	if get := cfg.GetClientCertificate; get != nil {
		cfg = cfg.Clone()
		cfg.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := get(cri)
			if err == nil {
				notAfter = leafExpiry(c)
			}
			return c, err
		}
		// Read after the handshake, which wrote it in this goroutine.
		return cfg, func() time.Time { return notAfter }
	}
	if len(cfg.Certificates) > 0 {
		notAfter = leafExpiry(&cfg.Certificates[0])
	}
	return cfg, func() time.Time { return notAfter }
}

// forget drops a closed connection from its key (and the key when it has none left).
func (p *Pool) forget(k Key, c *h2Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.entries[k]
	if e == nil {
		return
	}
	for i, x := range e.conns {
		if x == c {
			e.conns = append(e.conns[:i], e.conns[i+1:]...)
			break
		}
	}
	if len(e.conns) == 0 && e.dialing == nil {
		delete(p.entries, k)
	}
}

// Conns returns the number of live pooled connections for k that take new streams.
func (p *Pool) Conns(k Key) int {
	p.init()
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	if e := p.entries[k]; e != nil {
		for _, c := range e.conns {
			if c.usable() {
				n++
			}
		}
	}
	return n
}

// Close closes every pooled connection, with their streams, and waits for their
// goroutines. Later Connects fail.
func (p *Pool) Close() error {
	p.init()
	p.mu.Lock()
	p.closed = true
	var all []*h2Conn
	for _, e := range p.entries {
		all = append(all, e.conns...)
	}
	p.mu.Unlock()
	for _, c := range all {
		c.close(ErrPoolClosed)
	}
	p.wg.Wait()
	return nil
}

// budget shares a byte budget among the connections of one identity: each connection
// reserves its receive window from it, at least the protocol's 64 KiB.
type budget struct {
	limit int64
	mu    sync.Mutex
	used  map[string]int64
}

func newBudget(limit int64) *budget { return &budget{limit: limit, used: map[string]int64{}} }

// reserve grants up to want bytes to one more connection of key and returns the grant
// and the function that gives it back.
func (b *budget) reserve(key string, want int64) (int64, func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	got := min(want, b.limit-b.used[key])
	if got < initialWindow {
		got = initialWindow
	}
	b.used[key] += got
	var once sync.Once
	return got, func() {
		once.Do(func() {
			b.mu.Lock()
			defer b.mu.Unlock()
			if b.used[key] -= got; b.used[key] <= 0 {
				delete(b.used, key)
			}
		})
	}
}

// quoteForwarded quotes a Forwarded parameter value (RFC 7239 §4) when it is not a
// token; quotes and backslashes inside are dropped (a DNS name has none).
func quoteForwarded(v string) string {
	v = strings.NewReplacer(`"`, "", `\`, "").Replace(v)
	for _, r := range v {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '-' || r == '_') {
			return `"` + v + `"`
		}
	}
	return v
}
