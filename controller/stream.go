package controller

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/veilmesh/veil/api"
	"github.com/veilmesh/veil/identity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

const (
	// DefaultHistory is how many config versions back an agent can resume with a delta.
	DefaultHistory = 1024
	// DefaultMaxStreamsPerNode is how many config streams a node may hold open at once.
	DefaultMaxStreamsPerNode = 4
	// DefaultAckTimeout is how long an agent has to answer a push.
	DefaultAckTimeout = 30 * time.Second
)

// ConfigServer serves the config stream (api.ConfigService) to node agents: per agent, a
// full snapshot or a delta from the version the agent holds, then a delta after every
// change, one push in flight at a time. Agents authenticate as for the CA, and may
// subscribe only as their own node, with at most MaxStreamsPerNode streams a node, and
// must answer each push within AckTimeout. Feed it with Set; register it on the
// controller's gRPC server; Close it before stopping that server, since streams are
// long-lived.
//
// Until the first Set, subscribers wait: an empty config is never served in place of one
// not read yet. Safe for concurrent use.
type ConfigServer struct {
	api.UnimplementedConfigServiceServer

	Auth identity.Authenticator
	// Source feeds Run. OnConfig, if set, sees every config before agents do (the CA's
	// placement follows the same source).
	Source   Source
	OnConfig func(*Config)
	// History is how many versions back a reconnecting agent can resume with a delta
	// rather than a full snapshot. Default DefaultHistory.
	History int
	// MaxStreamsPerNode is how many config streams one node may hold open at once; a
	// Subscribe beyond it is refused with ResourceExhausted. Default
	// DefaultMaxStreamsPerNode; never less than 2, for a DaemonSet's rolling update,
	// where a node's old and new agent are both connected for a moment.
	MaxStreamsPerNode int
	// AckTimeout is how long the server waits for an agent's answer: the Subscribe that
	// opens a stream, and the Ack or Nack of each push (counted from when the push is
	// handed to the transport). An agent that does not answer in time has its stream
	// ended with DeadlineExceeded; it reconnects and resumes from its version. Default
	// DefaultAckTimeout. A stream with no push in flight has no deadline.
	AckTimeout time.Duration
	// Waypoint, when set, reports whether a workload identity is a waypoint's: a
	// waypoint subscribes to the config with its own credential. Other workloads are
	// refused.
	Waypoint func(spiffeid.ID) bool
	// JWKS, when set, gives the RequestAuthentication rules of every config Set
	// publishes their keys inline (JWKSResolver.Inline). Set its OnChange to Republish.
	JWKS *JWKSResolver
	Log  *slog.Logger

	once sync.Once
	// pub serializes Set and Republish; last is the config Set was last given.
	pub struct {
		sync.Mutex
		last *Config
	}
	// mu guards everything below.
	mu      sync.Mutex
	epoch   string
	cur     *configVersion
	changes []change      // ascending by version; at most History
	changed chan struct{} // closed, and replaced, when cur changes
	closed  chan struct{} // closed by Close
	agents  map[string]int
}

// configVersion is one version of the config. It is immutable once published.
type configVersion struct {
	version    uint64
	generation uint64
	resources  map[api.Key]*entry
}

type entry struct {
	res *api.Resource
	enc []byte // deterministic encoding, to detect changes
}

// change lists the keys that version changed (added, replaced or removed).
type change struct {
	version uint64
	keys    []api.Key
}

// ErrClosed is returned by Set after Close.
var ErrClosed = errors.New("controller: config server closed")

func (s *ConfigServer) init() {
	s.once.Do(func() {
		var b [8]byte
		if _, err := rand.Read(b[:]); err != nil {
			panic(err) // crypto/rand does not fail on Linux
		}
		s.epoch = hex.EncodeToString(b[:])
		s.cur = &configVersion{resources: map[api.Key]*entry{}}
		s.changed = make(chan struct{})
		s.closed = make(chan struct{})
		s.agents = map[string]int{}
	})
}

func (s *ConfigServer) log() *slog.Logger {
	if s.Log == nil {
		return slog.Default()
	}
	return s.Log
}

// Register adds the service to a gRPC server.
func (s *ConfigServer) Register(g *grpc.Server) { api.RegisterConfigServiceServer(g, s) }

// Epoch names this server's run; versions are comparable only within one epoch.
func (s *ConfigServer) Epoch() string {
	s.init()
	return s.epoch
}

// Version is the current config version, 0 before the first Set.
func (s *ConfigServer) Version() uint64 {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur.version
}

