package tunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// --- half-close and resets, both directions, either order ---

// A server that writes and closes first: the client gets the bytes and EOF at once, and
// its own direction keeps flowing until it half-closes.
func TestServerFirstHalfClose(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	got := make(chan int64, 1)
	app := upstream(t, func(c *net.TCPConn) {
		io.WriteString(c, "bye\n")
		c.CloseWrite()
		n, _ := io.Copy(io.Discard, c)
		got <- n
	})
	s := connect(t, m.pool(t), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app)
	done := make(chan error, 1)
	var b []byte
	go func() {
		var err error
		b, err = io.ReadAll(s)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil || string(b) != "bye\n" {
			t.Fatalf("read %q, %v; want \"bye\\n\" and EOF", b, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no EOF 5s after the server closed its side")
	}
	payload := bytes.Repeat([]byte("z"), 3<<20)
	if _, err := s.Write(payload); err != nil {
		t.Fatalf("write after the server's FIN: %v", err)
	}
	s.CloseWrite()
	if n := <-got; n != int64(len(payload)) {
		t.Fatalf("server read %d bytes after its FIN, want %d", n, len(payload))
	}
}

// Both ends half-close at the same time: each sees the other's bytes and EOF.
func TestSimultaneousHalfClose(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	appGot := make(chan string, 1)
	app := upstream(t, func(c *net.TCPConn) {
		io.WriteString(c, "from app")
		c.CloseWrite()
		b, _ := io.ReadAll(c)
		appGot <- string(b)
	})
	s := connect(t, m.pool(t), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app)
	io.WriteString(s, "from client")
	s.CloseWrite()
	b, err := io.ReadAll(s)
	if err != nil || string(b) != "from app" {
		t.Fatalf("client read %q, %v", b, err)
	}
	if g := <-appGot; g != "from client" {
		t.Fatalf("app read %q", g)
	}
}

// A reset on either side becomes RST_STREAM and a reset on the other.
func TestResetsPropagate(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	t.Run("application resets: client read fails with a stream reset", func(t *testing.T) {
		app := upstream(t, func(c *net.TCPConn) {
			c.Write([]byte("partial"))
			// Not at once: a reset that beats the handler's dial fails the dial (503).
			time.Sleep(100 * time.Millisecond)
			c.SetLinger(0)
			c.Close()
		})
		s := connect(t, m.pool(t), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app)
		_, err := io.ReadAll(s)
		var re *StreamResetError
		if !errors.As(err, &re) || !re.Remote {
			t.Fatalf("read error %v, want a reset by the peer", err)
		}
	})
	t.Run("client resets: application read fails with ECONNRESET", func(t *testing.T) {
		appErr := make(chan error, 1)
		app := upstream(t, func(c *net.TCPConn) {
			_, err := io.Copy(io.Discard, c)
			appErr <- err
		})
		s := connect(t, m.pool(t), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app)
		io.WriteString(s, "some bytes")
		time.Sleep(50 * time.Millisecond)
		s.Close()
		select {
		case err := <-appErr:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("application read ended with %v, want ECONNRESET", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the application never saw the reset")
		}
	})
}

// --- flow control ---

// A stream whose reader never reads stalls alone: its siblings on the same connection
// keep flowing, and what the agent buffers for it is bounded by the stream window.
func TestZeroWindowStreamDoesNotStallSiblings(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	flood := upstream(t, func(c *net.TCPConn) {
		buf := make([]byte, 64<<10)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	app := upstream(t, echo)
	p := m.pool(t)
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	stuck := connect(t, p, k, flood) // never read
	time.Sleep(200 * time.Millisecond)
	s := connect(t, p, k, app)
	if p.Conns(k) != 1 {
		t.Fatalf("%d connections, want the streams to share one", p.Conns(k))
	}
	payload := bytes.Repeat([]byte("q"), 2<<20)
	go func() { s.Write(payload); s.CloseWrite() }()
	b, err := io.ReadAll(s)
	if err != nil || len(b) != len(payload) {
		t.Fatalf("sibling read %d bytes, %v", len(b), err)
	}
	stuck.c.mu.Lock()
	buffered := stuck.recv.len()
	stuck.c.mu.Unlock()
	if buffered > defaultStreamWindow {
		t.Fatalf("client buffered %d bytes for an unread stream, more than its %d window", buffered, defaultStreamWindow)
	}
}

// A destination that never reads pins at most a stream window in the server agent.
func TestUnreadStreamBufferingIsBounded(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	hold := make(chan struct{})
	app := upstream(t, func(c *net.TCPConn) {
		c.SetReadBuffer(4 << 10)
		<-hold
	})
	defer close(hold)
	s := connect(t, m.pool(t), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app)
	var sent atomic.Int64
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := s.Write(buf)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()
	// Wait until the writer stalls.
	var last int64 = -1
	for i := 0; i < 100; i++ {
		time.Sleep(50 * time.Millisecond)
		if n := sent.Load(); n == last {
			break
		} else {
			last = n
		}
	}
	buffered := 0
	hb.srv.mu.Lock()
	for _, c := range hb.srv.conns {
		if c == nil {
			continue
		}
		c.mu.Lock()
		for _, st := range c.streams {
			buffered += st.recv.len()
		}
		c.mu.Unlock()
	}
	hb.srv.mu.Unlock()
	if buffered > defaultStreamWindow {
		t.Fatalf("server buffered %d bytes for a destination that does not read, window %d", buffered, defaultStreamWindow)
	}
	if last > 64<<20 {
		t.Fatalf("client wrote %d bytes into a stream nobody reads", last)
	}
	s.Close()
}

func TestBudgetSharesConnectionWindows(t *testing.T) {
	b := newBudget(20 << 20)
	w1, r1 := b.reserve("a", 16<<20)
	w2, r2 := b.reserve("a", 16<<20)
	w3, r3 := b.reserve("a", 16<<20)
	wb, rb := b.reserve("b", 16<<20)
	if w1 != 16<<20 || w2 != 4<<20 || w3 != initialWindow || wb != 16<<20 {
		t.Fatalf("grants %d %d %d (other identity %d)", w1, w2, w3, wb)
	}
	r1()
	r1() // idempotent
	if w, r := b.reserve("a", 16<<20); w != 16<<20-initialWindow {
		t.Fatalf("after a release: %d", w)
	} else {
		r()
	}
	r2()
	r3()
	rb()
	if len(b.used) != 0 {
		t.Fatalf("budget keeps %v", b.used)
	}
}

// --- attacks ---

// rawConn is an HBONE client speaking frames by hand.
type rawConn struct {
	t   *testing.T
	tc  *tls.Conn
	fr  *http2.Framer
	enc *hpack.Encoder
	buf bytes.Buffer
}

func dialRaw(t *testing.T, m *mesh, hb *hbone) *rawConn {
	t.Helper()
	p := m.pool(t)
	p.init()
	cfg, _ := p.TLSConfig(context.Background(), Key{Src: frontend, Dst: reviews})
	tc, err := tls.Dial("tcp", hb.addr.String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tc.Close() })
	rc := &rawConn{t: t, tc: tc, fr: http2.NewFramer(tc, tc)}
	rc.enc = hpack.NewEncoder(&rc.buf)
	io.WriteString(tc, http2.ClientPreface)
	rc.fr.WriteSettings()
	return rc
}

func (rc *rawConn) block(fields ...hpack.HeaderField) []byte {
	rc.buf.Reset()
	for _, f := range fields {
		rc.enc.WriteField(f)
	}
	return append([]byte(nil), rc.buf.Bytes()...)
}

func (rc *rawConn) connect(id uint32, authority string) {
	rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true, BlockFragment: rc.block(
		hpack.HeaderField{Name: ":method", Value: "CONNECT"},
		hpack.HeaderField{Name: ":authority", Value: authority},
		hpack.HeaderField{Name: "forwarded", Value: FormatForwarded(testSrc)},
	)})
}

// goAway reads frames until GOAWAY or the end of the connection, within 10s, and returns
// the GOAWAY's code (or -1 when the connection ended without one).
func (rc *rawConn) goAway() http2.ErrCode {
	rc.t.Helper()
	rc.tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) {
				return ^http2.ErrCode(0)
			}
			rc.t.Fatalf("reading for GOAWAY: %v", err)
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			return g.ErrCode
		}
	}
}

