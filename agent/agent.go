package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/internal/handover"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/tunnel"
)

// Certs are the workload certificates the agent presents and the trust bundle it
// checks peers against. *identity.Manager is the implementation.
type Certs interface {
	identity.CertSource
	x509bundle.Source
	Prefetch(ids ...spiffeid.ID) error
	Forget(id spiffeid.ID)
	States() []identity.CertState
}

// Options configure an Agent. Zero values mean the defaults.
type Options struct {
	// Node is the name of the node this agent serves. Required.
	Node string
	// TrustDomain of the mesh. Default cluster.local.
	TrustDomain spiffeid.TrustDomain
	// Policy are the mesh settings of the policy engine (root namespace, trust domain).
	Policy policy.Options
	// Certs issues and holds local workloads' certificates. Required.
	Certs Certs
	// Sockets creates listeners and dials. Default HostSockets{Mark: DefaultMark}.
	Sockets Sockets
	// Addresses of the three listeners. Defaults "[::]:15001", "[::]:15006", "[::]:15008".
	OutboundAddr, PlaintextAddr, HBONEAddr string
	// HBONEPort is the port dialled on remote workloads. Default 15008.
	HBONEPort uint16
	// Capture, when set, is the eBPF capture: the agent attaches it to local pods'
	// veths, enrolls the enrolled ones, registers its listeners, and exports its counters.
	Capture Capture
	// PodLink finds a local pod's veth for pods the CNI plugin did not enroll (those that
	// started before the agent, or clusters without the plugin). Default: a NetnsLinks.
	PodLink PodLink
	// CNIStateDir keeps the pods the CNI plugin enrolled (CNIAdd) until the controller's
	// config lists them, across restarts. Empty: kept in memory only.
	CNIStateDir string
	// Inherited are listeners taken over from a running agent (internal/handover), by
	// name: "outbound", "plaintext", "hbone". A listener named here is served instead of
	// a new one at its address.
	Inherited map[string]net.Listener
	// MaxConnections bounds the connections the agent proxies at once (captured ones and
	// HBONE streams); MaxConnectionsPerSource bounds those of one source address (a pod,
	// or for HBONE the original client). Past them a new connection is reset. Defaults
	// 65536 and 8192.
	MaxConnections, MaxConnectionsPerSource int
	// Registry receives the metrics. Default a new registry (see Agent.Registry).
	Registry *prometheus.Registry
	Log      *slog.Logger
}

// Agent is the node agent's proxy: outbound (15001), inbound plaintext (15006) and
// inbound HBONE (15008), enforcing PeerAuthentication and L4 AuthorizationPolicy for the
// node's enrolled pods. Create it with New, feed it with Update and ApplyPolicies,
// Start it, and Close it. Safe for concurrent use.
type Agent struct {
	opts    Options
	log     *slog.Logger
	view    atomic.Pointer[view]
	store   policy.Store
	pool    *tunnel.Pool
	wpNext  atomic.Uint32 // round robin over waypoint pods
	hbone   *tunnel.Server
	tracker tracker
	metrics *metrics
	// streams maps each admitted HBONE *tunnel.Request to its *inbound until Done.
	streams sync.Map
	// limit bounds the connections proxied at once.
	limit *connLimit
	// denyRate limits the deny log lines.
	denyRate rateLimit
	// twOnce logs once that TIME_WAIT sockets cannot be retired.
	twOnce sync.Once
	// draining is set by Drain: the capture belongs to a successor (or to nobody), and
	// this agent changes it no more.
	draining atomic.Bool
	// live is set once a config from the controller (not a cache) has been applied: the
	// evidence the capture sync needs to un-enroll what a previous agent left pinned.
	live atomic.Bool

	// updateMu serialises Update and ApplyPolicies and guards capture.
	updateMu sync.Mutex
	capture  captured
	// lastState is the controller's (or the cache's) last state; cniPods are the pods
	// the CNI plugin enrolled, by UID. The view is the two merged (mergeCNI).
	lastState *cluster.State
	cniPods   map[string]*cniPod

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex // guards listeners
	listeners []net.Listener
}

