package tunnel

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// This file is a small HTTP/2 endpoint that speaks only what HBONE needs: CONNECT streams
// carrying bytes, in both roles. It owns its streams, so END_STREAM goes out the moment a
// side half-closes (net/http's server ends a response only when its handler returns), and
// it owns its flow control, so window credit goes back to the peer only as bytes leave
// toward the destination.
//
// Goroutines: one read loop per connection; writers write DATA and flush queued control
// frames themselves under wmu. The read loop never writes: the frames it must send (SETTINGS
// and PING acknowledgements, RST_STREAM, GOAWAY) are queued and flushed by a short-lived
// flusher goroutine, so a read loop can never block on a peer that does not read, and two
// agents pushing bulk data at each other cannot deadlock.

// Limits of the endpoint. The windows are ztunnel's.
const (
	defaultStreamWindow = 4 << 20
	defaultConnWindow   = 16 << 20
	initialWindow       = 65535 // RFC 9113 §6.9.2
	maxReadFrame        = 256 << 10
	maxHeaderList       = 16 << 10
	// maxContinuations bounds the CONTINUATION frames of one header block: a CONNECT
	// request fits in one frame; a flood of empty ones (CVE-2024-27316) ends the
	// connection.
	maxContinuations = 16
	// maxCtrlQueue bounds the control frames waiting to be written: a peer that makes us
	// answer (PING, SETTINGS) faster than it reads the answers is cut off.
	maxCtrlQueue = 256 << 10
	// Rate limit of frames that cost us work and the peer nothing (RST_STREAM, PING,
	// SETTINGS, empty DATA, refused streams, PRIORITY): a token bucket, refilled at
	// ctrlRate a second up to ctrlBurst. Exhausting it ends the connection with
	// ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487; PING and SETTINGS floods).
	ctrlRate  = 1000
	ctrlBurst = 2000
	// chunkSize is the unit of receive buffers, pooled.
	chunkSize = 32 << 10
	// writeChunk is the most one DATA write takes from the windows at once, so one
	// stream cannot hold the connection's writer for long.
	writeChunk = 256 << 10
)

var chunkPool = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

// ErrConnClosed is returned by stream calls once the HBONE connection is gone.
var ErrConnClosed = errors.New("hbone: connection closed")

// StreamResetError is a stream ended by RST_STREAM, from the peer or from this side.
type StreamResetError struct {
	Code   http2.ErrCode
	Remote bool // the peer reset it
}

func (e *StreamResetError) Error() string {
	who := "locally"
	if e.Remote {
		who = "by the peer"
	}
	return fmt.Sprintf("hbone: stream reset %s (%v)", who, e.Code)
}

// errRefused is a stream the peer never processed (REFUSED_STREAM, or beyond its GOAWAY):
// safe to retry on another connection.
var errRefused = errors.New("hbone: stream refused by the peer")

// errConnFull is returned when a connection cannot take another stream.
var errConnFull = errors.New("hbone: connection cannot take a new stream")

type h2Config struct {
	server bool
	// maxStreams is the MAX_CONCURRENT_STREAMS a server advertises, and the streams a
	// client opens at most on one connection.
	maxStreams uint32
	// streamWindow and connWindow are the receive windows granted to the peer.
	streamWindow, connWindow int32
	// keepAlive pings a connection silent this long; pingTimeout closes it when the ping
	// is not answered in time.
	keepAlive, pingTimeout time.Duration
	// idleTimeout closes a connection with no open stream for this long.
	idleTimeout time.Duration
	// expires, when set, is when a client connection stops taking new streams: the
	// earliest expiry of the certificates of its handshake. Its streams go on; once it has
	// none it closes.
	expires time.Time
	// onStream is called, in its own goroutine, for each stream a client opens (server).
	onStream func(*Stream)
	// onClose is called once when the connection has closed.
	onClose func(*h2Conn)
	// release, when set, gives back the connection window reserved for it (budget).
	release func()
	log     *slog.Logger
}

// h2Conn is one HTTP/2 connection over an established TLS connection.
type h2Conn struct {
	nc  net.Conn
	cfg h2Config
	// sock, when set, is the buffered socket under nc (TLS), corked around writes.
	sock *bufConn

	// Read loop only.
	fr        *http2.Framer
	hdec      *hpack.Decoder
	hblock    []byte
	hfields   []hpack.HeaderField
	hpending  uint32 // stream of the header block being read, 0 if none
	hend      bool   // END_STREAM on the HEADERS frame of hpending
	hconts    int
	tokens    float64
	tokensAt  time.Time
	sawPrefix bool // the peer's first frame (SETTINGS) arrived

	// wmu serializes writes to nc: whoever holds it flushes the queued control frames,
	// then its own DATA.
	wmu  sync.Mutex
	wbuf []byte

	// ctrlMu guards the queue of encoded control frames and the hpack encoder; HEADERS are
	// encoded here too so streams open in increasing id order on the wire.
	ctrlMu   sync.Mutex
	ctrl     bytes.Buffer
	ctrlFr   *http2.Framer
	henc     *hpack.Encoder
	hbuf     bytes.Buffer
	flushing bool
	nextID   uint32 // client: the next stream id

	mu sync.Mutex // guards the fields below and every Stream's state
	// streams are the open streams.
	streams map[uint32]*Stream
	// lastPeerID is the highest stream id the peer opened (server).
	lastPeerID   uint32
	sendWindow   int64 // connection send window
	peerInitWin  int64
	peerMaxFrame uint32
	peerMaxStr   uint32
	recvWindow   int64 // what the peer may still send on the connection
	recvUnacked  int64 // consumed, not yet announced
	handlers     int   // server: stream goroutines still running, reset streams included
	goAwaySent   bool
	goAwayRecv   bool
	goAwayLast   uint32
	closed       bool
	closeErr     error
	idleTimer    *time.Timer
	lastRecv     time.Time
	pingSent     time.Time
	keepTimer    *time.Timer

	wg   sync.WaitGroup // the read loop and flushers
	done chan struct{}
}

