package agent

import (
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"syscall"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/bpf"
	"github.com/veilmesh/veil/internal/cluster"
)

// fakeCapture records what the sync asks of the capture.
type fakeCapture struct {
	attached map[int]bool
	enrolled map[netip.Addr]int
	detached []int
}

func newFakeCapture() *fakeCapture {
	return &fakeCapture{attached: map[int]bool{}, enrolled: map[netip.Addr]int{}}
}

func (f *fakeCapture) Attach(i int) error { f.attached[i] = true; return nil }
func (f *fakeCapture) Detach(i int) error {
	delete(f.attached, i)
	f.detached = append(f.detached, i)
	return nil
}
func (f *fakeCapture) Enroll(p bpf.Pod) error {
	for _, ip := range p.IPs {
		f.enrolled[ip] = p.IfIndex
	}
	return nil
}
func (f *fakeCapture) Unenroll(p bpf.Pod) error {
	for _, ip := range p.IPs {
		delete(f.enrolled, ip)
	}
	return nil
}
func (f *fakeCapture) SetListener(bpf.Role, syscall.Conn) error { return nil }
func (f *fakeCapture) Counters() ([]bpf.Counter, error)         { return nil, nil }
func (f *fakeCapture) List() ([]bpf.Pod, error) {
	byIdx := map[int][]netip.Addr{}
	for ip, idx := range f.enrolled {
		byIdx[idx] = append(byIdx[idx], ip)
	}
	var out []bpf.Pod
	for idx, ips := range byIdx {
		out = append(out, bpf.Pod{IfIndex: idx, IPs: ips})
	}
	return out, nil
}

const syncCluster = `
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: bookinfo}
spec: {serviceAccountName: a, nodeName: node-1}
status: {podIP: 10.77.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: bookinfo}
spec: {serviceAccountName: b, nodeName: node-1}
status: {podIP: 10.77.1.11}
`

func syncAgent(t *testing.T, fc *fakeCapture, link PodLink) *Agent {
	return &Agent{opts: Options{Node: "node-1", Capture: fc, PodLink: link}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
}

func syncTo(t *testing.T, a *Agent, yaml string) {
	t.Helper()
	st, errs := cluster.Parse("sync.yaml", []byte(yaml))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	a.syncCapture(newView(st, "node-1", spiffeid.RequireTrustDomainFromString("cluster.local"), nil))
}

// A failed interface lookup (a missing route, a transient netlink error) is no evidence
// that a pod left: it stays enrolled and its veth keeps the programs.
func TestSyncKeepsPodsWhoseInterfaceLookupFails(t *testing.T) {
	fc := newFakeCapture()
	fail := false
	links := map[netip.Addr]int{netip.MustParseAddr("10.77.1.10"): 11, netip.MustParseAddr("10.77.1.11"): 12}
	a := syncAgent(t, fc, func(ip netip.Addr) (int, error) {
		if fail && ip == netip.MustParseAddr("10.77.1.10") {
			return 0, errors.New("route to 10.77.1.10 leaves through eth0 (device), not a pod's veth")
		}
		return links[ip], nil
	})
	syncTo(t, a, syncCluster)
	if !fc.attached[11] || fc.enrolled[netip.MustParseAddr("10.77.1.10")] != 11 {
		t.Fatalf("first sync: attached %v enrolled %v", fc.attached, fc.enrolled)
	}
	fail = true
	syncTo(t, a, syncCluster)
	if !fc.attached[11] || fc.enrolled[netip.MustParseAddr("10.77.1.10")] != 11 || len(fc.detached) != 0 {
		t.Fatalf("after a failed lookup: attached %v enrolled %v detached %v", fc.attached, fc.enrolled, fc.detached)
	}
}

// Two pods claiming one address (IPAM reuse) leave the address out of the view, but
// both pods stay in the capture: a conflict must fail closed, not open.
func TestSyncKeepsConflictingPodsEnrolled(t *testing.T) {
	fc := newFakeCapture()
	a := syncAgent(t, fc, func(ip netip.Addr) (int, error) { return 11, nil })
	syncTo(t, a, syncCluster)
	conflict := syncCluster + `---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: bookinfo}
spec: {serviceAccountName: c, nodeName: node-1}
status: {podIP: 10.77.1.10}
`
	syncTo(t, a, conflict)
	if fc.enrolled[netip.MustParseAddr("10.77.1.10")] == 0 || !fc.attached[11] || len(fc.detached) != 0 {
		t.Fatalf("after a conflict: attached %v enrolled %v detached %v", fc.attached, fc.enrolled, fc.detached)
	}
}

// After a restart the pinned enrollment map holds what the previous agent enrolled. A
// pod that left the mesh meanwhile is un-enrolled once a config from the controller says
// so, never on a config cache, which may be older than the enrollment.
func TestSyncReconcilesThePinnedMapOnlyOnControllerConfig(t *testing.T) {
	fc := newFakeCapture()
	left := netip.MustParseAddr("10.77.1.99")
	fc.enrolled[left] = 19 // enrolled by the previous agent; the pod is gone
	fc.enrolled[netip.MustParseAddr("10.77.1.10")] = 11
	a := syncAgent(t, fc, func(ip netip.Addr) (int, error) {
		return map[netip.Addr]int{netip.MustParseAddr("10.77.1.10"): 11, netip.MustParseAddr("10.77.1.11"): 12}[ip], nil
	})
	syncTo(t, a, syncCluster) // from the config cache
	if fc.enrolled[left] != 19 {
		t.Fatal("a config cache un-enrolled a pod a previous agent enrolled")
	}
	a.live.Store(true) // the first config from the controller
	syncTo(t, a, syncCluster)
	if _, still := fc.enrolled[left]; still {
		t.Fatal("the controller's config did not un-enroll a pod that left the mesh")
	}
	if fc.enrolled[netip.MustParseAddr("10.77.1.10")] != 11 || fc.enrolled[netip.MustParseAddr("10.77.1.11")] != 12 {
		t.Fatalf("enrolled %v", fc.enrolled)
	}
}