// New returns an Agent with an empty view: until Update, every captured connection is
// refused.
func New(opts Options) (*Agent, error) {
	if opts.Node == "" {
		return nil, errors.New("agent: Options.Node is required")
	}
	if opts.Certs == nil {
		return nil, errors.New("agent: Options.Certs is required")
	}
	if opts.TrustDomain.IsZero() {
		opts.TrustDomain = spiffeid.RequireTrustDomainFromString(identity.DefaultTrustDomain)
	}
	if opts.Policy.TrustDomain == "" {
		opts.Policy.TrustDomain = opts.TrustDomain.String()
	}
	if opts.Sockets == nil {
		opts.Sockets = HostSockets{Mark: DefaultMark}
	}
	if opts.OutboundAddr == "" {
		opts.OutboundAddr = "[::]:15001"
	}
	if opts.PlaintextAddr == "" {
		opts.PlaintextAddr = "[::]:15006"
	}
	if opts.HBONEAddr == "" {
		opts.HBONEAddr = "[::]:15008"
	}
	if opts.HBONEPort == 0 {
		opts.HBONEPort = 15008
	}
	if opts.Registry == nil {
		opts.Registry = prometheus.NewRegistry()
		opts.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.PodLink == nil {
		opts.PodLink = (&NetnsLinks{}).Link
	}
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = defaultMaxConnections
	}
	if opts.MaxConnectionsPerSource <= 0 {
		opts.MaxConnectionsPerSource = defaultMaxPerSource
	}
	if opts.Capture != nil {
		if err := opts.Registry.Register(newCaptureCollector(opts.Capture)); err != nil {
			return nil, fmt.Errorf("agent: capture metrics: %w", err)
		}
	}
	if br, ok := opts.Certs.(BundleReporter); ok {
		if err := opts.Registry.Register(newTrustCollector(br, opts.Certs)); err != nil {
			return nil, fmt.Errorf("agent: trust bundle metrics: %w", err)
		}
	}
	a := &Agent{opts: opts, log: opts.Log, metrics: newMetrics(opts.Registry),
		limit: &connLimit{max: opts.MaxConnections, perSource: opts.MaxConnectionsPerSource}}
	a.store.Options = opts.Policy
	a.ctx, a.cancel = context.WithCancel(context.Background())
	a.view.Store(newView(&cluster.State{Namespaces: map[string]*cluster.Namespace{}}, opts.Node, opts.TrustDomain, nil))
	a.loadCNIPods()
	a.pool = &tunnel.Pool{
		TLSConfig: a.clientTLS,
		Dial: func(ctx context.Context, _, addr string) (net.Conn, error) {
			ap, err := netip.ParseAddrPort(addr)
			if err != nil {
				return nil, err
			}
			return a.opts.Sockets.Dial(ctx, netip.AddrPort{}, ap)
		},
	}
	a.hbone = &tunnel.Server{
		TLSConfig: identity.ServerConfig(a.localIdentity, opts.Certs, opts.Certs),
		Handler:   tunnel.HandlerFunc(a.connectInbound),
		Done:      a.inboundDone,
		Log:       opts.Log,
	}
	return a, nil
}

// Registry is where the agent's metrics are registered.
func (a *Agent) Registry() *prometheus.Registry { return a.opts.Registry }

// Update replaces the agent's view of the cluster: pods, namespaces, services. It
// prefetches certificates of the node's enrolled pods, and re-checks open connections.
func (a *Agent) Update(st *cluster.State) {
	a.updateMu.Lock()
	defer a.updateMu.Unlock()
	a.lastState = st
	a.rebuild()
}

// apply makes st (with the pods whose enrollment the CNI decided) the agent's view.
// Called with updateMu held.
func (a *Agent) apply(st *cluster.State, cniEnrolled map[podKey]bool) {
	v := newView(st, a.opts.Node, a.opts.TrustDomain, cniEnrolled)
	a.store.ReplaceWorkloads(policyWorkloads(st)...)
	old := a.view.Swap(v)
	if old != nil && a.metrics != nil {
		now := map[podKey]bool{}
		for _, p := range st.Pods {
			now[podKey{p.Namespace, p.Name}] = true
		}
		for _, p := range old.state.Pods {
			if !now[podKey{p.Namespace, p.Name}] {
				a.metrics.forget(p.Namespace, p.Name)
			}
		}
	}
	for _, ip := range v.conflicts {
		a.log.Error("address claimed by more than one pod: connections to and from it are refused", "ip", ip.String())
	}
	a.syncCapture(v)
	ids := map[spiffeid.ID]bool{}
	for _, w := range v.local {
		ids[w.id] = true
	}
	for id := range ids {
		if err := a.opts.Certs.Prefetch(id); err != nil {
			a.log.Warn("certificate prefetch failed", "identity", id.String(), "err", err)
		}
	}
	// Forget every identity no local pod has, including one a connection in flight
	// asked for after it was last forgotten.
	for _, st := range a.opts.Certs.States() {
		if id, err := spiffeid.FromString(st.ID); err == nil && !ids[id] {
			a.opts.Certs.Forget(id)
		}
	}
	a.recheck()
}