func newH2Conn(nc net.Conn, cfg h2Config) *h2Conn {
	if cfg.streamWindow <= 0 {
		cfg.streamWindow = defaultStreamWindow
	}
	if cfg.connWindow < initialWindow {
		cfg.connWindow = initialWindow
	}
	if cfg.maxStreams == 0 {
		cfg.maxStreams = 100
	}
	if cfg.pingTimeout <= 0 {
		cfg.pingTimeout = 10 * time.Second
	}
	if cfg.log == nil {
		cfg.log = slog.Default()
	}
	c := &h2Conn{
		nc:           nc,
		cfg:          cfg,
		streams:      make(map[uint32]*Stream),
		sendWindow:   initialWindow,
		peerInitWin:  initialWindow,
		peerMaxFrame: 16384,
		peerMaxStr:   cfg.maxStreams,
		recvWindow:   int64(cfg.connWindow),
		nextID:       1,
		tokens:       ctrlBurst,
		tokensAt:     time.Now(),
		lastRecv:     time.Now(),
		done:         make(chan struct{}),
	}
	c.fr = http2.NewFramer(nil, nc)
	c.fr.SetReuseFrames()
	c.fr.SetMaxReadFrameSize(maxReadFrame)
	c.hdec = hpack.NewDecoder(4096, nil)
	c.hdec.SetMaxStringLength(maxHeaderList)
	c.ctrlFr = http2.NewFramer(&c.ctrl, nil)
	c.henc = hpack.NewEncoder(&c.hbuf)
	return c
}

// start writes the connection preface (client) and SETTINGS, then runs the read loop.
// The server must have read the client's preface already.
func (c *h2Conn) start() error {
	var pre []byte
	if !c.cfg.server {
		pre = []byte(http2.ClientPreface)
	}
	settings := []http2.Setting{
		{ID: http2.SettingInitialWindowSize, Val: uint32(c.cfg.streamWindow)},
		{ID: http2.SettingMaxFrameSize, Val: maxReadFrame},
		{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderList},
	}
	if c.cfg.server {
		settings = append(settings, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.cfg.maxStreams})
	} else {
		settings = append(settings, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	}
	c.ctrlMu.Lock()
	c.ctrlFr.WriteSettings(settings...)
	if c.cfg.connWindow > initialWindow {
		c.ctrlFr.WriteWindowUpdate(0, uint32(c.cfg.connWindow-initialWindow))
	}
	c.ctrlMu.Unlock()
	c.wmu.Lock()
	c.wbuf = append(c.wbuf[:0], pre...)
	err := c.flushLocked(nil)
	c.wmu.Unlock()
	if err != nil {
		c.close(err)
		return err
	}
	c.mu.Lock()
	if c.cfg.keepAlive > 0 {
		c.keepTimer = time.AfterFunc(c.cfg.keepAlive, c.keepAliveTick)
	}
	c.armIdleLocked()
	c.mu.Unlock()
	c.wg.Add(1)
	go c.readLoop()
	return nil
}

// --- writing ---

// flushLocked writes the queued control frames, then wbuf's existing content, then data
// as DATA frames of stream id (END_STREAM on the last when end). wmu is held.
func (c *h2Conn) flushLocked(data *dataWrite) error {
	c.ctrlMu.Lock()
	if c.ctrl.Len() > 0 {
		c.wbuf = append(c.wbuf, c.ctrl.Bytes()...)
		c.ctrl.Reset()
	}
	c.ctrlMu.Unlock()
	if data != nil {
		c.appendData(data)
	}
	if len(c.wbuf) == 0 {
		return nil
	}
	if c.sock != nil {
		c.sock.cork()
	}
	_, err := c.nc.Write(c.wbuf)
	if c.sock != nil {
		if uerr := c.sock.uncork(); err == nil {
			err = uerr
		}
	}
	c.wbuf = c.wbuf[:0]
	if cap(c.wbuf) > 2*writeChunk {
		c.wbuf = nil // a burst of control frames does not pin memory
	}
	if err != nil {
		return fmt.Errorf("hbone: write: %w", err)
	}
	return nil
}

type dataWrite struct {
	id  uint32
	p   []byte
	end bool
	max uint32 // frame size
}

func (c *h2Conn) appendData(d *dataWrite) {
	p := d.p
	for {
		n := min(len(p), int(d.max))
		var flags byte
		if d.end && n == len(p) {
			flags = byte(http2.FlagDataEndStream)
		}
		c.wbuf = append(c.wbuf, byte(n>>16), byte(n>>8), byte(n), byte(http2.FrameData), flags,
			byte(d.id>>24)&0x7f, byte(d.id>>16), byte(d.id>>8), byte(d.id))
		c.wbuf = append(c.wbuf, p[:n]...)
		p = p[n:]
		if len(p) == 0 {
			return
		}
	}
}

