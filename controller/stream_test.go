package controller

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/veilmesh/veil/api"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// syncBuffer is a log sink that tests read while the server writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

var testTokens = map[string]string{"node-1": "node-1-token-0123456789", "node-2": "node-2-token-0123456789"}

// streamServer is a ConfigServer behind the CA's real gRPC server, with TLS, on loopback.
type streamServer struct {
	ca   *identity.CA
	cfg  *ConfigServer
	addr string
	logs *syncBuffer
	lis  *trackingListener
}

// trackingListener counts the connections the server accepted and those it closed.
type trackingListener struct {
	net.Listener
	mu               sync.Mutex
	accepted, closed int
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.accepted++
	l.mu.Unlock()
	return &trackedConn{Conn: c, l: l}, nil
}

// counts returns how many connections were accepted and how many of them closed.
func (l *trackingListener) counts() (accepted, closed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.accepted, l.closed
}

type trackedConn struct {
	net.Conn
	l    *trackingListener
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { c.l.mu.Lock(); c.l.closed++; c.l.mu.Unlock() })
	return c.Conn.Close()
}

// startStreamServer serves cfg; opts adjust the gRPC server (its keepalive settings).
func startStreamServer(t *testing.T, cfg *ConfigServer, opts ...func(*CAServer)) *streamServer {
	t.Helper()
	ca, err := identity.NewSelfSignedCA(identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	auth, err := identity.NewNodeTokens(testTokens)
	if err != nil {
		t.Fatal(err)
	}
	s := &streamServer{ca: ca, cfg: cfg, logs: &syncBuffer{}}
	log := slog.New(slog.NewTextHandler(s.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.Auth, cfg.Log = auth, log
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = lis.Addr().String()
	s.lis = &trackingListener{Listener: lis}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	srv := &CAServer{CA: ca, Auth: auth, Workloads: &LivePlacement{}, ServerNames: []string{"veil-controller"},
		Services: []interface{ Register(*grpc.Server) }{cfg}, Log: log}
	for _, o := range opts {
		o(srv)
	}
	go func() { done <- srv.Serve(ctx, s.lis) }()
	t.Cleanup(func() {
		cfg.Close()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s
}

// subscriber is a raw api client, so tests see the protocol itself.
type subscriber struct {
	t      *testing.T
	stream api.ConfigService_SubscribeClient
	cancel context.CancelFunc // ends the stream
}

func (s *streamServer) subscribe(t *testing.T, token string, sub *api.Subscribe) (*subscriber, error) {
	t.Helper()
	conn, err := identity.DialCA(s.addr, "veil-controller", s.ca.Roots(), token)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	stream, err := api.NewConfigServiceClient(conn).Subscribe(ctx)
	if err != nil {
		return nil, err
	}
	// io.EOF from Send means the server already ended the stream (a refusal can beat the
	// first message); its status comes from Recv.
	if err := stream.Send(&api.AgentMessage{Message: &api.AgentMessage_Subscribe{Subscribe: sub}}); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return &subscriber{t: t, stream: stream, cancel: cancel}, nil
}

func (s *subscriber) recv() *api.Push {
	s.t.Helper()
	p, err := s.stream.Recv()
	if err != nil {
		s.t.Fatalf("Recv: %v", err)
	}
	return p
}

func (s *subscriber) ack(p *api.Push) {
	s.t.Helper()
	if err := s.stream.Send(&api.AgentMessage{Message: &api.AgentMessage_Ack{Ack: &api.Ack{Version: p.Version}}}); err != nil {
		s.t.Fatal(err)
	}
}

func (s *subscriber) nack(p *api.Push, reason string) {
	s.t.Helper()
	if err := s.stream.Send(&api.AgentMessage{Message: &api.AgentMessage_Nack{Nack: &api.Nack{Version: p.Version, Reason: reason}}}); err != nil {
		s.t.Fatal(err)
	}
}

// testConfig parses the YAML of docs into a Config, failing on any error.
func testConfig(t *testing.T, docs ...string) *Config {
	t.Helper()
	cfg := &Config{Cluster: &cluster.State{Namespaces: map[string]*cluster.Namespace{}}}
	for i, d := range docs {
		st, errs := cluster.Parse("doc", []byte(d))
		if len(errs) > 0 {
			t.Fatalf("doc %d: %v", i, errs)
		}
		for n, ns := range st.Namespaces {
			cfg.Cluster.Namespaces[n] = ns
		}
		cfg.Cluster.Pods = append(cfg.Cluster.Pods, st.Pods...)
		cfg.Cluster.Services = append(cfg.Cluster.Services, st.Services...)
		cfg.Cluster.EndpointSlices = append(cfg.Cluster.EndpointSlices, st.EndpointSlices...)
		cfg.Cluster.Gateways = append(cfg.Cluster.Gateways, st.Gateways...)
		m := policy.Parse("doc", []byte(d))
		if len(m.Errors) > 0 {
			t.Fatalf("doc %d: %v", i, m.Errors)
		}
		cfg.Policies = append(cfg.Policies, m.Objects...)
	}
	return cfg
}

func readTestdata(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func keys(p *api.Push) (out []string) {
	for _, r := range p.Resources {
		out = append(out, r.Key().String())
	}
	for _, rk := range p.Removed {
		k, _ := api.KeyFromProto(rk)
		out = append(out, "-"+k.String())
	}
	return out
}

const denyAll = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: bookinfo}
spec: {}
`

func TestStreamFullSnapshotThenDeltas(t *testing.T) {
	cfg := &ConfigServer{}
	s := startStreamServer(t, cfg)
	clusterYAML, policyYAML := readTestdata(t, "config/cluster.yaml"), readTestdata(t, "config/policy.yaml")
	if _, err := cfg.Set(testConfig(t, clusterYAML, policyYAML)); err != nil {
		t.Fatal(err)
	}
	sub, err := s.subscribe(t, testTokens["node-1"], &api.Subscribe{Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	p := sub.recv()
	want := []string{"NAMESPACE bookinfo", "WORKLOAD bookinfo/productpage-v1", "WORKLOAD bookinfo/reviews-v1", "SERVICE bookinfo/reviews",
		"PEER_AUTHENTICATION bookinfo/default", "AUTHORIZATION_POLICY bookinfo/reviews-allow-productpage"}
	if !p.Full || p.Version != 1 || p.Epoch != cfg.Epoch() || strings.Join(keys(p), ",") != strings.Join(want, ",") {
		t.Fatalf("first push: full=%v version=%d keys=%v; want full version 1 with %v", p.Full, p.Version, keys(p), want)
	}
	// Every resource converts back to what the controller read.
	for _, r := range p.Resources {
		if _, d, err := r.Decode(); err != nil {
			t.Fatal(err)
		} else if d.Pod != nil && d.Pod.Name == "reviews-v1" && (d.Pod.NamedPorts["http"] != 9080 || d.Pod.IPs[0].String() != "10.77.1.10" || !r.GetWorkload().Enrolled) {
			t.Fatalf("reviews-v1 decoded as %+v", d.Pod)
		}
	}
	sub.ack(p)

	// A policy added: a delta with only that policy.
	if v, _ := cfg.Set(testConfig(t, clusterYAML, policyYAML, denyAll)); v != 2 {
		t.Fatalf("version after change = %d, want 2", v)
	}
	p = sub.recv()
	if p.Full || p.Version != 2 || p.BaseVersion != 1 || strings.Join(keys(p), ",") != "AUTHORIZATION_POLICY bookinfo/deny-all" {
		t.Fatalf("delta: full=%v version=%d base=%d keys=%v", p.Full, p.Version, p.BaseVersion, keys(p))
	}
	sub.ack(p)

	// The same config again is no new version.
	if v, _ := cfg.Set(testConfig(t, clusterYAML, policyYAML, denyAll)); v != 2 {
		t.Fatalf("unchanged config got version %d, want 2", v)
	}
	// Two changes while the agent is busy arrive as one delta from what it acked.
	cfg.Set(testConfig(t, clusterYAML, denyAll))
	cfg.Set(testConfig(t, strings.Replace(clusterYAML, "10.77.1.10", "10.77.1.11", 1), denyAll))
	deadline := time.Now().Add(5 * time.Second)
	for cfg.Version() != 4 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	p = sub.recv()
	got := strings.Join(keys(p), ",")
	if p.Version == 3 { // the first change was pushed before the second: one more delta
		sub.ack(p)
		p2 := sub.recv()
		got += "," + strings.Join(keys(p2), ",")
		p = p2
	}
	if p.Version != 4 || !strings.Contains(got, "WORKLOAD bookinfo/reviews-v1") ||
		!strings.Contains(got, "-PEER_AUTHENTICATION bookinfo/default") || !strings.Contains(got, "-AUTHORIZATION_POLICY bookinfo/reviews-allow-productpage") {
		t.Fatalf("deltas to version 4: version %d, keys %s", p.Version, got)
	}
	if ip := p.Resources[0].GetWorkload().GetIps(); len(ip) != 1 || net.IP(ip[0]).String() != "10.77.1.11" {
		t.Fatalf("reviews-v1 ips = %v", ip)
	}
	sub.ack(p)
	if a := cfg.Agents(); len(a) != 1 || a[0] != "node-1" {
		t.Fatalf("Agents() = %v", a)
	}
}

func TestStreamResumeByVersion(t *testing.T) {
	cfg := &ConfigServer{History: 2}
	s := startStreamServer(t, cfg)
	clusterYAML := readTestdata(t, "config/cluster.yaml")
	cfg.Set(testConfig(t, clusterYAML))
	cfg.Set(testConfig(t, clusterYAML, denyAll))
	for _, tc := range []struct {
		name        string
		epoch       string
		version     uint64
		full        bool
		wantChanges int
	}{
		{"current version: empty delta", cfg.Epoch(), 2, false, 0},
		{"one behind: delta", cfg.Epoch(), 1, false, 1},
		{"another epoch: full", "another-run", 1, true, 5},
		{"nothing held: full", "", 0, true, 5},
		{"ahead of the server: full", cfg.Epoch(), 9, true, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sub, err := s.subscribe(t, testTokens["node-2"], &api.Subscribe{Node: "node-2", Epoch: tc.epoch, Version: tc.version})
			if err != nil {
				t.Fatal(err)
			}
			p := sub.recv()
			if p.Full != tc.full || p.Version != 2 || len(p.Resources)+len(p.Removed) != tc.wantChanges {
				t.Fatalf("full=%v version=%d keys=%v; want full=%v version 2 and %d changes", p.Full, p.Version, keys(p), tc.full, tc.wantChanges)
			}
			sub.ack(p)
		})
	}
	// Past the history, a version can only be resumed with a full snapshot.
	cfg.Set(testConfig(t, clusterYAML))
	cfg.Set(testConfig(t, clusterYAML, denyAll))
	sub, err := s.subscribe(t, testTokens["node-2"], &api.Subscribe{Node: "node-2", Epoch: cfg.Epoch(), Version: 1})
	if err != nil {
		t.Fatal(err)
	}
	if p := sub.recv(); !p.Full || p.Version != 4 {
		t.Fatalf("resume from version 1 with history 2 at version 4: full=%v version=%d, want a full snapshot", p.Full, p.Version)
	}
}

func TestStreamNackIsLoggedAndNextPushIsFromLastAck(t *testing.T) {
	cfg := &ConfigServer{}
	s := startStreamServer(t, cfg)
	clusterYAML := readTestdata(t, "config/cluster.yaml")
	cfg.Set(testConfig(t, clusterYAML))
	sub, err := s.subscribe(t, testTokens["node-1"], &api.Subscribe{Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	sub.ack(sub.recv())
	cfg.Set(testConfig(t, clusterYAML, denyAll))
	p := sub.recv()
	sub.nack(p, "AuthorizationPolicy bookinfo/deny-all: spec: test says no")
	waitFor(t, "the NACK logged", func() bool {
		l := s.logs.String()
		return strings.Contains(l, "agent rejected config") && strings.Contains(l, "node=node-1") &&
			strings.Contains(l, "version=2") && strings.Contains(l, "test says no")
	})
	// The next push is a delta from version 1, the last acknowledged: it carries the
	// rejected change again with the new one.
	cfg.Set(testConfig(t, strings.Replace(clusterYAML, "10.77.1.10", "10.77.1.11", 1), denyAll))
	p = sub.recv()
	if p.Full || p.BaseVersion != 1 || p.Version != 3 || len(p.Resources) != 2 {
		t.Fatalf("after NACK: full=%v base=%d version=%d keys=%v; want a delta 1->3 with deny-all and reviews-v1", p.Full, p.BaseVersion, p.Version, keys(p))
	}
}

func TestStreamNodeCannotSubscribeAsAnother(t *testing.T) {
	cfg := &ConfigServer{}
	s := startStreamServer(t, cfg)
	cfg.Set(testConfig(t, readTestdata(t, "config/cluster.yaml")))
	for _, tc := range []struct {
		name, token, node string
		want              codes.Code
	}{
		{"node-1 as node-2", testTokens["node-1"], "node-2", codes.PermissionDenied},
		{"node-1 with no name", testTokens["node-1"], "", codes.PermissionDenied},
		{"unknown token", "not-a-token-0123456789", "node-1", codes.Unauthenticated},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sub, err := s.subscribe(t, tc.token, &api.Subscribe{Node: tc.node})
			if err == nil {
				_, err = sub.stream.Recv()
			}
			if status.Code(err) != tc.want {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	if !strings.Contains(s.logs.String(), `refused: node is not the caller's" node=node-1 subscribe_as=node-2`) {
		t.Errorf("refusal not logged:\n%s", s.logs.String())
	}
}

func TestStreamWaitsForFirstConfigAndEndsOnClose(t *testing.T) {
	cfg := &ConfigServer{}
	s := startStreamServer(t, cfg)
	sub, err := s.subscribe(t, testTokens["node-1"], &api.Subscribe{Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *api.Push, 1)
	go func() {
		p, _ := sub.stream.Recv()
		got <- p
	}()
	select {
	case p := <-got:
		t.Fatalf("push before any config: %v", p)
	case <-time.After(100 * time.Millisecond):
	}
	cfg.Set(testConfig(t, readTestdata(t, "config/cluster.yaml")))
	if p := <-got; p == nil || !p.Full || p.Version != 1 {
		t.Fatalf("first push = %v", p)
	}
	sub.ack(&api.Push{Version: 1})
	cfg.Close()
	if _, err := sub.stream.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("after Close: %v, want Unavailable", err)
	}
	if _, err := cfg.Set(testConfig(t)); err != ErrClosed {
		t.Fatalf("Set after Close: %v", err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func benchConfig(n int, ipByte byte) *Config {
	st := &cluster.State{Namespaces: map[string]*cluster.Namespace{"bookinfo": {Name: "bookinfo"}}}
	for i := 0; i < n; i++ {
		st.Pods = append(st.Pods, &cluster.Pod{Namespace: "bookinfo", Name: "pod-" + strconv.Itoa(i), ServiceAccount: "sa", Node: "node-1",
			Labels: map[string]string{"app": "a" + strconv.Itoa(i%50)}, Ready: true,
			IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})}})
	}
	st.Pods[0].IPs[0] = netip.AddrFrom4([4]byte{10, 255, 255, ipByte})
	return &Config{Cluster: st}
}

// BenchmarkStreamSet10k is the controller's cost of a change in a 10k-workload config:
// convert, diff, publish (one workload changed), and build the delta and a full push.
func BenchmarkStreamSet10k(b *testing.B) {
	cfgs := [2]*Config{benchConfig(10000, 1), benchConfig(10000, 2)}
	var s ConfigServer
	s.Set(cfgs[0])
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		v, _ := s.Set(cfgs[(i+1)%2])
		if p, _ := s.push(v - 1); p.Full || len(p.Resources) != 1 {
			b.Fatalf("delta of %d resources", len(p.Resources))
		}
	}
	b.StopTimer()
	start := time.Now()
	p, _ := s.push(0)
	b.ReportMetric(float64(time.Since(start).Microseconds()), "µs/full-push-build")
	b.ReportMetric(float64(len(p.Resources)), "resources")
}

// An agent is sent only the kinds it decodes: one from before Subscribe listed them (no
// kinds) gets no EndpointSlice and no Gateway, which it would refuse with the whole push;
// one that lists them gets them, adds and removals alike.
func TestStreamSendsOnlyKindsTheAgentKnows(t *testing.T) {
	cfg := &ConfigServer{}
	s := startStreamServer(t, cfg)
	clusterYAML := readTestdata(t, "config/cluster.yaml")
	const extra = `
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: kubernetes, namespace: bookinfo, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints: [{addresses: [10.77.9.9]}]
ports: [{name: http, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
`
	if _, err := cfg.Set(testConfig(t, clusterYAML, extra)); err != nil {
		t.Fatal(err)
	}
	has := func(p *api.Push, kind string) bool {
		for _, k := range keys(p) {
			if strings.HasPrefix(strings.TrimPrefix(k, "-"), kind+" ") {
				return true
			}
		}
		return false
	}
	old, err := s.subscribe(t, testTokens["node-1"], &api.Subscribe{Node: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	p := old.recv()
	if has(p, "ENDPOINT_SLICE") || has(p, "GATEWAY") || !has(p, "WORKLOAD") {
		t.Fatalf("an agent listing no kinds got %v; want no endpoint slice and no gateway", keys(p))
	}
	old.ack(p)
	cur, err := s.subscribe(t, testTokens["node-2"], &api.Subscribe{Node: "node-2", Kinds: api.Kinds()})
	if err != nil {
		t.Fatal(err)
	}
	p = cur.recv()
	if !has(p, "ENDPOINT_SLICE") || !has(p, "GATEWAY") {
		t.Fatalf("an agent listing every kind got %v; want the endpoint slice and the gateway", keys(p))
	}
	cur.ack(p)
	// The Gateway deleted: a removal for the agent that knows Gateways; for the other, a
	// push without it (or none).
	if _, err := cfg.Set(testConfig(t, clusterYAML, strings.SplitN(extra, "---", 2)[0])); err != nil {
		t.Fatal(err)
	}
	if p = cur.recv(); !has(p, "GATEWAY") {
		t.Fatalf("the agent listing every kind got %v; want the gateway's removal", keys(p))
	}
	if p = old.recv(); has(p, "GATEWAY") {
		t.Fatalf("an agent listing no kinds got %v", keys(p))
	}
}