// Set publishes cfg. When it differs from the current config the version grows by one
// and every subscriber receives a delta; otherwise nothing happens. It returns the
// version now served. An object that does not convert is left out and reported, the rest
// is published. With JWKS set, it fetches the keys not cached yet first.
func (s *ConfigServer) Set(cfg *Config) (uint64, error) {
	s.init()
	s.pub.Lock()
	defer s.pub.Unlock()
	s.pub.last = cfg
	return s.set(s.withKeys(cfg))
}

func (s *ConfigServer) set(cfg *Config) (uint64, error) {
	next, errs := resources(cfg)
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.closed:
		return s.cur.version, ErrClosed
	default:
	}
	var keys []api.Key
	for k, e := range next {
		if old, ok := s.cur.resources[k]; ok && bytes.Equal(old.enc, e.enc) {
			next[k] = old
			continue
		}
		keys = append(keys, k)
	}
	for k := range s.cur.resources {
		if _, ok := next[k]; !ok {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 && s.cur.version > 0 {
		s.cur.generation = max(s.cur.generation, cfg.Generation)
		return s.cur.version, errors.Join(errs...)
	}
	v := &configVersion{version: s.cur.version + 1, generation: max(s.cur.generation, cfg.Generation), resources: next}
	history := s.History
	if history <= 0 {
		history = DefaultHistory
	}
	s.changes = append(s.changes, change{version: v.version, keys: keys})
	if len(s.changes) > history {
		s.changes = append(s.changes[:0:0], s.changes[len(s.changes)-history:]...)
	}
	s.cur = v
	close(s.changed)
	s.changed = make(chan struct{})
	return v.version, errors.Join(errs...)
}

// Run runs Source, publishing every config it produces, until ctx ends; then it closes
// the server. It blocks, and returns the Source's error.
func (s *ConfigServer) Run(ctx context.Context) error {
	defer s.Close()
	if s.Source == nil {
		return errors.New("controller: ConfigServer.Source is required")
	}
	return s.Source.Run(ctx, func(cfg *Config) {
		if s.OnConfig != nil {
			s.OnConfig(cfg)
		}
		v, err := s.Set(cfg)
		for _, e := range unjoin(err) {
			s.log().Warn("config: object not served", "err", e)
		}
		s.log().Debug("config: published", "version", v)
	})
}

// resources converts a config; the first object of a key wins.
func resources(cfg *Config) (map[api.Key]*entry, []error) {
	out := map[api.Key]*entry{}
	var errs []error
	add := func(r *api.Resource) {
		k := r.Key()
		if _, dup := out[k]; dup {
			errs = append(errs, fmt.Errorf("controller: %s: defined twice; the first is served", k))
			return
		}
		enc, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
		if err != nil {
			errs = append(errs, fmt.Errorf("controller: %s: %w", k, err))
			return
		}
		out[k] = &entry{res: r, enc: enc}
	}
	if st := cfg.Cluster; st != nil {
		for _, ns := range st.Namespaces {
			add(api.NamespaceResource(ns))
		}
		for _, p := range st.Pods {
			add(api.WorkloadResource(st, p))
		}
		for _, svc := range st.Services {
			add(api.ServiceResource(svc))
		}
		for _, sl := range st.EndpointSlices {
			add(api.EndpointSliceResource(sl))
		}
		for _, gw := range st.Gateways {
			add(api.GatewayResource(gw))
		}
	}
	for _, o := range cfg.Policies {
		r, err := api.PolicyResource(o)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		add(r)
	}
	return out, errs
}

// Close ends every stream (the agents reconnect to another controller, or to this one
// when it restarts) and makes later subscriptions fail. It does not block; it is
// idempotent.
func (s *ConfigServer) Close() error {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.closed:
	default:
		close(s.closed)
	}
	return nil
}