// writeData writes DATA synchronously (the window was reserved by the caller).
func (c *h2Conn) writeData(d *dataWrite) error {
	c.wmu.Lock()
	err := c.flushLocked(d)
	c.wmu.Unlock()
	if err != nil {
		c.close(err)
		return err
	}
	c.kickIfQueued()
	return nil
}

// flushNow writes the queued control frames from a goroutine that may block (not the
// read loop).
func (c *h2Conn) flushNow() error {
	c.wmu.Lock()
	err := c.flushLocked(nil)
	c.wmu.Unlock()
	if err != nil {
		c.close(err)
	}
	return err
}

// queue encodes a control frame with fn under ctrlMu, for the next flush. It reports
// false when the queue is over its bound (the peer does not read).
func (c *h2Conn) queue(fn func(fr *http2.Framer)) bool {
	c.ctrlMu.Lock()
	fn(c.ctrlFr)
	over := c.ctrl.Len() > maxCtrlQueue
	c.ctrlMu.Unlock()
	if over {
		// Callers may hold c.mu: closing the socket ends the read loop, which closes
		// the connection.
		c.cfg.log.Debug("hbone: peer does not read its control frames; closing", "remote", c.nc.RemoteAddr().String())
		c.nc.Close()
		return false
	}
	return true
}

// kick flushes the control queue in the background: the read loop's way to write.
func (c *h2Conn) kick() {
	c.ctrlMu.Lock()
	if c.flushing || c.ctrl.Len() == 0 {
		c.ctrlMu.Unlock()
		return
	}
	c.flushing = true
	c.ctrlMu.Unlock()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			if c.flushNow() != nil {
				c.ctrlMu.Lock()
				c.flushing = false
				c.ctrl.Reset()
				c.ctrlMu.Unlock()
				return
			}
			c.ctrlMu.Lock()
			if c.ctrl.Len() == 0 {
				c.flushing = false
				c.ctrlMu.Unlock()
				return
			}
			c.ctrlMu.Unlock()
		}
	}()
}

// kickIfQueued covers frames queued while a writer held wmu and had already flushed.
func (c *h2Conn) kickIfQueued() {
	c.ctrlMu.Lock()
	pending := c.ctrl.Len() > 0 && !c.flushing
	c.ctrlMu.Unlock()
	if pending {
		c.kick()
	}
}

// --- connection lifecycle ---

// close ends the connection: every stream fails with err, the socket closes. Safe to call
// more than once and from any goroutine.
func (c *h2Conn) close(err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	if err == nil {
		err = ErrConnClosed
	}
	c.closeErr = err
	streams := make([]*Stream, 0, len(c.streams))
	for _, s := range c.streams {
		streams = append(streams, s)
	}
	for _, s := range streams {
		s.failLocked(ErrConnClosed)
	}
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	if c.keepTimer != nil {
		c.keepTimer.Stop()
	}
	c.mu.Unlock()
	c.nc.Close()
	close(c.done)
	if c.cfg.release != nil {
		c.cfg.release()
	}
	if c.cfg.onClose != nil {
		c.cfg.onClose(c)
	}
}

// closeWith sends GOAWAY with code, then closes.
func (c *h2Conn) closeWith(code http2.ErrCode, why string) {
	c.mu.Lock()
	last := c.lastPeerID
	c.mu.Unlock()
	c.queue(func(fr *http2.Framer) { fr.WriteGoAway(last, code, []byte(why)) })
	// Best effort, bounded: the peer may not read.
	c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	c.flushNow()
	c.close(fmt.Errorf("hbone: %s: %s", code, why))
}

// wait blocks until the read loop and flushers have ended (after close).
func (c *h2Conn) wait() { c.wg.Wait() }

// shutdown sends GOAWAY: the peer opens no new stream here, open streams finish, then the
// connection closes. It does not block.
func (c *h2Conn) shutdown() {
	c.mu.Lock()
	if c.closed || c.goAwaySent {
		c.mu.Unlock()
		return
	}
	c.goAwaySent = true
	last := c.lastPeerID
	idle := len(c.streams) == 0
	c.mu.Unlock()
	c.queue(func(fr *http2.Framer) { fr.WriteGoAway(last, http2.ErrCodeNo, nil) })
	c.kick()
	if idle {
		c.closeAfterFlush()
	}
}

// closeAfterFlush closes once the control queue is out (or a second has passed).
func (c *h2Conn) closeAfterFlush() {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.flushNow()
		c.close(nil)
	}()
}

// armIdleLocked starts the idle timer when no stream is open. c.mu is held.
func (c *h2Conn) armIdleLocked() {
	if c.cfg.idleTimeout <= 0 || c.closed {
		return
	}
	if len(c.streams) > 0 {
		if c.idleTimer != nil {
			c.idleTimer.Stop()
		}
		return
	}
	// A connection that takes no new stream (its certificates expired) is closed once
	// idle, not kept for IdleTimeout.
	wait := c.cfg.idleTimeout
	if !c.cfg.expires.IsZero() {
		wait = max(min(wait, time.Until(c.cfg.expires)), 0)
	}
	if c.idleTimer == nil {
		c.idleTimer = time.AfterFunc(wait, c.idleTick)
	} else {
		c.idleTimer.Reset(wait)
	}
}

