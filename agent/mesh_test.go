package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/policy"
)

// The cluster of the kernel tests: bookinfo is in the mesh, legacy is not.
const clusterYAML = `
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: bookinfo, labels: {app: frontend}}
spec: {serviceAccountName: frontend, nodeName: node-1}
status: {podIP: 10.77.1.10, hostIP: 10.77.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: productpage, namespace: bookinfo, labels: {app: productpage}}
spec: {serviceAccountName: productpage, nodeName: node-1}
status: {podIP: 10.77.1.11, hostIP: 10.77.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: legacy, labels: {app: sleep}}
spec: {serviceAccountName: sleep, nodeName: node-1}
status: {podIP: 10.77.1.20, hostIP: 10.77.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews, namespace: bookinfo, labels: {app: reviews}}
spec: {serviceAccountName: reviews, nodeName: node-2}
status: {podIP: 10.77.2.10, hostIP: 10.77.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings, namespace: bookinfo, labels: {app: ratings}}
spec: {serviceAccountName: ratings, nodeName: node-2}
status: {podIP: 10.77.2.11, hostIP: 10.77.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: reviews}
  ports: [{name: http, port: 80, targetPort: 9080}]
`

var testPods = []podSpec{
	{"frontend", "node-1", netip.MustParseAddr("10.77.1.10")},
	{"productpage", "node-1", netip.MustParseAddr("10.77.1.11")},
	{"sleep", "node-1", netip.MustParseAddr("10.77.1.20")},
	{"reviews", "node-2", netip.MustParseAddr("10.77.2.10")},
	{"ratings", "node-2", netip.MustParseAddr("10.77.2.11")},
}

func podIP(name string) netip.Addr {
	for _, p := range testPods {
		if p.name == name {
			return p.ip
		}
	}
	panic(name)
}

// syncBuffer collects an agent's log.
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

type testMesh struct {
	net    *testNet
	ca     *identity.CA
	agents map[string]*Agent
	logs   map[string]*syncBuffer
}

// newTestMesh builds the network, starts an agent per node with a real CA and the
// cluster above, and starts the application on port 9080 of every pod. With
// withCapture, each node loads the real eBPF capture and pods' connections reach the
// agents by themselves; without, the tests hand them over (capture).
func newTestMesh(t *testing.T, withCapture ...bool) *testMesh {
	t.Helper()
	capture := len(withCapture) > 0 && withCapture[0]
	m := &testMesh{net: newTestNet(t, testPods, !capture), agents: map[string]*Agent{}, logs: map[string]*syncBuffer{}}
	var err error
	if m.ca, err = identity.NewSelfSignedCA(identity.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	st, errs := cluster.Parse("cluster.yaml", []byte(clusterYAML))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	for _, node := range []string{"node-1", "node-2"} {
		logs := &syncBuffer{}
		log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		mgr, err := identity.NewManager(identity.ManagerOptions{Issuer: m.ca, Log: log})
		if err != nil {
			t.Fatal(err)
		}
		ns := m.net.nodes[node]
		opts := Options{
			Node:    node,
			Certs:   mgr,
			Sockets: nsSockets{ns: ns, host: HostSockets{Mark: DefaultMark}},
			Log:     log,
		}
		if capture {
			opts.Capture = loadCapture(t, ns, map[string]string{"node-1": "up1", "node-2": "up2"}[node])
			links := &NetnsLinks{}
			opts.PodLink = func(ip netip.Addr) (idx int, err error) {
				err = ns.do(func() (err error) { idx, err = links.Link(ip); return err })
				return idx, err
			}
		}
		a, err := New(opts)
		if err != nil {
			t.Fatal(err)
		}
		a.Update(st)
		if err := a.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			a.Close()
			mgr.Close()
			if t.Failed() {
				t.Logf("%s agent log:\n%s", node, logs.String())
			}
		})
		m.agents[node], m.logs[node] = a, logs
	}
	for name, ns := range m.net.pods {
		serveApp(t, name, ns.listen(t, fmt.Sprintf("0.0.0.0:%d", appPort)))
	}
	return m
}

// appResults carries what the test application reports out of band, for commands that
// close the connection's write side before they know the answer.
var appResults = make(chan string, 64)