// Agents returns the nodes with an open stream.
func (s *ConfigServer) Agents() []string {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for n, c := range s.agents {
		if c > 0 {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// push builds the push that brings an agent from version has (0: nothing, or a version
// of another epoch) to the current version, with the channel that closes on the next
// change. It is a delta when every change since has is still in the history, a full
// snapshot otherwise.
func (s *ConfigServer) push(has uint64) (*api.Push, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.cur
	p := &api.Push{Epoch: s.epoch, Version: cur.version, Generation: cur.generation}
	delta := has > 0 && has <= cur.version && (has == cur.version || (len(s.changes) > 0 && s.changes[0].version <= has+1))
	if !delta {
		p.Full = true
		keys := make([]api.Key, 0, len(cur.resources))
		for k := range cur.resources {
			keys = append(keys, k)
		}
		sort.Slice(keys, func(i, j int) bool { return lessKey(keys[i], keys[j]) })
		p.Resources = make([]*api.Resource, 0, len(keys))
		for _, k := range keys {
			p.Resources = append(p.Resources, cur.resources[k].res)
		}
		return p, s.changed
	}
	p.BaseVersion = has
	seen := map[api.Key]bool{}
	for _, c := range s.changes {
		if c.version <= has {
			continue
		}
		for _, k := range c.keys {
			seen[k] = true
		}
	}
	keys := make([]api.Key, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return lessKey(keys[i], keys[j]) })
	for _, k := range keys {
		if e, ok := cur.resources[k]; ok {
			p.Resources = append(p.Resources, e.res)
		} else {
			p.Removed = append(p.Removed, k.Proto())
		}
	}
	return p, s.changed
}

// ready blocks until the config has a version (the source has loaded), the stream ends,
// or the server closes.
func (s *ConfigServer) ready(stream grpc.ServerStream) error {
	for {
		s.mu.Lock()
		v, ch := s.cur.version, s.changed
		s.mu.Unlock()
		if v > 0 {
			return nil
		}
		select {
		case <-ch:
		case <-stream.Context().Done():
			return stream.Context().Err()
		case <-s.closed:
			return status.Error(codes.Unavailable, "controller: stopping")
		}
	}
}

// maxStreams is the cap on one node's streams in force.
func (s *ConfigServer) maxStreams() int {
	switch n := s.MaxStreamsPerNode; {
	case n <= 0:
		return DefaultMaxStreamsPerNode
	case n < 2:
		return 2
	default:
		return n
	}
}

func (s *ConfigServer) ackTimeout() time.Duration {
	if s.AckTimeout <= 0 {
		return DefaultAckTimeout
	}
	return s.AckTimeout
}

// received is one result of the stream's Recv.
type received struct {
	m   *api.AgentMessage
	err error
}

// errNoAnswer is what recv returns when the agent does not answer in time.
var errNoAnswer = errors.New("no answer in time")

// Subscribe implements api.ConfigServiceServer.
func (s *ConfigServer) Subscribe(stream api.ConfigService_SubscribeServer) error {
	s.init()
	log := s.log()
	ctx := stream.Context()
	if s.Auth == nil {
		return status.Error(codes.Unauthenticated, "controller: no authenticator configured")
	}
	caller, err := s.Auth.Authenticate(ctx)
	if err != nil {
		log.Warn("config: refused: unauthenticated", "peer", peerAddr(stream), "err", err)
		return status.Errorf(codes.Unauthenticated, "controller: %v", err)
	}
	waypoint := !caller.Workload.IsZero() && s.Waypoint != nil && s.Waypoint(caller.Workload)
	if !caller.Workload.IsZero() && !waypoint {
		log.Warn("config: refused: not a node agent", "caller", caller.Name, "identity", caller.Workload.String(), "node", caller.Node)
		return status.Errorf(codes.PermissionDenied, "controller: %s (identity %s) is not a node agent; only node agents subscribe to the config", caller.Name, caller.Workload)
	}
	// The cap counts streams by the credential's node from here, so that streams which
	// never subscribe count too.
	node, limit := caller.Node, s.maxStreams()
	if waypoint {
		// A waypoint's streams count against its identity, not its node's agent.
		node = "waypoint " + caller.Workload.String()
	}
	s.mu.Lock()
	if n := s.agents[node]; n >= limit {
		s.mu.Unlock()
		log.Warn("config: refused: too many streams for the node", "node", node, "streams", n, "max", limit, "peer", peerAddr(stream))
		return status.Errorf(codes.ResourceExhausted, "controller: node %q already has %d config streams open, the most one node may hold (%d)", node, n, limit)
	}
	s.agents[node]++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.agents[node]--
		if s.agents[node] == 0 {
			delete(s.agents, node)
		}
		s.mu.Unlock()
	}()

	// One goroutine receives, so that the wait for an answer can have a deadline. It
	// ends when the stream does (returning from here ends the stream).
	msgs := make(chan received)
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			m, err := stream.Recv()
			select {
			case msgs <- received{m, err}:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	timeout := s.ackTimeout()
	recv := func() (*api.AgentMessage, error) {
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case r := <-msgs:
			return r.m, r.err
		case <-t.C:
			return nil, errNoAnswer
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-s.closed:
			return nil, status.Error(codes.Unavailable, "controller: stopping")
		}
	}

	first, err := recv()
	if err == errNoAnswer {
		log.Warn("config: refused: no Subscribe in time", "node", node, "timeout", timeout, "peer", peerAddr(stream))
		return status.Errorf(codes.DeadlineExceeded, "controller: node %q: no Subscribe within %v", node, timeout)
	}
	if err != nil {
		return err
	}
	sub := first.GetSubscribe()
	if sub == nil {
		return status.Error(codes.InvalidArgument, "controller: the first message must be a Subscribe")
	}
	if sub.GetNode() != caller.Node && !waypoint {
		log.Warn("config: refused: node is not the caller's", "node", caller.Node, "subscribe_as", sub.GetNode(), "peer", peerAddr(stream))
		return status.Errorf(codes.PermissionDenied, "controller: the credential is node %q's; it cannot subscribe as node %q", caller.Node, sub.GetNode())
	}
	log = log.With("node", node)

	if err := s.ready(stream); err != nil {
		return err
	}
	// has is the version the agent holds as far as this server knows.
	var has uint64
	if sub.GetEpoch() == s.epoch {
		has = sub.GetVersion()
	}
	log.Info("config: agent subscribed", "peer", peerAddr(stream), "epoch", sub.GetEpoch(), "version", sub.GetVersion(), "resumed", has > 0)
	// What the agent decodes: it is sent nothing else. An older agent would refuse a
	// resource of a kind it does not know, and with it every push that carries one.
	kinds := sub.GetKinds()
	if len(kinds) == 0 {
		kinds = api.LegacyKinds()
	}
	known := map[api.Kind]bool{}
	for _, k := range kinds {
		known[k] = true
	}
	withheld := map[api.Kind]bool{}
	var sent uint64 // the last version pushed, answered or not
	pushed := false
	for {
		p, changed := s.push(has)
		if pushed && p.Version <= sent {
			select {
			case <-changed:
				continue
			case r := <-msgs:
				if r.err != nil {
					return r.err
				}
				return status.Error(codes.InvalidArgument, "controller: an answer with no push in flight")
			case <-ctx.Done():
				return ctx.Err()
			case <-s.closed:
				return status.Error(codes.Unavailable, "controller: stopping")
			}
		}
		pushed = true
		start := time.Now()
		if n := len(withheld); filterKinds(p, known, withheld) && len(withheld) > n {
			log.Info("config: the agent does not know some kinds; they are not sent to it", "withheld", fmt.Sprint(slices.Sorted(maps.Keys(withheld))))
		}
		if err := stream.Send(p); err != nil {
			return err
		}
		sent = p.Version
		m, err := recv()
		if err == errNoAnswer {
			log.Warn("config: agent did not answer a push in time; ending its stream (it resumes from its version when it reconnects)",
				"version", p.Version, "timeout", timeout, "peer", peerAddr(stream))
			return status.Errorf(codes.DeadlineExceeded, "controller: node %q did not answer push %d within %v; reconnect and resume from your version", node, p.Version, timeout)
		}
		if err != nil {
			return err
		}
		switch {
		case m.GetAck() != nil:
			if m.GetAck().GetVersion() != p.Version {
				return status.Errorf(codes.InvalidArgument, "controller: ack of version %d, want %d", m.GetAck().GetVersion(), p.Version)
			}
			has = p.Version
			log.Debug("config: ack", "version", p.Version, "full", p.Full, "resources", len(p.Resources), "removed", len(p.Removed), "took", time.Since(start))
		case m.GetNack() != nil:
			if m.GetNack().GetVersion() != p.Version {
				return status.Errorf(codes.InvalidArgument, "controller: nack of version %d, want %d", m.GetNack().GetVersion(), p.Version)
			}
			log.Warn("config: agent rejected config; it keeps its last good version", "version", p.Version, "agent_version", has, "reason", m.GetNack().GetReason())
		default:
			return status.Error(codes.InvalidArgument, "controller: want an Ack or a Nack")
		}
	}
}

// filterKinds drops from p what is not of a known kind, noting the kinds it dropped in
// withheld. It reports whether it dropped anything.
func filterKinds(p *api.Push, known, withheld map[api.Kind]bool) bool {
	dropped := false
	p.Resources = slices.DeleteFunc(p.Resources, func(r *api.Resource) bool {
		k := r.Key().Kind
		if !known[k] {
			withheld[k], dropped = true, true
		}
		return !known[k]
	})
	p.Removed = slices.DeleteFunc(p.Removed, func(k *api.ResourceKey) bool {
		if !known[k.GetKind()] {
			withheld[k.GetKind()], dropped = true, true
		}
		return !known[k.GetKind()]
	})
	return dropped
}

func peerAddr(stream grpc.ServerStream) string {
	if p, ok := peer.FromContext(stream.Context()); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}