// ApplyPolicies adds or replaces policies and removes those named in deleted. An invalid
// object is rejected alone and the last good version stays in force; the errors are
// returned. Open connections that the new policies deny are closed.
func (a *Agent) ApplyPolicies(objs []*policy.Object, deleted []policy.Key) error {
	a.updateMu.Lock()
	defer a.updateMu.Unlock()
	var err error
	if len(objs) > 0 {
		var warnings []string
		warnings, err = a.store.Apply(objs...)
		for _, w := range warnings {
			a.log.Warn("policy warning", "warning", w)
		}
	}
	if len(deleted) > 0 {
		a.store.Delete(deleted...)
	}
	a.recheck()
	return err
}

// Policies returns the policy snapshot in force.
func (a *Agent) Policies() *policy.Snapshot { return a.store.Snapshot() }

// recheck closes open inbound connections the current policy denies.
func (a *Agent) recheck() {
	v, snap := a.view.Load(), a.store.Snapshot()
	denied, why := a.tracker.recheck(func(c *policy.Conn) policy.Decision { return a.decide(v, snap, c) })
	for i, tr := range denied {
		a.log.Info("connection closed: policy now denies it", "conn", tr.desc, "decision", why[i].String())
		tr.close()
	}
}

// Start opens the three listeners and serves them in the background until Close.
func (a *Agent) Start() error {
	type srv struct {
		addr  string
		serve func(net.Listener)
	}
	servers := []srv{
		{a.opts.OutboundAddr, func(l net.Listener) { a.acceptLoop(l, a.Outbound) }},
		{a.opts.PlaintextAddr, func(l net.Listener) { a.acceptLoop(l, a.Plaintext) }},
		{a.opts.HBONEAddr, func(l net.Listener) { a.hbone.Serve(l) }},
	}
	for i, s := range servers {
		l := a.opts.Inherited[listenerNames[i]]
		var err error
		if l == nil {
			l, err = a.opts.Sockets.Listen(a.ctx, s.addr)
		}
		if err != nil {
			return errors.Join(fmt.Errorf("agent: listen %s: %w", s.addr, err), a.Close())
		}
		a.mu.Lock()
		a.listeners = append(a.listeners, l)
		a.mu.Unlock()
	}
	// Hand the listeners to the capture before serving: from here on, enrolled pods'
	// connections reach them instead of being dropped.
	if a.opts.Capture != nil {
		if err := a.registerListeners(a.listeners[0], a.listeners[1], a.listeners[2]); err != nil {
			return errors.Join(err, a.Close())
		}
	}
	for i, s := range servers {
		l := a.listeners[i]
		a.wg.Add(1)
		go func() { defer a.wg.Done(); s.serve(l) }()
	}
	return nil
}

// listenerNames name the proxy listeners, in Start's order, for a handover.
var listenerNames = []string{"outbound", "plaintext", "hbone"}

// ListenerFiles returns duplicates of the proxy listeners' descriptors, named as
// Options.Inherited takes them, for a successor (internal/handover). The caller closes
// them.
func (a *Agent) ListenerFiles() ([]handover.Listener, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []handover.Listener
	for i, l := range a.listeners {
		fl, ok := l.(interface{ File() (*os.File, error) })
		if !ok {
			return nil, fmt.Errorf("agent: %s listener %T has no descriptor", listenerNames[i], l)
		}
		f, err := fl.File()
		if err != nil {
			for _, o := range out {
				o.File.Close()
			}
			return nil, fmt.Errorf("agent: %s listener: %w", listenerNames[i], err)
		}
		out = append(out, handover.Listener{Name: listenerNames[i], File: f})
	}
	return out, nil
}

// StopCapture makes the agent leave the capture alone from now on: a successor owns it.
// When it returns, no change of this agent's is under way.
func (a *Agent) StopCapture() {
	a.updateMu.Lock()
	a.draining.Store(true)
	a.updateMu.Unlock()
}