// serveApp is the test application. The client's first line picks what it does:
// "whoami" answers "<pod> sees <remote ip>"; "echo" echoes until EOF; "hash" answers the
// hex SHA-256 of everything after the line once the client half-closes; "hold" waits for
// EOF; "send N" sends N bytes of a ChaCha8 stream (seed 7) and half-closes at once;
// "drain" half-closes at once, then reports the hex SHA-256 of what it reads until EOF on
// appResults; "both" writes "from <pod>", half-closes, and reports what it reads;
// "reset" writes one byte and resets the connection; "wait" reports how its read ended
// ("EOF" or the error).
func serveApp(t *testing.T, pod string, l net.Listener) {
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				br := bufio.NewReader(c)
				cmd, err := br.ReadString('\n')
				if err != nil {
					return
				}
				switch strings.TrimSpace(cmd) {
				case "whoami":
					fmt.Fprintf(c, "%s sees %s", pod, addrPort(c.RemoteAddr()).Addr())
				case "echo":
					io.Copy(c, br)
				case "hash":
					h := sha256.New()
					io.Copy(h, br)
					io.WriteString(c, hex.EncodeToString(h.Sum(nil)))
				case "hold":
					io.Copy(io.Discard, br)
				case "drain":
					c.(*net.TCPConn).CloseWrite()
					h := sha256.New()
					io.Copy(h, br)
					appResults <- hex.EncodeToString(h.Sum(nil))
				case "both":
					fmt.Fprintf(c, "from %s", pod)
					c.(*net.TCPConn).CloseWrite()
					b, _ := io.ReadAll(br)
					appResults <- string(b)
				case "reset":
					c.Write([]byte("x"))
					c.(*net.TCPConn).SetLinger(0)
					return
				case "wait":
					_, err := io.Copy(io.Discard, br)
					if err == nil {
						appResults <- "EOF"
					} else {
						appResults <- err.Error()
					}
				default:
					var n int64
					if _, err := fmt.Sscanf(strings.TrimSpace(cmd), "send %d", &n); err == nil {
						io.CopyN(c, rand.NewChaCha8([32]byte{7}), n)
						c.(*net.TCPConn).CloseWrite()
						io.Copy(io.Discard, br)
						return
					}
				}
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
}

// capture stands in for the BPF capture: it returns an address on the pod's node whose
// connections are handed to that node's agent as if captured on their way to orig.
// plaintext picks the inbound-plaintext path (traffic to an enrolled pod from outside
// the mesh) instead of the outbound one.
func (m *testMesh) capture(t *testing.T, node string, orig netip.AddrPort, plaintext bool) string {
	t.Helper()
	l := m.net.nodes[node].listen(t, m.net.nodeIP[node].String()+":0")
	a := m.agents[node]
	handle := a.Outbound
	if plaintext {
		handle = a.Plaintext
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); handle(context.Background(), c, orig) }()
		}
	}()
	return l.Addr().String()
}

// connectFrom opens a connection from pod to orig through the capture of the pod's node
// (outbound for an enrolled pod) or, for plaintext, of the destination's node. A refused
// connection may fail here already: the agent's reset can beat the client's view of
// the handshake.
func (m *testMesh) connectFrom(t *testing.T, pod string, orig netip.AddrPort, viaNode string, plaintext bool) (net.Conn, error) {
	t.Helper()
	addr := m.capture(t, viaNode, orig, plaintext)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := m.net.pods[pod].dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(60 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c, nil
}

// dialFrom is connectFrom for a connection that must open.
func (m *testMesh) dialFrom(t *testing.T, pod string, orig netip.AddrPort, viaNode string, plaintext bool) net.Conn {
	t.Helper()
	c, err := m.connectFrom(t, pod, orig, viaNode, plaintext)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// whoami asks the application at orig who it sees, from pod.
func (m *testMesh) whoami(t *testing.T, pod string, orig netip.AddrPort, viaNode string, plaintext bool) (string, error) {
	t.Helper()
	c, err := m.connectFrom(t, pod, orig, viaNode, plaintext)
	if err != nil {
		return "", err
	}
	return ask(c, "whoami")
}

// ask sends cmd and returns the whole reply, or the error that ended it.
func ask(c net.Conn, cmd string) (string, error) {
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", err
	}
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	return string(b), err
}

func (m *testMesh) apply(t *testing.T, yaml string) {
	t.Helper()
	man := policy.Parse("test.yaml", []byte(yaml))
	if len(man.Errors) > 0 {
		t.Fatal(man.Errors)
	}
	for _, a := range m.agents {
		if err := a.ApplyPolicies(man.Objects, nil); err != nil {
			t.Fatal(err)
		}
	}
}

func appAddr(pod string) netip.AddrPort { return netip.AddrPortFrom(podIP(pod), appPort) }