func (c *h2Conn) idleTick() {
	c.mu.Lock()
	idle := !c.closed && len(c.streams) == 0
	c.mu.Unlock()
	if idle {
		c.shutdown()
		c.closeAfterFlush()
	}
}

func (c *h2Conn) keepAliveTick() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	now := time.Now()
	if !c.pingSent.IsZero() {
		if c.lastRecv.Before(c.pingSent) {
			c.mu.Unlock()
			c.close(errors.New("hbone: keepalive ping not answered"))
			return
		}
		c.pingSent = time.Time{}
	}
	next := c.cfg.keepAlive - now.Sub(c.lastRecv)
	if next <= 0 {
		c.pingSent = now
		next = c.cfg.pingTimeout
	}
	c.keepTimer.Reset(next)
	send := c.pingSent == now
	c.mu.Unlock()
	if send {
		var data [8]byte
		rand.Read(data[:])
		c.queue(func(fr *http2.Framer) { fr.WritePing(false, data) })
		c.kick()
	}
}

// canTake reports whether a client connection can open another stream now.
func (c *h2Conn) canTake() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.takeLocked()
}

func (c *h2Conn) takeLocked() bool {
	return !c.closed && !c.goAwayRecv && !c.goAwaySent && uint32(len(c.streams)) < min(c.peerMaxStr, c.cfg.maxStreams) && c.nextID < 1<<31-1 &&
		(c.cfg.expires.IsZero() || time.Now().Before(c.cfg.expires))
}

// usable reports whether the connection is neither closed nor going away.
func (c *h2Conn) usable() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.closed && !c.goAwayRecv && !c.goAwaySent
}

func (c *h2Conn) streamCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.streams)
}

// --- reading ---

func (c *h2Conn) readLoop() {
	defer c.wg.Done()
	err := c.readFrames()
	var ce http2.ConnectionError
	switch {
	case errors.As(err, &ce):
		c.closeWith(http2.ErrCode(ce), err.Error())
	case errors.Is(err, errCalm):
		c.closeWith(http2.ErrCodeEnhanceYourCalm, err.Error())
	default:
		c.close(err)
	}
}

var errCalm = errors.New("hbone: too many control frames, resets or refused streams")

// connError is a protocol violation that ends the connection with GOAWAY.
type connError struct {
	code http2.ErrCode
	why  string
}

func (e *connError) Error() string { return fmt.Sprintf("hbone: %v: %s", e.code, e.why) }

func (c *h2Conn) readFrames() error {
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			var ce *connError
			if errors.As(err, &ce) {
				return http2.ConnectionError(ce.code)
			}
			if se, ok := err.(http2.StreamError); ok {
				c.resetStream(se.StreamID, se.Code)
				continue
			}
			return err
		}
		c.mu.Lock()
		c.lastRecv = time.Now()
		c.mu.Unlock()
		if !c.sawPrefix {
			if _, ok := f.(*http2.SettingsFrame); !ok {
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
			c.sawPrefix = true
		}
		if c.hpending != 0 {
			cf, ok := f.(*http2.ContinuationFrame)
			if !ok {
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
			if err := c.onContinuation(cf); err != nil {
				return err
			}
			continue
		}
		switch f := f.(type) {
		case *http2.DataFrame:
			err = c.onData(f)
		case *http2.HeadersFrame:
			err = c.onHeaders(f)
		case *http2.RSTStreamFrame:
			err = c.onReset(f)
		case *http2.SettingsFrame:
			err = c.onSettings(f)
		case *http2.PingFrame:
			err = c.onPing(f)
		case *http2.GoAwayFrame:
			c.onGoAway(f)
		case *http2.WindowUpdateFrame:
			err = c.onWindowUpdate(f)
		case *http2.PushPromiseFrame:
			err = http2.ConnectionError(http2.ErrCodeProtocol)
		case *http2.ContinuationFrame:
			err = http2.ConnectionError(http2.ErrCodeProtocol)
		default: // PRIORITY and unknown frames are ignored, at a price
			err = c.spend(1)
		}
		if err != nil {
			return err
		}
	}
}

// spend takes n tokens of the control-frame budget.
func (c *h2Conn) spend(n float64) error {
	now := time.Now()
	c.tokens = min(ctrlBurst, c.tokens+now.Sub(c.tokensAt).Seconds()*ctrlRate)
	c.tokensAt = now
	c.tokens -= n
	if c.tokens < 0 {
		return errCalm
	}
	return nil
}

