package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/veilmesh/veil/api"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
	"google.golang.org/grpc"
)

// ControllerSource feeds an Agent from veil-controller's config stream (api.ConfigService):
// it subscribes as the agent's node, turns every push into Agent.ApplyPolicies and
// Agent.Update calls, and answers it with an Ack, or with a Nack and the reason when a
// resource does not convert or a policy does not validate; nothing of a Nacked push is
// applied, so the last good config stays in force.
//
// Every config it applies is written to CacheFile, and LoadCache (or Run, first) applies
// that file, so an agent that starts while the controller is unreachable enforces the
// last config it had. It reconnects with capped exponential backoff and jitter, and resumes from the
// version it holds: the controller sends a delta when it can, a full snapshot otherwise.
//
// Call LoadCache (optional) before Run, and Run once. Version is safe for concurrent use.
type ControllerSource struct {
	Agent *Agent
	// Sink, when Agent is nil, is what the config feeds instead (a waypoint), with Node
	// the node it subscribes as and Policy the options its policies validate with.
	Sink   ConfigSink
	Node   string
	Policy policy.Options
	// Conn reaches the controller as this node: TLS and the node's bootstrap token
	// (identity.DialCA; the config stream is served beside the CA).
	Conn grpc.ClientConnInterface
	// CacheFile holds the last good config across restarts; empty means no cache.
	CacheFile string
	// MinBackoff and MaxBackoff bound the wait between reconnections. Defaults 100ms
	// and 10s.
	MinBackoff, MaxBackoff time.Duration
	Log                    *slog.Logger

	// mu guards held and cacheRead; held is only replaced, never modified.
	mu        sync.Mutex
	held      *heldConfig
	cacheRead bool
}

// heldConfig is the config the agent enforces: the resources of the last push it applied.
type heldConfig struct {
	epoch      string
	version    uint64
	generation uint64 // api.Push.generation of the config held
	entries    map[api.Key]heldEntry
}

type heldEntry struct {
	res *api.Resource
	dec api.Decoded
}

// changes is what applying a push takes: the policies to apply and remove, and whether
// the cluster view changed.
type changes struct {
	cluster bool
	objs    []*policy.Object
	deleted []policy.Key
}

// maxPushSize is the largest push the agent accepts (about a million workloads).
const maxPushSize = 256 << 20

// maxReasons caps how many problems a Nack lists.
const maxReasons = 10

// Version returns the epoch and version of the config in force (from the controller or
// the cache); version 0 means none.
func (s *ControllerSource) Version() (epoch string, version uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held == nil {
		return "", 0
	}
	return s.held.epoch, s.held.version
}

func (s *ControllerSource) current() *heldConfig {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held == nil {
		return &heldConfig{entries: map[api.Key]heldEntry{}}
	}
	return s.held
}

// A ConfigSink applies the config a ControllerSource receives: the agent, or a waypoint.
type ConfigSink interface {
	ApplyPolicies(objs []*policy.Object, deleted []policy.Key) error
	Update(st *cluster.State)
}

func (s *ControllerSource) sink() ConfigSink {
	if s.Agent != nil {
		return s.Agent
	}
	return s.Sink
}

func (s *ControllerSource) node() string {
	if s.Agent != nil {
		return s.Agent.opts.Node
	}
	return s.Node
}

func (s *ControllerSource) policyOptions() policy.Options {
	if s.Agent != nil {
		return s.Agent.opts.Policy
	}
	return s.Policy
}

func (s *ControllerSource) log() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	if s.Agent == nil {
		return slog.Default()
	}
	return s.Agent.log
}

