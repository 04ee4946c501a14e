package tunnel

import (
	"context"
	"io"
	"net"
	"testing"
)

// BenchmarkStreamSetup is one CONNECT stream over a warm pooled connection: request,
// 200, a byte each way, close. Compare with BenchmarkDirectConnect, a plain TCP
// connection to the same application in the same run.
func BenchmarkStreamSetup(b *testing.B) {
	m := newMesh(b)
	hb := startServer(b, m.serverConfig(reviews), nil)
	app := upstream(b, echo)
	p := m.pool(b)
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	buf := make([]byte, 1)
	b.ReportAllocs()
	for b.Loop() {
		s, err := p.Connect(context.Background(), k, app, testSrc)
		if err != nil {
			b.Fatal(err)
		}
		s.Write(buf)
		s.CloseWrite()
		if _, err := io.ReadFull(s, buf); err != nil {
			b.Fatal(err)
		}
		s.Close()
	}
}

func BenchmarkDirectConnect(b *testing.B) {
	app := upstream(b, echo)
	buf := make([]byte, 1)
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("tcp", app.String())
		if err != nil {
			b.Fatal(err)
		}
		c.Write(buf)
		c.(*net.TCPConn).CloseWrite()
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

const chunk = 64 << 10

// BenchmarkThroughputTunnel sends bytes through one HBONE stream to a sink; compare
// with BenchmarkThroughputDirect (MB/s) from the same run.
func BenchmarkThroughputTunnel(b *testing.B) {
	m := newMesh(b)
	hb := startServer(b, m.serverConfig(reviews), nil)
	app := upstream(b, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	s, err := m.pool(b).Connect(context.Background(), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app, testSrc)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	throughput(b, s)
}

func BenchmarkThroughputDirect(b *testing.B) {
	app := upstream(b, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	c, err := net.Dial("tcp", app.String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	throughput(b, c)
}

func throughput(b *testing.B, w io.Writer) {
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := w.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRoundTripTunnel is a 1 KiB request and its 1 KiB answer through one HBONE
// stream to an echo application; compare with BenchmarkRoundTripDirect (ns/op) from the
// same run.
func BenchmarkRoundTripTunnel(b *testing.B) {
	m := newMesh(b)
	hb := startServer(b, m.serverConfig(reviews), nil)
	app := upstream(b, echo)
	s, err := m.pool(b).Connect(context.Background(), Key{Src: frontend, Dst: reviews, Addr: hb.addr}, app, testSrc)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	roundTrips(b, s)
}

func BenchmarkRoundTripDirect(b *testing.B) {
	app := upstream(b, echo)
	c, err := net.Dial("tcp", app.String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	roundTrips(b, c)
}

func roundTrips(b *testing.B, c io.ReadWriter) {
	buf := make([]byte, 1024)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
}
