//go:build linux

package bpf

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Role says which of the agent's listeners a socket is.
type Role int

const (
	// Outbound receives enrolled pods' new connections (port 15001 by convention).
	Outbound Role = iota
	// Inbound receives plaintext connections to enrolled pods (15006).
	Inbound
	// InboundHBONE receives connections to enrolled pods' port 15008.
	InboundHBONE
	roleCount
)

func (r Role) String() string {
	switch r {
	case Outbound:
		return "outbound"
	case Inbound:
		return "inbound"
	case InboundHBONE:
		return "inbound-hbone"
	}
	return fmt.Sprintf("Role(%d)", int(r))
}

// Control returns a net.Dialer/net.ListenConfig Control function that sets SO_MARK to mark
// (so capture skips the socket's packets) and, when transparent is true, IP_TRANSPARENT /
// IPV6_TRANSPARENT (so the socket may use a non-local address: a listener receiving
// connections for any destination, or a dial from a pod's address).
func Control(mark uint32, transparent bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if mark != 0 {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark)); serr != nil {
					serr = fmt.Errorf("SO_MARK: %w", serr)
					return
				}
			}
			if !transparent {
				return
			}
			if network == "tcp4" || network == "udp4" {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			}
			if serr != nil {
				serr = fmt.Errorf("IP_TRANSPARENT: %w", serr)
			}
		})
		return errors.Join(err, serr)
	}
}

// Listen opens a transparent TCP listener carrying SO_MARK mark, as the agent's 15001,
// 15006 and 15008 listeners must be. network is "tcp" (dual stack), "tcp4" or "tcp6". It
// needs CAP_NET_ADMIN and does not block.
func Listen(network, address string, mark uint32) (*net.TCPListener, error) {
	lc := net.ListenConfig{Control: Control(mark, true)}
	// Go 1.24+ listens with MPTCP by default; an MPTCP socket cannot enter a SOCKMAP.
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), network, address)
	if err != nil {
		return nil, fmt.Errorf("bpf: listen %s %s: %w", network, address, err)
	}
	return l.(*net.TCPListener), nil
}

// SetListener registers l as the agent's listener for role. Capture starts handing it
// connections at once. A dual-stack listener serves both families; otherwise register one
// per family. The kernel forgets the socket when it closes (fail closed until the next
// SetListener). Safe for concurrent use; does not block.
func (c *Capture) SetListener(role Role, l syscall.Conn) error {
	if role < 0 || role >= roleCount {
		return fmt.Errorf("bpf: set listener: unknown role %d", int(role))
	}
	if err := c.check(); err != nil {
		return err
	}
	v4, v6, err := listenerFamilies(l)
	if err != nil {
		return fmt.Errorf("bpf: set %s listener: %w", role, err)
	}
	if v4 {
		if err := putSocket(c.objs.VeilListeners, uint32(role)*2, l); err != nil {
			return fmt.Errorf("bpf: set %s listener (IPv4): %w", role, err)
		}
	}
	if v6 {
		if err := putSocket(c.objs.VeilListeners, uint32(role)*2+1, l); err != nil {
			return fmt.Errorf("bpf: set %s listener (IPv6): %w", role, err)
		}
	}
	return nil
}

// listenerFamilies reports which address families a listening socket accepts.
func listenerFamilies(l syscall.Conn) (v4, v6 bool, err error) {
	rc, err := l.SyscallConn()
	if err != nil {
		return false, false, err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		var acc int
		if acc, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ACCEPTCONN); serr != nil {
			return
		}
		if acc == 0 {
			serr = errors.New("socket is not listening")
			return
		}
		var proto int
		if proto, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL); serr != nil {
			return
		}
		if proto == unix.IPPROTO_MPTCP {
			serr = errors.New("socket is MPTCP, which a SOCKMAP cannot hold (Go 1.24+ listens with MPTCP by default: use bpf.Listen or ListenConfig.SetMultipathTCP(false))")
			return
		}
		if proto != unix.IPPROTO_TCP {
			serr = fmt.Errorf("socket protocol %d is not TCP", proto)
			return
		}
		var sa unix.Sockaddr
		if sa, serr = unix.Getsockname(int(fd)); serr != nil {
			return
		}
		switch sa.(type) {
		case *unix.SockaddrInet4:
			v4 = true
		case *unix.SockaddrInet6:
			v6 = true
			only, e := unix.GetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_V6ONLY)
			if e != nil {
				serr = e
				return
			}
			v4 = only == 0
		default:
			serr = errors.New("not a TCP/IP socket")
		}
	})
	return v4, v6, errors.Join(err, serr)
}

func putSocket(m *ebpf.Map, key uint32, l syscall.Conn) error {
	rc, err := l.SyscallConn()
	if err != nil {
		return err
	}
	var uerr error
	err = rc.Control(func(fd uintptr) {
		uerr = m.Update(key, uint64(fd), ebpf.UpdateAny)
	})
	if errors.Is(uerr, unix.EOPNOTSUPP) {
		return &FeatureError{Feature: "listening TCP sockets in a SOCKMAP", Version: "5.7", Err: uerr}
	}
	return errors.Join(err, uerr)
}