// Run applies the cache, then subscribes, applies pushes and reconnects until ctx ends.
// It blocks, and returns nil when ctx ends, or an error at once when s is misconfigured.
func (s *ControllerSource) Run(ctx context.Context) error {
	if s.sink() == nil || s.Conn == nil {
		return errors.New("agent: ControllerSource: Agent (or Sink) and Conn are required")
	}
	log := s.log()
	minB, maxB := s.MinBackoff, s.MaxBackoff
	if minB <= 0 {
		minB = 100 * time.Millisecond
	}
	if maxB < minB {
		maxB = max(10*time.Second, minB)
	}
	s.mu.Lock()
	read := s.cacheRead
	s.mu.Unlock()
	if !read {
		s.LoadCache()
	}
	client := api.NewConfigServiceClient(s.Conn)
	backoff := minB
	for {
		applied, err := s.session(ctx, client)
		if ctx.Err() != nil {
			return nil
		}
		if applied {
			backoff = minB
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		epoch, version := s.Version()
		log.Warn("config stream: disconnected; enforcing the last good config", "epoch", epoch, "version", version, "retry_in", wait.Round(time.Millisecond), "err", err)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, maxB)
	}
}

// LoadCache applies the cached config, if any, so the agent can enforce it before it
// starts listening; Run does it when LoadCache was not called. A cache that does not
// load or apply is logged, ignored and returned: the agent then waits for the
// controller, refusing what it cannot place. A missing cache is not an error.
func (s *ControllerSource) LoadCache() error {
	s.mu.Lock()
	s.cacheRead = true
	s.mu.Unlock()
	if s.CacheFile == "" || s.sink() == nil {
		return nil
	}
	log := s.log()
	p, err := readCache(s.CacheFile)
	if errors.Is(err, os.ErrNotExist) {
		log.Info("config cache: none yet", "file", s.CacheFile)
		return nil
	}
	if err == nil {
		err = s.apply(p, false)
	}
	if err != nil {
		log.Warn("config cache: ignored", "file", s.CacheFile, "err", err)
		return err
	}
	log.Info("config cache: loaded; enforcing it until the controller answers", "file", s.CacheFile, "epoch", p.GetEpoch(), "version", p.GetVersion(), "resources", len(p.GetResources()))
	return nil
}

// session runs one stream. applied reports whether a push was applied.
func (s *ControllerSource) session(ctx context.Context, client api.ConfigServiceClient) (applied bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// A full snapshot is ~90 bytes a workload: past gRPC's default 4 MiB at ~45k.
	stream, err := client.Subscribe(ctx, grpc.MaxCallRecvMsgSize(maxPushSize))
	if err != nil {
		return false, err
	}
	epoch, version := s.Version()
	sub := &api.Subscribe{Node: s.node(), Epoch: epoch, Version: version, Kinds: api.Kinds()}
	if err := stream.Send(&api.AgentMessage{Message: &api.AgentMessage_Subscribe{Subscribe: sub}}); err != nil {
		return false, recvErr(stream, err)
	}
	log := s.log()
	for {
		p, err := stream.Recv()
		if err != nil {
			return applied, err
		}
		start := time.Now()
		if err := s.apply(p, true); err != nil {
			log.Warn("config stream: push rejected; keeping the last good config", "version", p.GetVersion(), "err", err)
			nack := &api.Nack{Version: p.GetVersion(), Reason: err.Error()}
			if err := stream.Send(&api.AgentMessage{Message: &api.AgentMessage_Nack{Nack: nack}}); err != nil {
				return applied, recvErr(stream, err)
			}
			if errors.Is(err, errBase) {
				return applied, err // resubscribe from what we hold
			}
			continue
		}
		applied = true
		log.Debug("config stream: push applied", "version", p.GetVersion(), "full", p.GetFull(), "resources", len(p.GetResources()), "removed", len(p.GetRemoved()), "took", time.Since(start))
		if err := stream.Send(&api.AgentMessage{Message: &api.AgentMessage_Ack{Ack: &api.Ack{Version: p.GetVersion()}}}); err != nil {
			return applied, recvErr(stream, err)
		}
	}
}

// recvErr returns the stream's status when Send failed because the stream ended.
func recvErr(stream grpc.ClientStream, err error) error {
	if errors.Is(err, io.EOF) {
		if rerr := stream.RecvMsg(new(api.Push)); rerr != nil {
			return rerr
		}
	}
	return err
}

