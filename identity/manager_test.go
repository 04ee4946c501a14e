package identity

import (
	"context"
	"crypto"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	clocktesting "k8s.io/utils/clock/testing"
)

// countingIssuer wraps a real CA, counts requests, and can be made to fail or block.
type countingIssuer struct {
	ca    *CA
	calls atomic.Int32
	fail  atomic.Bool
	gate  chan struct{} // when non-nil, each Issue waits for it to be closed
}

var errCAUnavailable = errors.New("ca unavailable")

func (c *countingIssuer) Issue(ctx context.Context, id spiffeid.ID, csr []byte, key crypto.Signer, ttl time.Duration) (*Issued, error) {
	c.calls.Add(1)
	if c.gate != nil {
		select {
		case <-c.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if c.fail.Load() {
		return nil, errCAUnavailable
	}
	return c.ca.Issue(ctx, id, csr, key, ttl)
}

var t0 = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)

func newTestManager(t *testing.T, opts ManagerOptions) (*Manager, *countingIssuer, *clocktesting.FakeClock) {
	t.Helper()
	clk := clocktesting.NewFakeClock(t0)
	ca, err := NewSelfSignedCA(CAOptions{Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	iss := &countingIssuer{ca: ca}
	opts.Issuer, opts.Clock = iss, clk
	if opts.Rand == nil {
		opts.Rand = func() float64 { return 0 }
	}
	if opts.TTL == 0 {
		opts.TTL = time.Hour
	}
	m, err := NewManager(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, iss, clk
}

// eventually polls cond for up to 5s of real time: the manager's goroutines react to
// the fake clock asynchronously.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// step advances the fake clock once the keeper is waiting on it.
func step(t *testing.T, clk *clocktesting.FakeClock, d time.Duration) {
	t.Helper()
	eventually(t, "the keeper to wait on the clock", clk.HasWaiters)
	clk.Step(d)
}

func state(t *testing.T, m *Manager, id spiffeid.ID) CertState {
	t.Helper()
	for _, s := range m.States() {
		if s.ID == id.String() {
			return s
		}
	}
	t.Fatalf("no state for %s", id)
	return CertState{}
}

func TestManagerIssuesAndRenewsAtHalfLife(t *testing.T) {
	m, iss, clk := newTestManager(t, ManagerOptions{})
	id := mustID(t, "bookinfo", "reviews")
	c1, err := m.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	leaf := c1.Leaf()
	// Half of the lifetime left when it arrived (at t0): the backdate does not count.
	half := leaf.NotAfter.Sub(t0) / 2
	st := state(t, m, id)
	if st.State != "valid" || !st.RenewAt.Equal(t0.Add(half)) {
		t.Fatalf("state %+v, want valid with renewal at half-life %v", st, t0.Add(half))
	}
	// Just before half-life: nothing happens.
	step(t, clk, st.RenewAt.Sub(clk.Now())-time.Second)
	if n := iss.calls.Load(); n != 1 {
		t.Fatalf("%d CSRs before half-life, want 1", n)
	}
	clk.Step(time.Second)
	eventually(t, "renewal", func() bool { return state(t, m, id).Serial != st.Serial })
	if n := iss.calls.Load(); n != 2 {
		t.Fatalf("%d CSRs after renewal, want 2", n)
	}
	c2, err := m.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if c2 == c1 || c2.Leaf().SerialNumber.Cmp(c1.Leaf().SerialNumber) == 0 {
		t.Fatal("Get returns the old certificate after renewal")
	}
	if c2.Key == c1.Key {
		t.Fatal("renewal reused the key")
	}
}

func TestManagerRenewalJitterIsEarlyNeverLate(t *testing.T) {
	m, _, _ := newTestManager(t, ManagerOptions{Rand: func() float64 { return 0.999 }})
	id := mustID(t, "bookinfo", "reviews")
	c, err := m.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	leaf := c.Leaf()
	half := leaf.NotAfter.Sub(t0) / 2
	renew := state(t, m, id).RenewAt
	earliest := t0.Add(half - half/10)
	if renew.Before(earliest) || !renew.Before(t0.Add(half)) {
		t.Fatalf("renewal at %v, want in [%v, %v)", renew, earliest, t0.Add(half))
	}
}

func TestManagerBacksOffExponentiallyWithCap(t *testing.T) {
	m, iss, clk := newTestManager(t, ManagerOptions{InitialBackoff: time.Second, MaxBackoff: 5 * time.Second})
	iss.fail.Store(true)
	id := mustID(t, "bookinfo", "reviews")
	if _, err := m.Get(context.Background(), id); !errors.Is(err, errCAUnavailable) {
		t.Fatalf("Get error %v, want the CA's error", err)
	}
	for i, want := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second} {
		st := state(t, m, id)
		if got := st.NextAttempt.Sub(clk.Now()); got != want || st.Failures != i+1 {
			t.Fatalf("after %d failures: retry in %v (failures %d), want %v", i+1, got, st.Failures, want)
		}
		calls := iss.calls.Load()
		step(t, clk, want-time.Millisecond)
		if iss.calls.Load() != calls {
			t.Fatalf("retried before the backoff of %v elapsed", want)
		}
		clk.Step(time.Millisecond)
		eventually(t, "a retry", func() bool { return state(t, m, id).Failures == i+2 })
	}
	iss.fail.Store(false)
	step(t, clk, 5*time.Second)
	eventually(t, "recovery", func() bool { return state(t, m, id).State == "valid" })
	if st := state(t, m, id); st.Failures != 0 || st.LastError != "" {
		t.Fatalf("state after recovery %+v", st)
	}
}

func TestManagerKeepsOldCertificateUntilExpiry(t *testing.T) {
	m, iss, clk := newTestManager(t, ManagerOptions{InitialBackoff: time.Minute, MaxBackoff: time.Minute})
	id := mustID(t, "bookinfo", "reviews")
	old, err := m.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	iss.fail.Store(true)
	step(t, clk, state(t, m, id).RenewAt.Sub(clk.Now()))
	eventually(t, "a failed renewal", func() bool { return state(t, m, id).Failures == 1 })
	if st := state(t, m, id); st.State != "renewing" {
		t.Fatalf("state %q, want renewing", st.State)
	}
	got, err := m.Get(context.Background(), id)
	if err != nil || got != old {
		t.Fatalf("during failed renewal Get = %v, %v; want the old certificate", got, err)
	}
	// Retries keep failing until past expiry.
	for clk.Now().Before(old.Leaf().NotAfter) {
		n := state(t, m, id).Failures
		step(t, clk, time.Minute)
		eventually(t, "a retry", func() bool { return state(t, m, id).Failures == n+1 })
	}
	if st := state(t, m, id); st.State != "expired" {
		t.Fatalf("state %q past NotAfter, want expired", st.State)
	}
	if _, err := m.Get(context.Background(), id); !errors.Is(err, errCAUnavailable) {
		t.Fatalf("Get of an expired certificate: %v, want the CA's error", err)
	}
	iss.fail.Store(false)
	step(t, clk, time.Minute)
	eventually(t, "recovery", func() bool { return state(t, m, id).State == "valid" })
	if c, err := m.Get(context.Background(), id); err != nil || c == old {
		t.Fatalf("after recovery Get = %v, %v", c, err)
	}
}

func TestManagerConcurrentGetsShareOneCSR(t *testing.T) {
	m, iss, _ := newTestManager(t, ManagerOptions{})
	iss.gate = make(chan struct{})
	id := mustID(t, "bookinfo", "reviews")
	const n = 50
	var wg sync.WaitGroup
	certs := make([]*Certificate, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			certs[i], errs[i] = m.Get(context.Background(), id)
		}()
	}
	eventually(t, "the CSR to reach the CA", func() bool { return iss.calls.Load() == 1 })
	close(iss.gate)
	wg.Wait()
	for i := range n {
		if errs[i] != nil || certs[i] != certs[0] {
			t.Fatalf("Get %d = %v, %v; want the shared certificate", i, certs[i], errs[i])
		}
	}
	if c := iss.calls.Load(); c != 1 {
		t.Fatalf("%d CSRs for %d concurrent Gets, want 1", c, n)
	}
}

func TestManagerPrefetchAndForget(t *testing.T) {
	m, iss, clk := newTestManager(t, ManagerOptions{})
	a, b := mustID(t, "bookinfo", "reviews"), mustID(t, "bookinfo", "ratings")
	if err := m.Prefetch(a, b); err != nil {
		t.Fatal(err)
	}
	eventually(t, "prefetch", func() bool {
		return state(t, m, a).State == "valid" && state(t, m, b).State == "valid"
	})
	if _, err := m.Get(context.Background(), a); err != nil {
		t.Fatal(err)
	}
	if c := iss.calls.Load(); c != 2 {
		t.Fatalf("%d CSRs, want one per prefetched identity", c)
	}
	m.Forget(b)
	if len(m.States()) != 1 {
		t.Fatalf("states after Forget: %+v", m.States())
	}
	// Only a renews now.
	eventually(t, "both keepers waiting", clk.HasWaiters)
	clk.Step(time.Hour)
	eventually(t, "renewal of a", func() bool { return iss.calls.Load() >= 3 })
	time.Sleep(20 * time.Millisecond)
	if c := iss.calls.Load(); c != 3 {
		t.Fatalf("%d CSRs, want 3: a forgotten identity is not renewed", c)
	}
}

func TestManagerCloseStopsEverything(t *testing.T) {
	before := runtime.NumGoroutine()
	m, iss, _ := newTestManager(t, ManagerOptions{})
	iss.gate = make(chan struct{}) // a request in flight when Close is called
	id := mustID(t, "bookinfo", "reviews")
	getErr := make(chan error, 1)
	go func() { _, err := m.Get(context.Background(), id); getErr <- err }()
	eventually(t, "the CSR", func() bool { return iss.calls.Load() == 1 })
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-getErr; !errors.Is(err, ErrClosed) {
		t.Fatalf("pending Get returned %v, want ErrClosed", err)
	}
	if _, err := m.Get(context.Background(), id); !errors.Is(err, ErrClosed) {
		t.Fatalf("Get after Close: %v, want ErrClosed", err)
	}
	eventually(t, "goroutines to exit", func() bool { return runtime.NumGoroutine() <= before })
}

func TestManagerGetHonoursContext(t *testing.T) {
	m, iss, _ := newTestManager(t, ManagerOptions{})
	iss.gate = make(chan struct{})
	defer close(iss.gate)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := m.Get(ctx, mustID(t, "bookinfo", "reviews")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get error %v, want the context's deadline", err)
	}
}

func TestManagerForgetWakesWaiters(t *testing.T) {
	m, iss, _ := newTestManager(t, ManagerOptions{})
	iss.gate = make(chan struct{})
	defer close(iss.gate)
	id := mustID(t, "bookinfo", "reviews")
	got := make(chan error, 1)
	go func() { _, err := m.Get(context.Background(), id); got <- err }()
	eventually(t, "the CSR", func() bool { return iss.calls.Load() == 1 })
	m.Forget(id)
	select {
	case err := <-got:
		if err == nil || errors.Is(err, ErrClosed) {
			t.Fatalf("Get after Forget: %v, want an error saying it was forgotten", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a Get waiting on a forgotten identity was not woken")
	}
}
