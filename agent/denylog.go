package agent

import (
	"sync"
	"time"
)

// Deny log lines are rate limited: a pod that hammers a denied destination must not fill
// the node's disk. A token bucket of denyLogBurst lines refilled at denyLogRate a second;
// the lines it drops are counted and reported on the next line that goes out.
const (
	denyLogRate  = 20
	denyLogBurst = 100
)

type rateLimit struct {
	mu         sync.Mutex // guards the fields below
	tokens     float64
	last       time.Time
	suppressed int
}

// allow reports whether a line may go out now, and how many were dropped before it.
func (r *rateLimit) allow(now time.Time) (bool, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.last.IsZero() {
		r.tokens, r.last = denyLogBurst, now
	}
	r.tokens = min(denyLogBurst, r.tokens+now.Sub(r.last).Seconds()*denyLogRate)
	r.last = now
	if r.tokens < 1 {
		r.suppressed++
		return false, 0
	}
	r.tokens--
	n := r.suppressed
	r.suppressed = 0
	return true, n
}

// denyLog logs one denied connection at INFO, within the rate limit; veil_policy_denied_total
// and istio_tcp_connections_failed_total count every one of them regardless.
func (a *Agent) denyLog(msg string, args ...any) {
	ok, dropped := a.denyRate.allow(time.Now())
	if !ok {
		return
	}
	if dropped > 0 {
		args = append(args, "suppressed_before", dropped)
	}
	a.log.Info(msg, args...)
}