var errBase = errors.New("delta does not apply to the config held")

// errOlder is a push older than the config held.
var errOlder = errors.New("config older than the one held")

// apply converts p on top of the config held, and if all of it is good, applies it to
// the agent, makes it the config held, and (when cache) writes the cache.
func (s *ControllerSource) apply(p *api.Push, cache bool) error {
	cur := s.current()
	next, ch, err := nextConfig(cur, p, s.policyOptions())
	if err != nil {
		return err
	}
	if len(ch.objs) > 0 || len(ch.deleted) > 0 {
		// Validated above with the same options, so this should not fail; if it does, the
		// objects it names keep their last good version in the store, and the push is
		// NACKed rather than acknowledged as held.
		if err := s.sink().ApplyPolicies(ch.objs, ch.deleted); err != nil {
			s.log().Error("config stream: policy store rejected a validated policy", "version", p.GetVersion(), "err", err)
			return err
		}
	}
	if cache && s.Agent != nil && !s.Agent.live.Load() {
		// The first config from the controller itself: evidence newer than whatever a
		// previous agent enrolled, so the capture may now reconcile the pinned map.
		s.Agent.live.Store(true)
		ch.cluster = true
	}
	if ch.cluster {
		s.sink().Update(next.state())
	}
	s.mu.Lock()
	s.held = next
	s.mu.Unlock()
	if cache && s.CacheFile != "" {
		if err := writeCache(s.CacheFile, next.snapshot()); err != nil {
			s.log().Warn("config cache: not written; a restart without the controller would start empty", "err", err)
		}
	}
	return nil
}

// nextConfig computes the config after push p on top of cur, and the changes that
// takes. It fails, naming each resource and field at fault, when p does not apply to
// cur, a resource does not convert, or a policy does not validate with opts; cur is
// never modified.
func nextConfig(cur *heldConfig, p *api.Push, opts policy.Options) (*heldConfig, *changes, error) {
	if p.GetEpoch() == "" || p.GetVersion() == 0 {
		return nil, nil, fmt.Errorf("push: epoch and version are required (got %q, %d)", p.GetEpoch(), p.GetVersion())
	}
	if g := p.GetGeneration(); g != 0 && g < cur.generation {
		return nil, nil, fmt.Errorf("push %d: %w: generation %d is older than the %d held (a controller replica that lags)", p.GetVersion(), errOlder, g, cur.generation)
	}
	next := &heldConfig{epoch: p.GetEpoch(), version: p.GetVersion(), generation: max(p.GetGeneration(), cur.generation)}
	ch := &changes{}
	if p.GetFull() {
		next.entries = make(map[api.Key]heldEntry, len(p.GetResources()))
		ch.cluster = true
	} else {
		if p.GetEpoch() != cur.epoch || p.GetBaseVersion() != cur.version {
			return nil, nil, fmt.Errorf("push %d: %w: it is a delta on version %d of epoch %q; the agent holds version %d of epoch %q",
				p.GetVersion(), errBase, p.GetBaseVersion(), p.GetEpoch(), cur.version, cur.epoch)
		}
		next.entries = make(map[api.Key]heldEntry, len(cur.entries)+len(p.GetResources()))
		for k, e := range cur.entries {
			next.entries[k] = e
		}
	}
	var errs []error
	fail := func(err error) {
		if len(errs) < maxReasons {
			errs = append(errs, err)
		}
	}
	upserted := make(map[api.Key]bool, len(p.GetResources()))
	for i, r := range p.GetResources() {
		k, d, err := r.Decode()
		if err != nil {
			fail(fmt.Errorf("resources[%d]: %w", i, err))
			continue
		}
		if upserted[k] {
			fail(fmt.Errorf("resources[%d]: %s: listed twice", i, k))
			continue
		}
		upserted[k] = true
		if d.Policy != nil {
			if _, err := policy.Validate(d.Policy, opts); err != nil {
				fail(fmt.Errorf("resources[%d]: %w", i, err))
				continue
			}
			ch.objs = append(ch.objs, d.Policy)
		} else {
			ch.cluster = true
		}
		next.entries[k] = heldEntry{res: r, dec: d}
	}
	for i, rk := range p.GetRemoved() {
		k, err := api.KeyFromProto(rk)
		if err != nil {
			fail(fmt.Errorf("removed[%d]: %w", i, err))
			continue
		}
		if p.GetFull() {
			fail(fmt.Errorf("removed[%d]: %s: a full snapshot removes nothing", i, k))
			continue
		}
		if upserted[k] {
			fail(fmt.Errorf("removed[%d]: %s: also in resources", i, k))
			continue
		}
		if _, held := next.entries[k]; !held {
			continue
		}
		delete(next.entries, k)
		if pk, ok := k.PolicyKey(); ok {
			ch.deleted = append(ch.deleted, pk)
		} else {
			ch.cluster = true
		}
	}
	if len(errs) > 0 {
		return nil, nil, fmt.Errorf("push %d: %w", p.GetVersion(), errors.Join(errs...))
	}
	if p.GetFull() {
		for k := range cur.entries {
			if _, still := next.entries[k]; still {
				continue
			}
			if pk, ok := k.PolicyKey(); ok {
				ch.deleted = append(ch.deleted, pk)
			}
		}
	}
	return next, ch, nil
}

