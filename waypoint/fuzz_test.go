package waypoint

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// memConn is a client in memory for fuzzing: it reads in, then EOF; it keeps what the
// proxy writes.
type memConn struct {
	in     *bytes.Reader
	mu     sync.Mutex
	out    bytes.Buffer
	closed bool
}

func (c *memConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return 0, net.ErrClosed
	}
	return c.in.Read(p)
}

func (c *memConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	return c.out.Write(p)
}

func (c *memConn) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	return nil
}

func (c *memConn) LocalAddr() net.Addr              { return &net.TCPAddr{IP: net.IPv4(10, 96, 0, 10), Port: 9080} }
func (c *memConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(10, 1, 0, 7), Port: 40000} }
func (c *memConn) SetDeadline(time.Time) error      { return nil }
func (c *memConn) SetReadDeadline(time.Time) error  { return nil }
func (c *memConn) SetWriteDeadline(time.Time) error { return nil }

// FuzzHTTP1 feeds raw bytes to the proxy as a client: it must not panic, every request
// Decide sees has a normalized path, and every response is either Decide's answer or a
// refusal.
func FuzzHTTP1(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"GET /a/../b/%2e/%41?q=1 HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"GET http://b/c/../d HTTP/1.1\r\nHost: a\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
		"GET /\\..\\x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
		"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
		"GET / HTTP/1.0\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		var mu sync.Mutex
		var decided []string
		p := &Proxy{Dial: func(context.Context, Upstream) (net.Conn, error) { return nil, errors.New("no upstream") }}
		rt := &Route{Protocol: ProtocolHTTP1, Decide: func(r *http.Request) (Upstream, *Response) {
			path := r.URL.EscapedPath()
			if norm, err := NormalizePath(path); err != nil || norm != path || r.RequestURI != path && !strings.HasPrefix(r.RequestURI, path+"?") {
				t.Errorf("Decide saw path %q (request-URI %q): normalized %q, %v", path, r.RequestURI, norm, err)
			}
			mu.Lock()
			decided = append(decided, r.Method)
			mu.Unlock()
			return Upstream{}, &Response{Status: http.StatusTeapot}
		}}
		c := &memConn{in: bytes.NewReader(in)}
		p.Serve(context.Background(), c, rt)
		if bytes.HasPrefix(in, []byte("PRI ")) {
			return // HTTP/2: answered in frames
		}
		br := bufio.NewReader(bytes.NewReader(c.out.Bytes()))
		teapots := 0
		for {
			if _, err := br.Peek(1); err == io.EOF {
				break
			}
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("the proxy wrote something other than responses: %v\n%q", err, c.out.Bytes())
			}
			io.Copy(io.Discard, resp.Body)
			switch resp.StatusCode {
			case http.StatusTeapot:
				teapots++
			case 400, 403, 417, 426, 431:
			default:
				t.Fatalf("status %d", resp.StatusCode)
			}
		}
		if teapots != len(decided) {
			t.Fatalf("%d requests decided, %d answers", len(decided), teapots)
		}
	})
}

// FuzzNormalize: a normalized path starts with "/", has no dot segment, no backslash and
// no escaped dot, and normalizes to itself.
func FuzzNormalize(f *testing.F) {
	for _, s := range []string{"/a/b/../c", "/a/%2e%2E/b", "/a\\..\\b", "/%41%2f%5c", "/..", "//../a", "/a/..%2e/b", "/caf\xc3\xa9", "/a%%30%30"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := NormalizePath(in)
		if err != nil {
			return
		}
		if out == "" || out[0] != '/' {
			t.Fatalf("%q -> %q", in, out)
		}
		for _, seg := range strings.Split(out, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("%q -> %q has a dot segment", in, out)
			}
		}
		if strings.ContainsAny(out, "\\ #?") || strings.Contains(strings.ToLower(out), "%2e") {
			t.Fatalf("%q -> %q", in, out)
		}
		for i := 0; i < len(out); i++ {
			if out[i] < 0x21 || out[i] >= 0x7f {
				t.Fatalf("%q -> %q has a raw byte %#x", in, out, out[i])
			}
		}
		again, err := NormalizePath(out)
		if err != nil || again != out {
			t.Fatalf("not idempotent: %q -> %q -> %q, %v", in, out, again, err)
		}
	})
}