// Drain ends the agent gracefully: it stops changing the capture (a successor may own it
// now), stops accepting, sends GOAWAY on its HBONE connections so peers open new streams
// elsewhere, and waits for the connections it proxies to end, until ctx ends; then it
// closes what is left, as Close. The listening sockets stay open as long as another
// process (a successor) holds them.
func (a *Agent) Drain(ctx context.Context) error {
	a.StopCapture()
	a.mu.Lock()
	for _, l := range a.listeners {
		l.Close()
	}
	a.mu.Unlock()
	a.hbone.Shutdown(ctx)
	for {
		a.limit.mu.Lock()
		n := a.limit.total
		a.limit.mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-ctx.Done():
			a.log.Info("drain: grace period over; closing what is left", "connections", n)
			return a.Close()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return a.Close()
}

// Addrs returns the listeners' addresses (outbound, plaintext, HBONE) once started.
func (a *Agent) Addrs() []net.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []net.Addr
	for _, l := range a.listeners {
		out = append(out, l.Addr())
	}
	return out
}

// Close stops the listeners, ends every proxied connection and waits for them.
func (a *Agent) Close() error {
	a.cancel()
	a.mu.Lock()
	for _, l := range a.listeners {
		l.Close()
	}
	a.mu.Unlock()
	a.hbone.Close()
	a.pool.Close()
	a.wg.Wait()
	return nil
}

// acceptLoop hands each accepted connection, with its original destination (the
// accepted socket's local address, which the capture preserved), to handle.
func (a *Agent) acceptLoop(l net.Listener, handle func(context.Context, net.Conn, netip.AddrPort)) {
	tunnel.AcceptLoop(l, func(c net.Conn) {
		src := addrPort(c.RemoteAddr()).Addr()
		if !a.limit.acquire(src) {
			a.denyLog("connection refused: too many connections", "src", src.String(), "dst", c.LocalAddr().String(),
				"max", a.opts.MaxConnections, "max_per_source", a.opts.MaxConnectionsPerSource)
			a.metrics.fail(newFlow("source", nil, nil, "", "", false), flagOverflow)
			reset(c)
			return
		}
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			defer a.limit.release(src)
			handle(a.ctx, c, addrPort(c.LocalAddr()))
		}()
	}, func(err error) { a.log.Error("accept failed; retrying", "addr", l.Addr().String(), "err", err) })
}

// join proxies c, a connection the capture assigned to the agent, and up until both
// directions end or the agent closes, and returns what moved (AToB: from c to up).
func (a *Agent) join(ctx context.Context, c net.Conn, up io.ReadWriteCloser) tunnel.Counts {
	stop := context.AfterFunc(ctx, func() { c.Close(); up.Close() })
	defer stop()
	counts, _ := tunnel.Join(c, up)
	if counts.ClosedAFirst {
		// The agent closed first, so c's tuple sits in TIME_WAIT here, where the
		// capture's sk_assign cannot reuse it: a client that reuses its port would
		// have its SYNs dropped for 60 s (bpf.ForgetTimeWait).
		if f, ok := a.opts.Sockets.(interface {
			ForgetTimeWait(local, remote netip.AddrPort) error
		}); ok {
			if err := f.ForgetTimeWait(addrPort(c.LocalAddr()), addrPort(c.RemoteAddr())); err != nil {
				a.twOnce.Do(func() {
					a.log.Warn("cannot retire TIME_WAIT of captured connections; clients reusing a port may wait", "err", err)
				})
			}
		}
	}
	return counts
}

// localIdentity names the local enrolled workload that owns a dialled address, for the
// HBONE server's certificate choice.
func (a *Agent) localIdentity(local net.Addr) (spiffeid.ID, bool) {
	if w := a.view.Load().localEnrolled(addrPort(local).Addr()); w != nil {
		return w.id, true
	}
	return spiffeid.ID{}, false
}

// clientTLS presents the source workload's certificate and expects the destination's.
func (a *Agent) clientTLS(ctx context.Context, k tunnel.Key) (*tls.Config, error) {
	c, err := a.opts.Certs.Get(ctx, k.Src)
	if err != nil {
		return nil, err
	}
	return identity.ClientConfig(c, k.Dst, a.opts.Certs), nil
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// reset aborts a TCP connection with RST rather than FIN, so the client sees a refusal.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}