// state builds the cluster view of the config, in a stable order.
func (h *heldConfig) state() *cluster.State {
	st := &cluster.State{Namespaces: map[string]*cluster.Namespace{}}
	for _, e := range h.entries {
		switch {
		case e.dec.Namespace != nil:
			st.Namespaces[e.dec.Namespace.Name] = e.dec.Namespace
		case e.dec.Pod != nil:
			st.Pods = append(st.Pods, e.dec.Pod)
		case e.dec.Service != nil:
			st.Services = append(st.Services, e.dec.Service)
		case e.dec.Slice != nil:
			st.EndpointSlices = append(st.EndpointSlices, e.dec.Slice)
		case e.dec.Gateway != nil:
			st.Gateways = append(st.Gateways, e.dec.Gateway)
		}
	}
	sort.Slice(st.Gateways, func(i, j int) bool {
		a, b := st.Gateways[i], st.Gateways[j]
		return a.Namespace < b.Namespace || a.Namespace == b.Namespace && a.Name < b.Name
	})
	sort.Slice(st.EndpointSlices, func(i, j int) bool {
		a, b := st.EndpointSlices[i], st.EndpointSlices[j]
		return a.Namespace < b.Namespace || a.Namespace == b.Namespace && a.Name < b.Name
	})
	sort.Slice(st.Pods, func(i, j int) bool {
		a, b := st.Pods[i], st.Pods[j]
		return a.Namespace < b.Namespace || a.Namespace == b.Namespace && a.Name < b.Name
	})
	sort.Slice(st.Services, func(i, j int) bool {
		a, b := st.Services[i], st.Services[j]
		return a.Namespace < b.Namespace || a.Namespace == b.Namespace && a.Name < b.Name
	})
	return st
}

// snapshot returns the config held as a full push, for the cache.
func (h *heldConfig) snapshot() *api.Push {
	keys := make([]api.Key, 0, len(h.entries))
	for k := range h.entries {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		a, b := keys[i], keys[j]
		if a.Kind != b.Kind {
			return a.Kind < b.Kind
		}
		return a.Namespace+"/"+a.Name < b.Namespace+"/"+b.Name
	})
	p := &api.Push{Epoch: h.epoch, Version: h.version, Generation: h.generation, Full: true, Resources: make([]*api.Resource, 0, len(keys))}
	for _, k := range keys {
		p.Resources = append(p.Resources, h.entries[k].res)
	}
	return p
}
