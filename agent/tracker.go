package agent

import (
	"sync"

	"github.com/veilmesh/veil/policy"
)

// tracked is an open inbound connection that policy admitted: what it was decided on,
// and how to end it.
type tracked struct {
	conn  policy.Conn
	desc  string
	close func()
}

// tracker holds the open inbound connections so that a policy change re-decides them
// and closes those now denied. Safe for concurrent use.
type tracker struct {
	mu sync.Mutex // guards m
	m  map[*tracked]struct{}
}

func (t *tracker) add(tr *tracked) (remove func()) {
	t.mu.Lock()
	if t.m == nil {
		t.m = map[*tracked]struct{}{}
	}
	t.m[tr] = struct{}{}
	t.mu.Unlock()
	return func() {
		t.mu.Lock()
		delete(t.m, tr)
		t.mu.Unlock()
	}
}

// recheck re-decides every open connection with decide and returns those now denied, with
// the decisions; the caller closes them.
func (t *tracker) recheck(decide func(*policy.Conn) policy.Decision) (denied []*tracked, why []policy.Decision) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for tr := range t.m {
		if d := decide(&tr.conn); !d.Allowed() {
			denied = append(denied, tr)
			why = append(why, d)
		}
	}
	return denied, why
}

func (t *tracker) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}