// Rapid reset (CVE-2023-44487): streams opened and reset at once cost the server little
// and end the connection with ENHANCE_YOUR_CALM.
func TestRapidResetIsCutOff(t *testing.T) {
	m := newMesh(t)
	var running, peak atomic.Int32
	slow := HandlerFunc(func(ctx context.Context, r *Request) (net.Conn, error) {
		n := running.Add(1)
		defer running.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		<-ctx.Done() // a slow dial, abandoned when the stream goes
		return nil, Unreachable(ctx.Err())
	})
	hb := startServerWith(t, m.serverConfig(reviews), slow, func(s *Server) { s.MaxStreams = 50 })
	rc := dialRaw(t, m, hb)
	go func() {
		for id := uint32(1); id < 20000; id += 2 {
			rc.connect(id, "127.0.0.1:1")
			if rc.fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				return
			}
		}
	}()
	if code := rc.goAway(); code != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %v, want ENHANCE_YOUR_CALM", code)
	}
	if p := peak.Load(); p > 100 {
		t.Fatalf("%d handlers ran at once, want at most 2 x MaxStreams", p)
	}
}

// CONTINUATION flood (CVE-2024-27316): a header block that never ends is cut off after a
// few frames.
func TestContinuationFloodIsCutOff(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	rc := dialRaw(t, m, hb)
	go func() {
		rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.block(hpack.HeaderField{Name: ":method", Value: "CONNECT"})})
		for i := 0; i < 100000; i++ {
			if rc.fr.WriteContinuation(1, false, []byte{}) != nil {
				return
			}
		}
	}()
	if code := rc.goAway(); code != http2.ErrCodeProtocol {
		t.Fatalf("GOAWAY %v, want PROTOCOL_ERROR", code)
	}
}

