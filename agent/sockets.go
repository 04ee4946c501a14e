package agent

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/veilmesh/veil/bpf"
	"golang.org/x/sys/unix"
)

// DefaultMark is the SO_MARK the agent puts on its sockets. The capture lets marked
// packets through, so the agent's own connections are never captured again.
const DefaultMark = bpf.DefaultAgentMark

// Sockets creates the agent's sockets. Listeners are transparent (IP_TRANSPARENT), so
// they accept connections assigned to them for addresses that are not the node's;
// dials may be transparent too, binding to the original client's address so the
// application sees who really connected. Every socket carries the mark.
type Sockets interface {
	Listen(ctx context.Context, addr string) (net.Listener, error)
	// Dial connects to raddr. A valid src binds the socket to that (non-local) address.
	Dial(ctx context.Context, src, raddr netip.AddrPort) (net.Conn, error)
}

// HostSockets creates sockets in the agent's own network namespace.
type HostSockets struct {
	Mark int
}

func (h HostSockets) control(transparent bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if h.Mark != 0 {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, h.Mark); serr != nil {
					serr = fmt.Errorf("SO_MARK: %w", serr)
					return
				}
			}
			if !transparent {
				return
			}
			if network == "tcp6" {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			}
			if serr != nil {
				serr = fmt.Errorf("IP_TRANSPARENT (needs CAP_NET_ADMIN): %w", serr)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// Listen implements Sockets.
func (h HostSockets) Listen(ctx context.Context, addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: h.control(true)}
	// An MPTCP socket cannot enter the capture's SOCKMAP, and Go listens with MPTCP by
	// default since 1.24.
	lc.SetMultipathTCP(false)
	return lc.Listen(ctx, "tcp", addr)
}

// ForgetTimeWait retires the TIME_WAIT socket of a captured connection the agent closed
// first (bpf.ForgetTimeWait).
func (h HostSockets) ForgetTimeWait(local, remote netip.AddrPort) error {
	return bpf.ForgetTimeWait(local, remote)
}

// Dial implements Sockets.
func (h HostSockets) Dial(ctx context.Context, src, raddr netip.AddrPort) (net.Conn, error) {
	d := net.Dialer{Control: h.control(src.IsValid())}
	if src.IsValid() {
		// Port 0: the kernel picks one. Reusing the client's port would collide with its
		// own connection in the same namespace.
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src.Addr(), 0))
	}
	return d.DialContext(ctx, "tcp", raddr.String())
}
