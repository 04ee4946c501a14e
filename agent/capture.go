package agent

import (
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/veilmesh/veil/bpf"
)

// Capture is the eBPF capture as the agent drives it; *bpf.Capture implements it.
type Capture interface {
	Attach(ifindex int) error
	Detach(ifindex int) error
	Enroll(p bpf.Pod) error
	Unenroll(p bpf.Pod) error
	SetListener(role bpf.Role, l syscall.Conn) error
	Counters() ([]bpf.Counter, error)
	// List returns what the enrollment map holds (after a restart, what the previous
	// agent enrolled).
	List() ([]bpf.Pod, error)
}

// PodLink returns the index of a local pod's node-side veth, given the pod's address.
type PodLink func(ip netip.Addr) (ifindex int, err error)

// captured is what the agent has put into the capture, by pod.
type captured struct {
	attached map[int]bool       // pod veths with the programs
	enrolled map[podKey]bpf.Pod // enrolled pods
	// reconciled is set once the pinned enrollment map has been checked against a
	// config from the controller (see syncCapture).
	reconciled bool
	links      map[podKey]int // pod -> the veth last found for it
}

type podKey struct{ namespace, name string }

// syncCapture makes the capture match view v: the programs on every local pod's veth
// (enrolled or not: a non-enrolled pod's connections to enrolled pods are captured at
// its veth), enrolled pods in the enrollment map, departed pods out. A pod that cannot
// be enrolled is logged loudly: its traffic is not captured, as a CNI failure would
// leave it. Called with updateMu held.
func (a *Agent) syncCapture(v *view) {
	c := a.opts.Capture
	if c == nil || a.draining.Load() {
		return
	}
	st := &a.capture
	if st.attached == nil {
		st.attached, st.enrolled, st.links = map[int]bool{}, map[podKey]bpf.Pod{}, map[podKey]int{}
	}
	wantAttached := map[int]bool{}
	wantEnrolled := map[podKey]bpf.Pod{}
	for _, w := range v.pods {
		k := podKey{w.pod.Namespace, w.pod.Name}
		// Asked every time, not cached: a pod recreated under its old name (and maybe its
		// old address) has a new veth.
		idx, ok := a.cniLink(w)
		var err error
		if !ok {
			idx, err = a.opts.PodLink(w.pod.IPs[0])
		}
		if err != nil {
			// Not knowing the interface now is no evidence the pod left: what is in
			// force for it stays (its veth keeps the programs, the pod stays enrolled).
			old, known := st.links[k]
			if prev, ok := st.enrolled[k]; ok && w.enrolled {
				wantEnrolled[k] = prev
			}
			if known {
				wantAttached[old] = true
				a.log.Error("capture: cannot find the pod's interface; keeping what is in force", "pod", w.String(), "ifindex", old, "err", err)
			} else {
				a.log.Error("capture: cannot find the pod's interface; its traffic is NOT captured", "pod", w.String(), "err", err)
			}
			continue
		}
		st.links[k] = idx
		wantAttached[idx] = true
		if w.enrolled {
			wantEnrolled[k] = bpf.Pod{IfIndex: idx, IPs: w.pod.IPs}
		}
	}
	present := map[podKey]bool{}
	for _, w := range v.pods {
		present[podKey{w.pod.Namespace, w.pod.Name}] = true
	}
	for k := range st.links {
		if !present[k] {
			delete(st.links, k)
		}
	}
	for k, p := range st.enrolled {
		if _, still := wantEnrolled[k]; !still {
			if err := c.Unenroll(p); err != nil {
				a.log.Error("capture: unenroll failed", "pod", k.namespace+"/"+k.name, "err", err)
			}
			delete(st.enrolled, k)
		}
	}
	for idx := range st.attached {
		if !wantAttached[idx] {
			if err := c.Detach(idx); err != nil {
				a.log.Warn("capture: detach failed", "ifindex", idx, "err", err)
			}
			delete(st.attached, idx)
		}
	}
	for idx := range wantAttached {
		if st.attached[idx] {
			continue
		}
		if err := c.Attach(idx); err != nil {
			a.log.Error("capture: attach failed; the pod's traffic is NOT captured", "ifindex", idx, "err", err)
			continue
		}
		st.attached[idx] = true
	}
	for k, p := range wantEnrolled {
		if old, ok := st.enrolled[k]; ok && old.IfIndex == p.IfIndex && sameAddrs(old.IPs, p.IPs) {
			continue
		}
		if err := c.Enroll(p); err != nil {
			a.log.Error("capture: enroll failed; the pod's traffic is NOT captured", "pod", k.namespace+"/"+k.name, "err", err)
			continue
		}
		st.enrolled[k] = p
		a.log.Info("capture: pod enrolled", "pod", k.namespace+"/"+k.name, "ifindex", p.IfIndex, "ips", fmt.Sprint(p.IPs))
	}
	if a.live.Load() && !st.reconciled {
		a.reconcilePinned(wantEnrolled)
	}
}

