//go:build linux

package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// ForgetTimeWait removes the TIME_WAIT socket of one connection (local is the agent's
// side), through sock_diag's SOCK_DESTROY. It is for connections the capture assigned
// to the agent and that the agent closed first.
//
// Why: the kernel lets a SYN reuse a 4-tuple in TIME_WAIT because its normal socket
// lookup finds the TIME_WAIT socket and retires it for the new connection. A SYN that
// bpf_sk_assign hands to the agent's listener skips that lookup, so the new request
// socket collides with the TIME_WAIT one and the SYN is silently dropped: a client that
// reuses its source port (the kernel does, once its own side has closed) cannot connect
// for the 60 s the TIME_WAIT lasts. TPROXY has the same case handled in the kernel
// (nf_tproxy_handle_time_wait4); for sk_assign the agent does it here.
//
// A tuple with no TIME_WAIT socket is not an error. It needs CAP_NET_ADMIN and a kernel
// with CONFIG_INET_DIAG_DESTROY, and runs in the calling thread's network namespace.
func ForgetTimeWait(local, remote netip.AddrPort) error {
	l, r := local.Addr().Unmap(), remote.Addr().Unmap()
	if l.Is4() != r.Is4() {
		return fmt.Errorf("forget time-wait %s %s: mixed address families", local, remote)
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return fmt.Errorf("forget time-wait: netlink socket: %w", err)
	}
	defer unix.Close(fd)

	// struct nlmsghdr, then struct inet_diag_req_v2.
	const hdrLen, reqLen = 16, 56
	msg := make([]byte, hdrLen+reqLen)
	ne := binary.NativeEndian
	ne.PutUint32(msg[0:], uint32(len(msg)))
	ne.PutUint16(msg[4:], unix.SOCK_DESTROY)
	ne.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	ne.PutUint32(msg[8:], 1) // sequence
	req := msg[hdrLen:]
	req[0] = unix.AF_INET6
	if l.Is4() {
		req[0] = unix.AF_INET
	}
	req[1] = unix.IPPROTO_TCP
	ne.PutUint32(req[4:], 1<<unix.BPF_TCP_TIME_WAIT)
	// struct inet_diag_sockid: the socket's own (source) side first.
	binary.BigEndian.PutUint16(req[8:], local.Port())
	binary.BigEndian.PutUint16(req[10:], remote.Port())
	if l.Is4() {
		a, b := l.As4(), r.As4()
		copy(req[12:], a[:])
		copy(req[28:], b[:])
	} else {
		a, b := l.As16(), r.As16()
		copy(req[12:], a[:])
		copy(req[28:], b[:])
	}
	// idiag_if 0; idiag_cookie INET_DIAG_NOCOOKIE: match by tuple alone.
	ne.PutUint32(req[48:], ^uint32(0))
	ne.PutUint32(req[52:], ^uint32(0))
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("forget time-wait %s %s: %w", local, remote, err)
	}
	buf := make([]byte, 512)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return fmt.Errorf("forget time-wait %s %s: %w", local, remote, err)
	}
	if n < hdrLen+4 || ne.Uint16(buf[4:]) != unix.NLMSG_ERROR {
		return fmt.Errorf("forget time-wait %s %s: unexpected netlink answer", local, remote)
	}
	switch errno := -int32(ne.Uint32(buf[hdrLen:])); {
	case errno == 0, unix.Errno(errno) == unix.ENOENT:
		return nil
	default:
		err := unix.Errno(errno)
		if errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("forget time-wait: the kernel lacks CONFIG_INET_DIAG_DESTROY: %w", err)
		}
		return fmt.Errorf("forget time-wait %s %s: %w", local, remote, err)
	}
}
