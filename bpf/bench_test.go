//go:build linux

package bpf

import (
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// BenchmarkConnSetup measures what capture adds to connection set-up: dial, one byte
// there and back, close. Each iteration does one direct connection (a pod that is not
// enrolled, to the remote node) and one captured connection (an enrolled pod to the same
// destination, through an agent that accepts on :15001 and splices to the original
// destination), interleaved so that both see the same machine state. It reports each
// path's p50 and p99, the p50 difference (the cost of capture alone) and the ratio.
func BenchmarkConnSetup(b *testing.B) {
	tp := newTopo(b)
	c := tp.load(b, Options{})
	if err := c.Enroll(Pod{IfIndex: tp.vp1, IPs: []netip.Addr{pod1v4, pod1v6}}); err != nil {
		b.Fatal(err)
	}
	if err := c.Attach(tp.vp2); err != nil {
		b.Fatal(err)
	}
	echo := echoServer(b, tp.remote, ":8080")
	splicer(b, tp, c)
	dst := echo.String()

	direct := nsWorker(b, tp.pod2)
	captured := nsWorker(b, tp.pod1)
	warm := func(w chan<- func()) {
		for range 50 {
			run(w, func() { roundTrip(b, dst) })
		}
	}
	warm(direct)
	warm(captured)

	dd := make([]time.Duration, 0, b.N)
	cd := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		run(direct, func() { dd = append(dd, timed(func() { roundTrip(b, dst) })) })
		run(captured, func() { cd = append(cd, timed(func() { roundTrip(b, dst) })) })
	}
	b.StopTimer()
	report(b, dd, cd)
}

func timed(fn func()) time.Duration {
	t0 := time.Now()
	fn()
	return time.Since(t0)
}

func roundTrip(b *testing.B, dst string) {
	conn, err := net.Dial("tcp", dst)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	var one [1]byte
	if _, err := conn.Write([]byte{'x'}); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(conn, one[:]); err != nil {
		b.Fatal(err)
	}
}

// nsWorker runs functions on one thread locked in n, so sockets are made there without a
// setns per connection.
func nsWorker(b *testing.B, n *testNS) chan<- func() {
	work := make(chan func())
	ready := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ready <- netns.Set(n.h)
		for fn := range work {
			fn()
			workDone <- struct{}{}
		}
	}()
	if err := <-ready; err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { close(work) })
	return work
}

// workDone is shared by all workers: run waits for one function at a time.
var workDone = make(chan struct{})

func run(w chan<- func(), fn func()) {
	w <- fn
	<-workDone
}

func echoServer(b *testing.B, n *testNS, addr string) net.Addr {
	var l net.Listener
	n.do(b, func() (err error) { l, err = net.Listen("tcp4", addr); return err })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	b.Cleanup(func() { l.Close() })
	return &net.TCPAddr{IP: remoteV4.AsSlice(), Port: 8080}
}

// splicer is the agent's outbound path reduced to what capture costs: accept on :15001,
// dial the original destination (the accepted socket's local address) with the agent's
// mark, copy both ways. Accept and dial run on a thread in the node namespace.
func splicer(b *testing.B, tp *topo, c *Capture) {
	var l *net.TCPListener
	tp.node.do(b, func() (err error) { l, err = Listen("tcp", ":15001", DefaultAgentMark); return err })
	if err := c.SetListener(Outbound, l); err != nil {
		b.Fatal(err)
	}
	d := &net.Dialer{Control: Control(DefaultAgentMark, false)}
	go func() {
		runtime.LockOSThread()
		if netns.Set(tp.node.h) != nil {
			return
		}
		for {
			in, err := l.AcceptTCP()
			if err != nil {
				return
			}
			out, err := d.Dial("tcp", in.LocalAddr().String())
			if err != nil {
				in.Close()
				continue
			}
			go splice(in, out.(*net.TCPConn))
		}
	}()
	b.Cleanup(func() { l.Close() })
}

func splice(a, b *net.TCPConn) {
	done := make(chan struct{})
	go func() { io.Copy(b, a); b.CloseWrite(); close(done) }()
	io.Copy(a, b)
	a.CloseWrite()
	<-done
	a.Close()
	b.Close()
}

// BenchmarkCaptureOnly isolates the kernel-side cost of capture from the cost of a
// splicing proxy: both paths end at an echo socket in the node namespace. Direct: a pod
// that is not enrolled dials the echo server on its gateway address. Captured: an
// enrolled pod dials a remote address and the SYN is assigned to an echo listener on
// :15001 (TC program, sk_assign, mark, policy route, transparent socket).
func BenchmarkCaptureOnly(b *testing.B) {
	tp := newTopo(b)
	c := tp.load(b, Options{})
	if err := c.Enroll(Pod{IfIndex: tp.vp1, IPs: []netip.Addr{pod1v4, pod1v6}}); err != nil {
		b.Fatal(err)
	}
	if err := c.Attach(tp.vp2); err != nil {
		b.Fatal(err)
	}
	var direct, agent net.Listener
	tp.node.do(b, func() (err error) {
		if direct, err = net.Listen("tcp4", "10.244.2.1:15101"); err != nil {
			return err
		}
		agent, err = Listen("tcp", ":15001", DefaultAgentMark)
		return err
	})
	if err := c.SetListener(Outbound, agent.(*net.TCPListener)); err != nil {
		b.Fatal(err)
	}
	for _, l := range []net.Listener{direct, agent} {
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go func() { io.Copy(c, c); c.Close() }()
			}
		}()
		b.Cleanup(func() { l.Close() })
	}
	dw, cw := nsWorker(b, tp.pod2), nsWorker(b, tp.pod1)
	for range 50 {
		run(dw, func() { roundTrip(b, "10.244.2.1:15101") })
		run(cw, func() { roundTrip(b, "10.0.0.2:8080") })
	}
	dd := make([]time.Duration, 0, b.N)
	cd := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		run(dw, func() { dd = append(dd, timed(func() { roundTrip(b, "10.244.2.1:15101") })) })
		run(cw, func() { cd = append(cd, timed(func() { roundTrip(b, "10.0.0.2:8080") })) })
	}
	b.StopTimer()
	report(b, dd, cd)
}

func report(b *testing.B, dd, cd []time.Duration) {
	slices.Sort(dd)
	slices.Sort(cd)
	pct := func(d []time.Duration, p float64) float64 {
		return float64(d[int(float64(len(d)-1)*p)].Nanoseconds()) / 1e3
	}
	b.ReportMetric(pct(dd, 0.5), "direct-p50-µs")
	b.ReportMetric(pct(cd, 0.5), "captured-p50-µs")
	b.ReportMetric(pct(dd, 0.99), "direct-p99-µs")
	b.ReportMetric(pct(cd, 0.99), "captured-p99-µs")
	b.ReportMetric(pct(cd, 0.5)-pct(dd, 0.5), "added-p50-µs")
	b.ReportMetric(pct(cd, 0.5)/pct(dd, 0.5), "p50-ratio")
}
