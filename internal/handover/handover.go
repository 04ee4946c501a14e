// Package handover passes listening sockets from a running process to its successor, as
// Envoy's hot restart does: the successor connects to a unix socket the running process
// offers, receives every listener's file descriptor in one SCM_RIGHTS message, and
// acknowledges; only then does the running process stop accepting. The sockets never
// close in between, so no connection attempt meets a closed port, and a socket held in a
// BPF SOCKMAP keeps its slot.
//
// The unix socket is created with mode 0600 in a directory the caller owns (root-only in
// the agent's case): whoever can connect to it gets the listeners.
package handover

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Listener is a named listening socket.
type Listener struct {
	Name string
	File *os.File
}

// ErrNoPredecessor is returned by Take when no process offers listeners at the path.
var ErrNoPredecessor = errors.New("handover: no running process offers its listeners")

const maxListeners = 16

// offerWait is how long NewOffer waits for a live process to let the path go.
var offerWait = 10 * time.Second

// Offer serves the listeners at path until Close, or until a successor has taken them and
// acknowledged: then taken is called, in its own goroutine, and the offer closes. A
// successor that fails before acknowledging leaves the offer open for another. files is
// called for each successor and must return fresh descriptors (Offer closes them once
// sent).
type Offer struct {
	l    *net.UnixListener
	path string
	wg   sync.WaitGroup
	once sync.Once
}

// NewOffer listens on path. A socket file left by a process that died is replaced; one a
// live process still serves (a predecessor finishing its own handover) is waited for, up
// to 10 s, then it is an error.
func NewOffer(path string, files func() ([]Listener, error), taken func()) (*Offer, error) {
	for deadline := time.Now().Add(offerWait); ; {
		c, err := net.DialTimeout("unix", path, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("handover: %s: another process is serving it", path)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("handover: %w", err)
	}
	old := unix.Umask(0o177)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("handover: %w", err)
	}
	l.SetUnlinkOnClose(false) // a successor may have taken over the path
	o := &Offer{l: l, path: path}
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			err = o.serve(c, files)
			c.Close()
			if err == nil {
				o.once.Do(func() { go taken() })
				l.Close()
				return
			}
		}
	}()
	return o, nil
}

func (o *Offer) serve(c *net.UnixConn, files func() ([]Listener, error)) error {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	ls, err := files()
	if err != nil {
		return err
	}
	defer func() {
		for _, l := range ls {
			l.File.Close()
		}
	}()
	if len(ls) > maxListeners {
		return fmt.Errorf("handover: %d listeners, at most %d", len(ls), maxListeners)
	}
	names := make([]string, len(ls))
	fds := make([]int, len(ls))
	for i, l := range ls {
		names[i], fds[i] = l.Name, int(l.File.Fd())
	}
	msg, _ := json.Marshal(names)
	if _, _, err := c.WriteMsgUnix(append(msg, '\n'), unix.UnixRights(fds...), nil); err != nil {
		return err
	}
	ack := make([]byte, 3)
	if _, err := io.ReadFull(c, ack); err != nil || string(ack) != "ok\n" {
		return fmt.Errorf("handover: no acknowledgement: %v", err)
	}
	return nil
}

// Close stops offering. It does not remove the socket file: a successor may own it now.
func (o *Offer) Close() error {
	err := o.l.Close()
	o.wg.Wait()
	return err
}

// Take receives the listeners of the process offering them at path and acknowledges.
// It returns ErrNoPredecessor when nothing listens there.
func Take(ctx context.Context, path string) ([]Listener, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, ErrNoPredecessor
		}
		return nil, fmt.Errorf("handover: %w", err)
	}
	c := conn.(*net.UnixConn)
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	} else {
		c.SetDeadline(time.Now().Add(10 * time.Second))
	}
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(maxListeners*4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, fmt.Errorf("handover: %w", err)
	}
	var fds []int
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return nil, fmt.Errorf("handover: %w", err)
	}
	for _, m := range msgs {
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			return nil, fmt.Errorf("handover: %w", err)
		}
		fds = append(fds, got...)
	}
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	var names []string
	if err := json.Unmarshal(bytes.TrimSpace(buf[:n]), &names); err != nil || len(names) != len(fds) {
		closeAll()
		return nil, fmt.Errorf("handover: bad message: %d names for %d descriptors (%v)", len(names), len(fds), err)
	}
	out := make([]Listener, len(fds))
	for i, fd := range fds {
		unix.CloseOnExec(fd)
		out[i] = Listener{Name: names[i], File: os.NewFile(uintptr(fd), names[i])}
	}
	if _, err := c.Write([]byte("ok\n")); err != nil {
		for _, l := range out {
			l.File.Close()
		}
		return nil, fmt.Errorf("handover: acknowledging: %w", err)
	}
	return out, nil
}

// Lock is an exclusive flock on a file or directory: one writer of shared state at a
// time (the agent locks its BPF pin directory).
type Lock struct{ f *os.File }

// Acquire takes the lock on path, waiting for its holder until ctx ends.
func Acquire(ctx context.Context, path string) (*Lock, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("handover: lock %s: %w", path, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return &Lock{f: f}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("handover: lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("handover: lock %s is held by another process: %w", path, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Release gives the lock up. Safe to call more than once.
func (l *Lock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the last descriptor releases the flock
	l.f = nil
	return err
}