// PING and SETTINGS floods from a peer that does not read the answers end the
// connection.
func TestControlFloodsAreCutOff(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	for _, tc := range []struct {
		name string
		send func(fr *http2.Framer) error
	}{
		{"PING", func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{1}) }},
		{"SETTINGS", func(fr *http2.Framer) error {
			return fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 16384})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := dialRaw(t, m, hb)
			done := make(chan struct{})
			go func() {
				defer close(done)
				for i := 0; i < 100000; i++ {
					if tc.send(rc.fr) != nil {
						return
					}
				}
			}()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				t.Fatal("the server kept taking frames")
			}
			if code := rc.goAway(); code != http2.ErrCodeEnhanceYourCalm && code != ^http2.ErrCode(0) {
				t.Fatalf("GOAWAY %v, want ENHANCE_YOUR_CALM or a closed connection", code)
			}
		})
	}
}

// An hpack bomb: one large value in the dynamic table, referenced many times, decodes
// to far more than the header list limit. The request is refused, the table stays in
// step, and the connection serves the next request.
func TestHpackBombIsRefused(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	rc := dialRaw(t, m, hb)
	big := hpack.HeaderField{Name: "x-bomb", Value: strings.Repeat("b", 3000)}
	fields := []hpack.HeaderField{{Name: ":method", Value: "CONNECT"}, {Name: ":authority", Value: app.String()}}
	for i := 0; i < 2000; i++ {
		fields = append(fields, big) // indexed after the first: one byte each on the wire
	}
	blk := rc.block(fields...)
	if len(blk) > 4*maxHeaderList {
		t.Fatalf("the bomb is %d bytes on the wire", len(blk))
	}
	rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: blk})
	rc.connect(3, app.String())
	statuses := map[uint32]string{}
	dec := hpack.NewDecoder(4096, nil)
	rc.tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for len(statuses) < 2 {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			t.Fatalf("after %v: %v", statuses, err)
		}
		if h, ok := f.(*http2.HeadersFrame); ok {
			hf, _ := dec.DecodeFull(h.HeaderBlockFragment())
			statuses[h.StreamID] = hf[0].Value
		}
	}
	if statuses[1] != "400" || statuses[3] != "200" {
		t.Fatalf("statuses %v, want the bomb 400 and the next request 200", statuses)
	}
}

// Streams over the advertised limit are refused; the pool then opens another connection.
func TestTooManyStreamsAreRefused(t *testing.T) {
	m := newMesh(t)
	hold := make(chan struct{})
	app := upstream(t, func(c *net.TCPConn) { <-hold })
	defer close(hold)
	hb := startServerWith(t, m.serverConfig(reviews), nil, func(s *Server) { s.MaxStreams = 2 })
	rc := dialRaw(t, m, hb)
	for id := uint32(1); id <= 5; id += 2 {
		rc.connect(id, app.String())
	}
	rc.tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if r, ok := f.(*http2.RSTStreamFrame); ok {
			if r.StreamID != 5 || r.ErrCode != http2.ErrCodeRefusedStream {
				t.Fatalf("RST_STREAM %d %v, want stream 5 REFUSED_STREAM", r.StreamID, r.ErrCode)
			}
			break
		}
	}
	p := m.pool(t)
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	for i := 0; i < 3; i++ {
		connect(t, p, k, app)
	}
	if n := p.Conns(k); n != 2 {
		t.Fatalf("%d connections for 3 streams to a server taking 2, want 2", n)
	}
}

// --- lifecycle ---