// reconcilePinned un-enrolls what the pinned enrollment map holds that the config does
// not: pods that left the mesh while no agent ran. Only on evidence newer than those
// enrollments: a config from the controller, received by this agent after it started,
// is newer than anything a previous agent enrolled from; a config cache is not, and never
// un-enrolls anyone (a stale cache would open plaintext for pods that are still meshed).
func (a *Agent) reconcilePinned(want map[podKey]bpf.Pod) {
	st := &a.capture
	pinned, err := a.opts.Capture.List()
	if err != nil {
		a.log.Error("capture: cannot read the pinned enrollment map to reconcile it; will retry", "err", err)
		return
	}
	keep := map[netip.Addr]bool{}
	for _, p := range want {
		for _, ip := range p.IPs {
			keep[ip] = true
		}
	}
	for _, p := range pinned {
		var stale []netip.Addr
		for _, ip := range p.IPs {
			if !keep[ip] {
				stale = append(stale, ip)
			}
		}
		if len(stale) == 0 {
			continue
		}
		if err := a.opts.Capture.Unenroll(bpf.Pod{IfIndex: p.IfIndex, IPs: stale}); err != nil {
			a.log.Error("capture: cannot un-enroll a pod the config no longer has; will retry", "ifindex", p.IfIndex, "ips", fmt.Sprint(stale), "err", err)
			return
		}
		a.log.Info("capture: un-enrolled what a previous agent enrolled and the controller's config no longer has", "ifindex", p.IfIndex, "ips", fmt.Sprint(stale))
	}
	st.reconciled = true
}

func sameAddrs(a, b []netip.Addr) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// registerListeners hands the agent's listeners to the capture.
func (a *Agent) registerListeners(out, plain, hbone net.Listener) error {
	for _, r := range []struct {
		role bpf.Role
		l    net.Listener
	}{{bpf.Outbound, out}, {bpf.Inbound, plain}, {bpf.InboundHBONE, hbone}} {
		sc, ok := r.l.(syscall.Conn)
		if !ok {
			return fmt.Errorf("agent: %s listener %T has no file descriptor", r.role, r.l)
		}
		if err := a.opts.Capture.SetListener(r.role, sc); err != nil {
			return err
		}
	}
	return nil
}

// captureCollector exports the capture's packet counters on every scrape.
type captureCollector struct {
	c    Capture
	desc *prometheus.Desc
}

func newCaptureCollector(c Capture) *captureCollector {
	return &captureCollector{c: c, desc: prometheus.NewDesc("veil_capture_packets_total",
		"Packets the eBPF capture saw, by what it did (captured, passed, dropped) and why.", []string{"result", "reason"}, nil)}
}

func (cc *captureCollector) Describe(ch chan<- *prometheus.Desc) { ch <- cc.desc }

func (cc *captureCollector) Collect(ch chan<- prometheus.Metric) {
	counters, err := cc.c.Counters()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(cc.desc, err)
		return
	}
	for _, k := range counters {
		ch <- prometheus.MustNewConstMetric(cc.desc, prometheus.CounterValue, float64(k.Value), k.Result, k.Reason)
	}
}
