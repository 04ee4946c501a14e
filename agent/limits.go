package agent

import (
	"net/netip"
	"sync"
)

// Default bounds on what the agent proxies at once (Options.MaxConnections and
// MaxConnectionsPerSource). Each proxied connection costs two goroutines and, while it
// waits, a 16 KiB buffer a direction (bulk flows borrow 256 KiB ones).
const (
	defaultMaxConnections = 65536
	defaultMaxPerSource   = 8192
)

// connLimit counts the connections the agent proxies, in all and by source address, and
// refuses past the limits. Safe for concurrent use.
type connLimit struct {
	max, perSource int

	mu       sync.Mutex // guards the fields below
	total    int
	bySource map[netip.Addr]int
}

// acquire takes a slot for a connection from src, or reports false (and takes nothing)
// when a limit is reached.
func (l *connLimit) acquire(src netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.total >= l.max || l.bySource[src] >= l.perSource {
		return false
	}
	if l.bySource == nil {
		l.bySource = map[netip.Addr]int{}
	}
	l.total++
	l.bySource[src]++
	return true
}

func (l *connLimit) release(src netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if l.bySource[src]--; l.bySource[src] <= 0 {
		delete(l.bySource, src)
	}
}