func (c *h2Conn) onData(f *http2.DataFrame) error {
	id := f.StreamID
	flen := int64(f.Length)
	data := f.Data()
	c.mu.Lock()
	c.recvWindow -= flen
	if c.recvWindow < 0 {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	s := c.streams[id]
	if s == nil || s.recvClosed {
		opened := id <= c.lastPeerID
		if !c.cfg.server {
			opened = id < c.nextIDLocked()
		}
		c.mu.Unlock()
		if !opened || id == 0 || c.cfg.server && id%2 == 0 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		// A stream that has ended (or that we reset): the bytes are dropped, the
		// connection's credit comes back at once.
		c.credit(nil, flen)
		if s != nil {
			c.resetStream(id, http2.ErrCodeStreamClosed)
		}
		return nil
	}
	s.recvWindow -= flen
	if s.recvWindow < 0 {
		c.mu.Unlock()
		c.credit(nil, flen)
		c.resetStream(id, http2.ErrCodeFlowControl)
		return nil
	}
	s.recv.write(data)
	pad := flen - int64(len(data))
	end := f.StreamEnded()
	if end {
		s.recvClosed = true
	}
	s.signalRead()
	if end && s.sentEnd {
		c.removeLocked(s)
	}
	c.mu.Unlock()
	if pad > 0 {
		c.credit(s, pad)
	}
	if len(data) == 0 && !end {
		return c.spend(1)
	}
	return nil
}

func (c *h2Conn) nextIDLocked() uint32 {
	c.ctrlMu.Lock()
	defer c.ctrlMu.Unlock()
	return c.nextID
}

func (c *h2Conn) onHeaders(f *http2.HeadersFrame) error {
	if f.StreamID%2 == 0 && c.cfg.server || f.StreamID == 0 {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.hpending = f.StreamID
	c.hend = f.StreamEnded()
	c.hconts = 0
	c.hblock = append(c.hblock[:0], f.HeaderBlockFragment()...)
	if len(c.hblock) > 2*maxHeaderList {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	if f.HeadersEnded() {
		return c.endHeaders()
	}
	return nil
}

func (c *h2Conn) onContinuation(f *http2.ContinuationFrame) error {
	c.hconts++
	c.hblock = append(c.hblock, f.HeaderBlockFragment()...)
	if c.hconts > maxContinuations || len(c.hblock) > 2*maxHeaderList {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	if f.HeadersEnded() {
		return c.endHeaders()
	}
	return nil
}

// endHeaders decodes a complete header block. It always decodes, even for a stream it
// then refuses, so that the hpack tables of both ends stay in step.
func (c *h2Conn) endHeaders() error {
	id, end := c.hpending, c.hend
	c.hpending = 0
	c.hfields = c.hfields[:0]
	size := 0
	tooBig := false
	c.hdec.SetEmitFunc(func(hf hpack.HeaderField) {
		size += int(hf.Size())
		if size > maxHeaderList {
			tooBig = true
			return
		}
		c.hfields = append(c.hfields, hf)
	})
	_, err := c.hdec.Write(c.hblock)
	if err == nil {
		err = c.hdec.Close()
	}
	if cap(c.hblock) > 4*maxHeaderList {
		c.hblock = nil
	}
	if err != nil {
		return http2.ConnectionError(http2.ErrCodeCompression)
	}
	if c.cfg.server {
		return c.onRequest(id, end, tooBig)
	}
	return c.onResponse(id, end, tooBig)
}

func (c *h2Conn) onRequest(id uint32, end, tooBig bool) error {
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		// Trailers: only END_STREAM matters for a tunnel.
		if !end {
			c.mu.Unlock()
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		s.endRemoteLocked()
		c.mu.Unlock()
		return nil
	}
	if id <= c.lastPeerID {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeStreamClosed)
	}
	c.lastPeerID = id
	refuse := c.goAwaySent || c.closed || uint32(len(c.streams)) >= c.cfg.maxStreams ||
		uint32(c.handlers) >= 2*c.cfg.maxStreams
	if refuse {
		c.mu.Unlock()
		c.resetStream(id, http2.ErrCodeRefusedStream)
		return c.spend(1)
	}
	s := c.newStreamLocked(id)
	s.fields = make([]hpack.HeaderField, len(c.hfields))
	copy(s.fields, c.hfields)
	s.headersTooBig = tooBig
	s.recvClosed = end
	c.handlers++
	c.mu.Unlock()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer func() {
			c.mu.Lock()
			c.handlers--
			c.mu.Unlock()
		}()
		c.cfg.onStream(s)
	}()
	return nil
}

func (c *h2Conn) onResponse(id uint32, end, tooBig bool) error {
	c.mu.Lock()
	s := c.streams[id]
	if s == nil {
		c.mu.Unlock()
		if id >= c.nextIDLocked() {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil // a stream we already closed
	}
	if s.status == 0 {
		status := 0
		for _, hf := range c.hfields {
			if hf.Name == ":status" {
				status, _ = strconv.Atoi(hf.Value)
			}
		}
		if status >= 100 && status < 200 && !end {
			c.mu.Unlock()
			return nil // informational
		}
		if status < 100 || status > 999 || tooBig {
			c.mu.Unlock()
			c.resetStream(id, http2.ErrCodeProtocol)
			return nil
		}
		s.status = status
		close(s.respReady)
	}
	if end {
		s.endRemoteLocked()
	}
	c.mu.Unlock()
	return nil
}

func (c *h2Conn) onReset(f *http2.RSTStreamFrame) error {
	c.mu.Lock()
	s := c.streams[f.StreamID]
	if s != nil {
		if f.ErrCode == http2.ErrCodeRefusedStream && s.status == 0 {
			s.failLocked(errRefused)
		} else {
			s.failLocked(&StreamResetError{Code: f.ErrCode, Remote: true})
		}
	}
	c.mu.Unlock()
	return c.spend(1)
}

func (c *h2Conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	if err := c.spend(1); err != nil {
		return err
	}
	c.mu.Lock()
	err := f.ForeachSetting(func(st http2.Setting) error {
		switch st.ID {
		case http2.SettingInitialWindowSize:
			if st.Val > 1<<31-1 {
				return http2.ConnectionError(http2.ErrCodeFlowControl)
			}
			delta := int64(st.Val) - c.peerInitWin
			c.peerInitWin = int64(st.Val)
			for _, s := range c.streams {
				s.sendWindow += delta
				if s.sendWindow > 1<<31-1 {
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
				s.signalWrite()
			}
		case http2.SettingMaxFrameSize:
			if st.Val < 16384 || st.Val > 1<<24-1 {
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
			c.peerMaxFrame = st.Val
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStr = st.Val
		}
		return nil
	})
	c.mu.Unlock()
	if err != nil {
		return err
	}
	c.queue(func(fr *http2.Framer) { fr.WriteSettingsAck() })
	c.kick()
	return nil
}

func (c *h2Conn) onPing(f *http2.PingFrame) error {
	if f.IsAck() {
		c.mu.Lock()
		c.pingSent = time.Time{}
		c.mu.Unlock()
		return nil
	}
	if err := c.spend(1); err != nil {
		return err
	}
	data := f.Data
	c.queue(func(fr *http2.Framer) { fr.WritePing(true, data) })
	c.kick()
	return nil
}

func (c *h2Conn) onGoAway(f *http2.GoAwayFrame) {
	c.mu.Lock()
	c.goAwayRecv = true
	c.goAwayLast = f.LastStreamID
	if !c.cfg.server {
		for id, s := range c.streams {
			if id > f.LastStreamID {
				s.failLocked(errRefused)
			}
		}
	}
	idle := len(c.streams) == 0
	c.mu.Unlock()
	if idle {
		c.closeAfterFlush()
	}
}

func (c *h2Conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	inc := int64(f.Increment)
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID == 0 {
		if inc == 0 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		c.sendWindow += inc
		if c.sendWindow > 1<<31-1 {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		for _, s := range c.streams {
			if s.waitConnWin {
				s.signalWrite()
			}
		}
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		return nil
	}
	if inc == 0 {
		s.failLocked(&StreamResetError{Code: http2.ErrCodeProtocol})
		c.queue(func(fr *http2.Framer) { fr.WriteRSTStream(f.StreamID, http2.ErrCodeProtocol) })
		c.kick()
		return nil
	}
	s.sendWindow += inc
	if s.sendWindow > 1<<31-1 {
		s.failLocked(&StreamResetError{Code: http2.ErrCodeFlowControl})
		c.queue(func(fr *http2.Framer) { fr.WriteRSTStream(f.StreamID, http2.ErrCodeFlowControl) })
		c.kick()
		return nil
	}
	s.signalWrite()
	return nil
}

// resetStream sends RST_STREAM and forgets the stream, from the read loop.
func (c *h2Conn) resetStream(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		s.failLocked(&StreamResetError{Code: code})
	}
	c.mu.Unlock()
	c.queue(func(fr *http2.Framer) { fr.WriteRSTStream(id, code) })
	c.kick()
}

// credit returns n consumed bytes of receive window: the connection's, and s's when s is
// not nil and still open. WINDOW_UPDATE goes out once a quarter of a window is owed,
// through the control queue (never blocking: the read loop calls it too).
func (c *h2Conn) credit(s *Stream, n int64) {
	if n <= 0 {
		return
	}
	c.mu.Lock()
	var streamInc int64
	connInc := c.connCreditLocked(n)
	var id uint32
	if s != nil && c.streams[s.id] == s && !s.recvClosed {
		s.recvUnacked += n
		if s.recvUnacked >= int64(c.cfg.streamWindow)/4 {
			streamInc, s.recvUnacked = s.recvUnacked, 0
			s.recvWindow += streamInc
			id = s.id
		}
	}
	c.mu.Unlock()
	if connInc == 0 && streamInc == 0 {
		return
	}
	c.queue(func(fr *http2.Framer) {
		if connInc > 0 {
			fr.WriteWindowUpdate(0, uint32(connInc))
		}
		if streamInc > 0 {
			fr.WriteWindowUpdate(id, uint32(streamInc))
		}
	})
	c.kick()
}

// connCreditLocked records n consumed bytes of the connection's receive window and
// returns the WINDOW_UPDATE increment due now: the whole debt once it reaches a quarter of
// the window, else 0. c.mu is held.
func (c *h2Conn) connCreditLocked(n int64) int64 {
	c.recvUnacked += n
	if c.recvUnacked < int64(c.cfg.connWindow)/4 {
		return 0
	}
	inc := c.recvUnacked
	c.recvUnacked = 0
	c.recvWindow += inc
	return inc
}

// --- streams ---

func (c *h2Conn) newStreamLocked(id uint32) *Stream {
	s := &Stream{
		c:          c,
		id:         id,
		sendWindow: c.peerInitWin,
		recvWindow: int64(c.cfg.streamWindow),
		rready:     make(chan struct{}, 1),
		wready:     make(chan struct{}, 1),
		respReady:  make(chan struct{}),
		ended:      make(chan struct{}),
	}
	c.streams[id] = s
	c.armIdleLocked()
	return s
}

// removeLocked forgets a stream that has ended. Bytes still buffered stay readable (a
// stream that ended normally) and their connection credit returns as they are read.
// c.mu is held.
func (c *h2Conn) removeLocked(s *Stream) {
	if c.streams[s.id] != s {
		return
	}
	delete(c.streams, s.id)
	close(s.ended)
	c.armIdleLocked()
	if len(c.streams) == 0 && (c.goAwaySent || c.goAwayRecv) && !c.closed {
		defer c.closeAfterFlush()
	}
}

// openStream opens a client stream with the given header fields (request pseudo-headers
// first) and returns it before the response arrives.
func (c *h2Conn) openStream(fields []hpack.HeaderField) (*Stream, error) {
	c.mu.Lock()
	if !c.takeLocked() {
		closed := c.closed
		c.mu.Unlock()
		if closed {
			return nil, ErrConnClosed
		}
		return nil, errConnFull
	}
	c.ctrlMu.Lock()
	id := c.nextID
	c.nextID += 2
	s := c.newStreamLocked(id)
	c.hbuf.Reset()
	for _, hf := range fields {
		c.henc.WriteField(hf)
	}
	block := c.hbuf.Bytes()
	first := true
	for first || len(block) > 0 {
		n := min(len(block), int(c.peerMaxFrame))
		if first {
			c.ctrlFr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block[:n], EndHeaders: n == len(block)})
		} else {
			c.ctrlFr.WriteContinuation(id, n == len(block), block[:n])
		}
		first = false
		block = block[n:]
	}
	c.ctrlMu.Unlock()
	c.mu.Unlock()
	if err := c.flushNow(); err != nil {
		return nil, err
	}
	return s, nil
}

// respond sends the response HEADERS of a server stream; a status other than 200 ends
// the stream.
func (s *Stream) respond(status int) error {
	c := s.c
	end := status != 200
	c.mu.Lock()
	if s.err != nil {
		err := s.err
		c.mu.Unlock()
		return err
	}
	c.ctrlMu.Lock()
	c.hbuf.Reset()
	c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	c.ctrlFr.WriteHeaders(http2.HeadersFrameParam{StreamID: s.id, BlockFragment: c.hbuf.Bytes(), EndHeaders: true, EndStream: end})
	if end && !s.recvClosed {
		// RFC 9113 §8.1: the response is complete; the client need not send the rest.
		c.ctrlFr.WriteRSTStream(s.id, http2.ErrCodeNo)
	}
	c.ctrlMu.Unlock()
	if end {
		s.sentEnd = true
		s.err = &StreamResetError{Code: http2.ErrCodeNo}
		c.removeLocked(s)
	}
	c.mu.Unlock()
	return c.flushNow()
}

// Stream is one CONNECT stream as a connection: Read and Write carry the tunnelled bytes,
// CloseWrite sends END_STREAM (the other end sees a FIN), Close resets the stream unless
// both directions have ended. Read and Write may be called concurrently with each other.
type Stream struct {
	c  *h2Conn
	id uint32

	// Guarded by c.mu.
	sendWindow    int64
	recvWindow    int64
	recvUnacked   int64
	pendingCredit int64 // bytes the last Read handed out: credited at the next Read
	recv          recvBuf
	recvClosed    bool  // END_STREAM received
	sentEnd       bool  // END_STREAM sent
	err           error // reset, or the connection failed
	waitConnWin   bool
	status        int                 // client: the response status, 0 until it arrives
	fields        []hpack.HeaderField // server: the request
	headersTooBig bool

	rready, wready chan struct{} // cap 1: data or window arrived, or the stream failed
	respReady      chan struct{} // client: closed when the response arrives
	ended          chan struct{} // closed when the stream is forgotten

	// onClose, when set, runs once when Close is first called (the pool's slot).
	onClose   func()
	closeOnce sync.Once
}

// endRemoteLocked records the peer's END_STREAM; a stream ended both ways is forgotten.
// c.mu is held.
func (s *Stream) endRemoteLocked() {
	s.recvClosed = true
	s.signalRead()
	if s.sentEnd {
		s.c.removeLocked(s)
	}
}

func (s *Stream) signalRead() {
	select {
	case s.rready <- struct{}{}:
	default:
	}
}

func (s *Stream) signalWrite() {
	select {
	case s.wready <- struct{}{}:
	default:
	}
}

// failLocked ends the stream with err (reset or connection failure): unread bytes are
// dropped and their window goes back to the connection. c.mu is held.
func (s *Stream) failLocked(err error) {
	if s.err == nil {
		s.err = err
	}
	c := s.c
	if n := int64(s.recv.len()) + s.pendingCredit; n > 0 {
		s.recv.reset()
		s.pendingCredit = 0
		if !c.closed {
			if inc := c.connCreditLocked(n); inc > 0 {
				c.queue(func(fr *http2.Framer) { fr.WriteWindowUpdate(0, uint32(inc)) })
				defer c.kick()
			}
		}
	}
	s.signalRead()
	s.signalWrite()
	if s.status == 0 && !s.c.cfg.server {
		select {
		case <-s.respReady:
		default:
			close(s.respReady)
		}
	}
	s.c.removeLocked(s)
}

// Read reads tunnelled bytes. It returns io.EOF after the peer's END_STREAM, a
// *StreamResetError after a reset.
func (s *Stream) Read(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	// The bytes the previous Read returned have been handled by now (written toward the
	// destination): only now does their window credit go back to the peer.
	owed := s.pendingCredit
	s.pendingCredit = 0
	for s.recv.len() == 0 && !s.recvClosed && s.err == nil {
		c.mu.Unlock()
		c.credit(s, owed)
		owed = 0
		select {
		case <-s.rready:
		case <-c.done:
		}
		c.mu.Lock()
		if c.closed && s.err == nil {
			s.err = ErrConnClosed
		}
	}
	var n int
	var err error
	switch {
	case s.recv.len() > 0:
		n = s.recv.read(p)
		s.pendingCredit = int64(n)
	case s.err != nil && !s.recvClosed:
		err = s.err
	default:
		err = io.EOF
	}
	c.mu.Unlock()
	c.credit(s, owed)
	return n, err
}

// Write sends p as DATA, waiting for flow-control window as needed.
func (s *Stream) Write(p []byte) (int, error) {
	c := s.c
	written := 0
	for written < len(p) {
		c.mu.Lock()
		for s.err == nil && !s.sentEnd && (s.sendWindow <= 0 || c.sendWindow <= 0) {
			s.waitConnWin = c.sendWindow <= 0
			c.mu.Unlock()
			select {
			case <-s.wready:
			case <-c.done:
			}
			c.mu.Lock()
			if c.closed && s.err == nil {
				s.err = ErrConnClosed
			}
		}
		s.waitConnWin = false
		if s.err != nil {
			err := s.err
			c.mu.Unlock()
			return written, err
		}
		if s.sentEnd {
			c.mu.Unlock()
			return written, errors.New("hbone: write after CloseWrite")
		}
		n := int64(min(len(p)-written, writeChunk))
		n = min(n, s.sendWindow, c.sendWindow)
		s.sendWindow -= n
		c.sendWindow -= n
		maxFrame := c.peerMaxFrame
		c.mu.Unlock()
		if err := c.writeData(&dataWrite{id: s.id, p: p[written : written+int(n)], max: maxFrame}); err != nil {
			return written, err
		}
		written += int(n)
	}
	return written, nil
}

// CloseWrite sends END_STREAM: the other end reads EOF, and can still write.
func (s *Stream) CloseWrite() error {
	c := s.c
	c.mu.Lock()
	if s.err != nil {
		err := s.err
		c.mu.Unlock()
		return err
	}
	if s.sentEnd {
		c.mu.Unlock()
		return nil
	}
	s.sentEnd = true
	maxFrame := c.peerMaxFrame
	c.mu.Unlock()
	// The END_STREAM frame is written outside c.mu; a Read seeing recvClosed meanwhile
	// only removes the stream once both flags are set, below.
	err := c.writeData(&dataWrite{id: s.id, end: true, max: maxFrame})
	c.mu.Lock()
	if s.recvClosed {
		c.removeLocked(s)
	}
	c.mu.Unlock()
	return err
}

// Close ends the stream: when either direction is still open it sends RST_STREAM
// (CANCEL), and the other end sees a reset. Safe to call more than once.
func (s *Stream) Close() error {
	s.closeOnce.Do(func() {
		c := s.c
		c.mu.Lock()
		open := c.streams[s.id] == s
		if open {
			s.failLocked(&StreamResetError{Code: http2.ErrCodeCancel})
		}
		c.mu.Unlock()
		if open {
			c.queue(func(fr *http2.Framer) { fr.WriteRSTStream(s.id, http2.ErrCodeCancel) })
			c.kick()
		}
		if s.onClose != nil {
			s.onClose()
		}
	})
	return nil
}

// recvBuf holds received bytes in pooled chunks. Guarded by the connection's mu.
type recvBuf struct {
	chunks []*[]byte
	r, w   int // read offset in chunks[0], write offset in the last chunk
	n      int
}

func (b *recvBuf) len() int { return b.n }

func (b *recvBuf) write(p []byte) {
	for len(p) > 0 {
		if len(b.chunks) == 0 || b.w == chunkSize {
			b.chunks = append(b.chunks, chunkPool.Get().(*[]byte))
			b.w = 0
		}
		last := *b.chunks[len(b.chunks)-1]
		n := copy(last[b.w:], p)
		b.w += n
		b.n += n
		p = p[n:]
	}
}

func (b *recvBuf) read(p []byte) int {
	total := 0
	for len(p) > 0 && b.n > 0 {
		first := *b.chunks[0]
		end := chunkSize
		if len(b.chunks) == 1 {
			end = b.w
		}
		n := copy(p, first[b.r:end])
		b.r += n
		b.n -= n
		total += n
		p = p[n:]
		if b.r == end {
			b.pop()
		}
	}
	return total
}

// pop frees the first chunk. The slice is shifted in place, not resliced, so it is not
// reallocated as chunks come and go.
func (b *recvBuf) pop() {
	chunkPool.Put(b.chunks[0])
	n := copy(b.chunks, b.chunks[1:])
	b.chunks[n] = nil
	b.chunks = b.chunks[:n]
	b.r = 0
	if n == 0 {
		b.w = 0
	}
}

func (b *recvBuf) reset() {
	for len(b.chunks) > 0 {
		b.pop()
	}
	b.n = 0
}

// readPreface reads the client connection preface (server).
func readPreface(r io.Reader) error {
	var buf [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(r, buf[:]); err != nil {
		return fmt.Errorf("hbone: reading the HTTP/2 preface: %w", err)
	}
	if string(buf[:]) != http2.ClientPreface {
		return errors.New("hbone: not an HTTP/2 connection preface")
	}
	return nil
}

// newTraceparent returns a W3C traceparent with random trace and span ids, sampled.
func newTraceparent() string {
	var b [24]byte
	rand.Read(b[:])
	const hexd = "0123456789abcdef"
	out := make([]byte, 0, 55)
	out = append(out, "00-"...)
	for i, v := range b {
		if i == 16 {
			out = append(out, '-')
		}
		out = append(out, hexd[v>>4], hexd[v&0xf])
	}
	out = append(out, "-01"...)
	return string(out)
}
