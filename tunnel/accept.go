package tunnel

import (
	"errors"
	"net"
	"time"
)

// AcceptLoop accepts connections on l and hands each to handle (which must not block)
// until l is closed; then it returns nil. Other accept errors — out of file
// descriptors, an aborted handshake — are reported to onErr and retried after a pause
// that grows from 5ms to 1s, as net/http does: a listener the capture feeds must not stop
// reading its backlog.
func AcceptLoop(l net.Listener, handle func(net.Conn), onErr func(error)) error {
	var pause time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			if onErr != nil {
				onErr(err)
			}
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			time.Sleep(pause)
			continue
		}
		pause = 0
		handle(c)
	}
}