// Shutdown sends GOAWAY: the pool takes new streams elsewhere, the open stream finishes.
func TestShutdownSendsGoAway(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	p := m.pool(t)
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	s := connect(t, p, k, app)
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- hb.srv.Shutdown(ctx)
	}()
	eventually(t, "the client to see GOAWAY", func() bool { return p.Conns(k) == 0 })
	io.WriteString(s, "still here")
	s.CloseWrite()
	if b, err := io.ReadAll(s); err != nil || string(b) != "still here" {
		t.Fatalf("open stream after GOAWAY: %q, %v", b, err)
	}
	select {
	case <-shut:
		t.Fatal("Shutdown returned while a stream was open")
	default:
	}
	s.Close()
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

func TestServerClosesIdleConnections(t *testing.T) {
	m := newMesh(t)
	hb := startServerWith(t, m.serverConfig(reviews), nil, func(s *Server) { s.IdleTimeout = 100 * time.Millisecond })
	app := upstream(t, echo)
	p := m.pool(t)
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	s := connect(t, p, k, app)
	time.Sleep(300 * time.Millisecond) // an idle stream is never timed out
	io.WriteString(s, "x")
	s.CloseWrite()
	if b, _ := io.ReadAll(s); string(b) != "x" {
		t.Fatalf("idle stream: %q", b)
	}
	s.Close()
	eventually(t, "the server to close the idle connection", func() bool {
		hb.srv.mu.Lock()
		defer hb.srv.mu.Unlock()
		return len(hb.srv.conns) == 0
	})
}

// A CONNECT the server does not answer times out; the handler's context ends with it.
func TestResponseTimeout(t *testing.T) {
	m := newMesh(t)
	ended := make(chan struct{})
	hang := HandlerFunc(func(ctx context.Context, r *Request) (net.Conn, error) {
		<-ctx.Done()
		close(ended)
		return nil, ctx.Err()
	})
	hb := startServer(t, m.serverConfig(reviews), hang)
	p := m.pool(t)
	p.ResponseTimeout = 200 * time.Millisecond
	_, err := p.Connect(context.Background(), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, hb.addr, testSrc)
	if err == nil || !strings.Contains(err.Error(), "no response") {
		t.Fatalf("Connect: %v, want a response timeout", err)
	}
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the handler's context did not end with the stream")
	}
}

// A failed or reset stream never takes its siblings down.
func TestFailedStreamSparesSiblings(t *testing.T) {
	m := newMesh(t)
	hb := startServer(t, m.serverConfig(reviews), nil)
	app := upstream(t, echo)
	p := m.pool(t)
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	s1 := connect(t, p, k, app)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := l.Addr().(*net.TCPAddr).AddrPort()
	l.Close()
	if _, err := p.Connect(context.Background(), k, closed, testSrc); StatusCode(err) != http.StatusServiceUnavailable {
		t.Fatalf("CONNECT to a closed port: %v, want 503", err)
	}
	s2 := connect(t, p, k, app)
	s2.Close()
	io.WriteString(s1, "alive")
	s1.CloseWrite()
	if b, err := io.ReadAll(s1); err != nil || string(b) != "alive" {
		t.Fatalf("sibling: %q, %v", b, err)
	}
	if p.Conns(k) != 1 {
		t.Fatalf("%d connections", p.Conns(k))
	}
}

// --- fuzzing the frame reader ---

// FuzzServerFrames feeds arbitrary bytes after the preface to a server connection: it
// must never panic or hang, whatever the frames.
func FuzzServerFrames(f *testing.F) {
	var seed bytes.Buffer
	fr := http2.NewFramer(&seed, nil)
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: "10.0.0.1:80"})
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: hb.Bytes()})
	fr.WriteData(1, false, []byte("hello"))
	fr.WriteWindowUpdate(0, 1000)
	fr.WriteRSTStream(1, http2.ErrCodeCancel)
	fr.WritePing(false, [8]byte{})
	fr.WriteGoAway(0, http2.ErrCodeNo, nil)
	f.Add(seed.Bytes())
	f.Add([]byte{0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 5, 9, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := net.Pipe()
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); io.Copy(io.Discard, b) }()
		c := newH2Conn(a, h2Config{server: true, maxStreams: 4, onStream: func(s *Stream) { s.respond(400) }})
		if err := c.start(); err != nil {
			t.Fatal(err)
		}
		// Writes block until the server reads: bound them.
		b.SetWriteDeadline(time.Now().Add(time.Second))
		b.Write(in)
		c.close(nil)
		b.Close()
		c.wait()
		wg.Wait()
	})
}
