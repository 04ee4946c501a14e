package tunnel

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
)

// Copy buffers of the legs the kernel cannot splice. A flow starts with a small one, so
// that many quiet connections pin little memory while they wait in Read; a flow whose
// reads keep filling it moves to a large one, so bulk data crosses in few, large
// syscalls and DATA frames, and moves back when its reads shrink.
const (
	smallBuf = 16 << 10
	largeBuf = 256 << 10
)

var (
	smallPool = sync.Pool{New: func() any { b := make([]byte, smallBuf); return &b }}
	largePool = sync.Pool{New: func() any { b := make([]byte, largeBuf); return &b }}
)

// closeWriter is a connection whose write side can be shut alone (TCP FIN, HTTP/2
// END_STREAM) while its read side stays open.
type closeWriter interface {
	CloseWrite() error
}

// Counts are the bytes Join moved in each direction.
type Counts struct {
	AToB, BToA int64
	// ClosedAFirst reports that Join half-closed a (b had ended) before a ended by
	// itself: on a TCP leg, this side closed first and keeps the TIME_WAIT.
	ClosedAFirst bool
}

// Join copies a to b and b to a until both directions end, and returns the bytes moved
// each way. A direction that ends cleanly (EOF) half-closes its destination, so a FIN
// on one side becomes a CloseWrite on the other and the other direction goes on. A
// direction that fails resets both connections (a TCP leg closes with RST, a stream with
// RST_STREAM), which ends the other direction too: a reset on one side becomes a reset
// on the other.
// Join waits for both copies; it closes a and b before it returns. Between two
// *net.TCPConn the kernel splices; other legs copy through pooled buffers.
func Join(a, b io.ReadWriteCloser) (Counts, error) {
	var c Counts
	var errAB, errBA error
	var once sync.Once
	closeBoth := func(reset bool) {
		once.Do(func() {
			if reset {
				resetLinger(a)
				resetLinger(b)
			}
			a.Close()
			b.Close()
		})
	}
	abort := func() { closeBoth(true) }
	// first records which direction ended first: 1 when b's did (and a was
	// half-closed), 2 when a's did.
	var first atomic.Int32
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c.AToB, errAB = copyHalf(b, a, func() { first.CompareAndSwap(0, 2) })
		if errAB != nil {
			abort()
		}
	}()
	c.BToA, errBA = copyHalf(a, b, func() { first.CompareAndSwap(0, 1) })
	if errBA != nil {
		abort()
	}
	wg.Wait()
	c.ClosedAFirst = first.Load() == 1 && errAB == nil && errBA == nil
	closeBoth(false)
	return c, errors.Join(quiet(errAB), quiet(errBA))
}

// resetLinger makes the next Close of a TCP connection send RST instead of FIN.
func resetLinger(c io.ReadWriteCloser) {
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		l.SetLinger(0)
	}
}

// copyHalf copies src to dst, then calls ended and half-closes dst. It returns nil when
// src ended with EOF.
func copyHalf(dst io.Writer, src io.Reader, ended func()) (int64, error) {
	var n int64
	var err error
	_, dstTCP := dst.(*net.TCPConn)
	_, srcTCP := src.(*net.TCPConn)
	if dstTCP && srcTCP {
		n, err = io.Copy(dst, src) // TCPConn.ReadFrom splices
	} else {
		n, err = copyAdaptive(dst, src)
	}
	if err != nil {
		return n, err
	}
	ended()
	if cw, ok := dst.(closeWriter); ok {
		if err := cw.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
			return n, err
		}
	}
	return n, nil
}

// quiet drops the errors that follow from Join's own abort or from a peer's reset
// after the other side has gone: they say nothing about why the flow ended.
func quiet(err error) error {
	if err == nil || errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrClosedPipe) {
		return nil
	}
	if errors.Is(err, syscall.EPIPE) {
		return nil
	}
	return err
}

// copyAdaptive copies src to dst until EOF (nil) or an error, through a pooled buffer
// that grows to largeBuf after two reads in a row fill the small one, and shrinks back
// after four reads in a row that would have fit it.
func copyAdaptive(dst io.Writer, src io.Reader) (int64, error) {
	bp := smallPool.Get().(*[]byte)
	large := false
	defer func() {
		if large {
			largePool.Put(bp)
		} else {
			smallPool.Put(bp)
		}
	}()
	var total int64
	full, short := 0, 0
	for {
		buf := *bp
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			total += int64(nw)
			if werr != nil {
				return total, werr
			}
			if nw != nr {
				return total, io.ErrShortWrite
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return total, nil
			}
			return total, rerr
		}
		switch {
		case !large && nr == len(buf):
			if full++; full >= 2 {
				smallPool.Put(bp)
				bp, large, full = largePool.Get().(*[]byte), true, 0
			}
		case large && nr <= smallBuf:
			if short++; short >= 4 {
				largePool.Put(bp)
				bp, large, short = smallPool.Get().(*[]byte), false, 0
			}
		default:
			full, short = 0, 0
		}
	}
}
