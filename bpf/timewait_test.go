//go:build linux

package bpf

import (
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
)

// A connection whose server side closed first leaves a TIME_WAIT socket on the server;
// ForgetTimeWait removes exactly that one, for IPv4 and IPv6, and a tuple without one is
// not an error.
func TestForgetTimeWait(t *testing.T) {
	requireRoot(t)
	ns := newNS(t, "tw")
	for _, addr := range []string{"127.0.0.1", "::1"} {
		t.Run(addr, func(t *testing.T) {
			var server, client netip.AddrPort
			ns.do(t, func() error {
				l, err := net.Listen("tcp", net.JoinHostPort(addr, "0"))
				if err != nil {
					return err
				}
				defer l.Close()
				c, err := net.Dial("tcp", l.Addr().String())
				if err != nil {
					return err
				}
				s, err := l.Accept()
				if err != nil {
					return err
				}
				server = s.LocalAddr().(*net.TCPAddr).AddrPort()
				client = s.RemoteAddr().(*net.TCPAddr).AddrPort()
				s.(*net.TCPConn).CloseWrite() // the server's FIN first
				c.Read(make([]byte, 1))
				c.Close()
				s.Read(make([]byte, 1))
				s.Close()
				return nil
			})
			tw := func() bool {
				out, err := exec.Command("ip", "netns", "exec", ns.name, "ss", "-Htan", "state", "time-wait").CombinedOutput()
				if err != nil {
					t.Fatalf("ss: %v: %s", err, out)
				}
				return strings.Contains(string(out), server.String()) && strings.Contains(string(out), client.String())
			}
			if !tw() {
				t.Fatalf("no TIME_WAIT socket for %s %s to forget", server, client)
			}
			ns.do(t, func() error { return ForgetTimeWait(server, client) })
			if tw() {
				t.Fatalf("TIME_WAIT %s %s is still there", server, client)
			}
			ns.do(t, func() error { return ForgetTimeWait(server, client) }) // gone: not an error
		})
	}
}
