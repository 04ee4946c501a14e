package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/internal/cniwire"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// A pod the CNI plugin enrolled is captured from its first packet, before the
// controller's config names its address: the plugin holds the pod's network set-up
// until CNIAdd has put the pod's veth into the capture and its addresses into the
// enrollment map. Until the controller's config lists the pod running with addresses,
// the agent's view is the controller's state merged with what the plugin said (the pod,
// its labels and service account, read from the API server at that moment).

// cniPod is a pod as the CNI plugin enrolled it. Kept in Options.CNIStateDir, one file
// per pod UID, so a restarted agent still knows pods the controller has not caught up
// with.
type cniPod struct {
	UID             string            `json:"uid"`
	ContainerID     string            `json:"containerID"`
	Namespace       string            `json:"namespace"`
	Name            string            `json:"name"`
	ServiceAccount  string            `json:"serviceAccount"`
	Labels          map[string]string `json:"labels,omitempty"`
	NamespaceLabels map[string]string `json:"namespaceLabels,omitempty"`
	IPs             []netip.Addr      `json:"ips"`
	// IfIndex is the node-side veth, found from the pod's side (VethPeer).
	IfIndex int       `json:"ifindex"`
	Added   time.Time `json:"added"`
}

func (p *cniPod) key() podKey { return podKey{p.Namespace, p.Name} }

// maxCNIPods bounds the pods the plugin may enroll ahead of the controller (a node runs
// at most a few hundred).
const maxCNIPods = 4096

// CNIAdd enrolls a pod for the CNI plugin: it finds the pod's veth from podNS, puts the
// pod into the capture and returns once its addresses are in the enrollment map (the
// plugin then lets the pod's network come up). Any failure is returned: the plugin fails
// the pod's sandbox and the runtime retries it, so no pod of the mesh ever runs
// uncaptured.
func (a *Agent) CNIAdd(r *cniwire.Request, podNS netns.NsHandle) error {
	if err := r.Validate(); err != nil {
		return err
	}
	if a.opts.Capture == nil {
		return errors.New("this agent runs without capture: it cannot enroll pods")
	}
	name := r.Namespace + "/" + r.Name
	idx := 0
	for _, ip := range r.IPs {
		i, err := VethPeer(podNS, ip)
		if err != nil {
			return fmt.Errorf("pod %s: %w", name, err)
		}
		if idx != 0 && i != idx {
			return fmt.Errorf("pod %s: its addresses are on different interfaces (%d, %d)", name, idx, i)
		}
		idx = i
	}
	p := &cniPod{UID: r.UID, ContainerID: r.ContainerID, Namespace: r.Namespace, Name: r.Name,
		ServiceAccount: r.ServiceAccount, Labels: r.Labels, NamespaceLabels: r.NamespaceLabels,
		IPs: r.IPs, IfIndex: idx, Added: time.Now()}
	if p.ServiceAccount == "" {
		p.ServiceAccount = "default"
	}
	a.updateMu.Lock()
	defer a.updateMu.Unlock()
	if a.draining.Load() {
		return errors.New("this agent is handing over to its successor: retry")
	}
	if _, ok := a.cniPods[p.UID]; !ok && len(a.cniPods) >= maxCNIPods {
		return fmt.Errorf("pod %s: %d pods are waiting for the controller's config already", name, maxCNIPods)
	}
	if err := a.saveCNIPod(p); err != nil {
		return fmt.Errorf("pod %s: %w", name, err)
	}
	if a.cniPods == nil {
		a.cniPods = map[string]*cniPod{}
	}
	a.cniPods[p.UID] = p
	a.rebuild()
	got, ok := a.capture.enrolled[p.key()]
	if !ok || got.IfIndex != idx || !sameAddrs(got.IPs, p.IPs) {
		// Not enrolled: leave nothing behind that says it is.
		delete(a.cniPods, p.UID)
		a.removeCNIPod(p.UID)
		a.rebuild()
		return fmt.Errorf("pod %s: the capture did not take it (see the agent's log)", name)
	}
	a.log.Info("cni: pod enrolled before its network came up", "pod", name, "uid", p.UID, "ifindex", idx, "ips", fmt.Sprint(p.IPs))
	return nil
}

// CNIDel forgets what CNIAdd recorded for a pod whose sandbox is being torn down. The
// pod leaves the capture when the view no longer has it (the controller's config, which
// drops it soon).
func (a *Agent) CNIDel(r *cniwire.Request) {
	a.updateMu.Lock()
	defer a.updateMu.Unlock()
	for uid, p := range a.cniPods {
		// The sandbox's own DEL: a late DEL of an earlier sandbox of the same pod (the
		// kubelet's garbage collection) must not drop the running one's record.
		mine := p.ContainerID == r.ContainerID
		if r.ContainerID == "" {
			mine = uid == r.UID
		}
		if mine {
			delete(a.cniPods, uid)
			a.removeCNIPod(uid)
			a.log.Info("cni: pod's sandbox torn down", "pod", p.Namespace+"/"+p.Name, "uid", uid)
		}
	}
	a.rebuild()
}

// ServeCNI answers the plugin on l (a unix seqpacket socket only root can reach) until l
// is closed. Each request has 30 s and at most 16 are handled at once.
func (a *Agent) ServeCNI(l *net.UnixListener) {
	sem := make(chan struct{}, 16)
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			a.log.Error("cni: accept failed", "err", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		sem <- struct{}{}
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			defer func() { <-sem }()
			defer c.Close()
			a.serveCNI(c)
		}()
	}
}

func (a *Agent) serveCNI(c *net.UnixConn) {
	if err := peerIsRoot(c); err != nil {
		a.log.Warn("cni: request refused", "err", err)
		cniwire.Reply(c, err)
		return
	}
	deadline := time.Now().Add(30 * time.Second)
	r, f, err := cniwire.Receive(c, deadline)
	if err != nil {
		a.log.Warn("cni: bad request", "err", err)
		cniwire.Reply(c, err)
		return
	}
	if f != nil {
		defer f.Close()
	}
	switch r.Command {
	case "ADD":
		if f == nil {
			err = fmt.Errorf("pod %s/%s: the request carries no network namespace", r.Namespace, r.Name)
			break
		}
		err = a.CNIAdd(r, netns.NsHandle(f.Fd()))
	case "DEL":
		a.CNIDel(r)
	}
	if err != nil {
		a.log.Error("cni: pod NOT enrolled; its network set-up fails and the runtime retries", "pod", r.Namespace+"/"+r.Name, "err", err)
	}
	cniwire.Reply(c, err)
}

// peerIsRoot refuses a client that is not root: the socket's mode says so already, and
// the peer's credentials make sure of it.
func peerIsRoot(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("cni request: peer credentials: %w", cerr)
	}
	if cred.Uid != 0 {
		return fmt.Errorf("cni request from uid %d (pid %d): only root may enroll pods", cred.Uid, cred.Pid)
	}
	return nil
}

// rebuild recomputes the view from the controller's last state and the CNI's pods.
// Called with updateMu held.
func (a *Agent) rebuild() {
	if a.lastState == nil {
		a.lastState = &cluster.State{Namespaces: map[string]*cluster.Namespace{}}
	}
	a.gcCNIPods()
	st, forced := mergeCNI(a.lastState, a.cniPods, a.opts.Node)
	a.apply(st, forced)
}

// gcCNIPods drops pods whose veth is gone: their sandbox went away while no DEL reached
// this agent.
func (a *Agent) gcCNIPods() {
	for uid, p := range a.cniPods {
		if l, err := netlink.LinkByIndex(p.IfIndex); err == nil && l.Type() == "veth" {
			continue
		}
		delete(a.cniPods, uid)
		a.removeCNIPod(uid)
		a.log.Info("cni: pod's veth is gone; forgetting it", "pod", p.Namespace+"/"+p.Name, "uid", uid)
	}
}

// mergeCNI returns st with the CNI's pods merged in, and the pods whose enrollment the
// CNI decided. A pod the controller lists with the sandbox's addresses is the
// controller's; one it lists without addresses, or with an earlier sandbox's, gets the
// sandbox's; one it does not list is the CNI's. A pod of that name with another UID is
// left as the controller has it (a record of a new pod cannot displace another). Another pod of this node that still claims one
// of a CNI pod's addresses is dropped: the runtime just gave that address to the new
// sandbox, so the old pod is gone.
func mergeCNI(st *cluster.State, pods map[string]*cniPod, node string) (*cluster.State, map[podKey]bool) {
	if len(pods) == 0 {
		return st, nil
	}
	out := *st
	out.Pods = slices.Clone(st.Pods)
	out.Namespaces = maps.Clone(st.Namespaces)
	if out.Namespaces == nil {
		out.Namespaces = map[string]*cluster.Namespace{}
	}
	forced := map[podKey]bool{}
	taken := map[netip.Addr]podKey{}
	for _, uid := range slices.Sorted(maps.Keys(pods)) {
		cp := pods[uid]
		k := cp.key()
		i := slices.IndexFunc(out.Pods, func(p *cluster.Pod) bool { return p.Namespace == k.namespace && p.Name == k.name })
		if i >= 0 && out.Pods[i].UID != "" && out.Pods[i].UID != cp.UID {
			continue // another pod of that name: the controller's word stands until it says otherwise
		}
		if i >= 0 && len(out.Pods[i].IPs) > 0 && sameAddrs(out.Pods[i].IPs, cp.IPs) {
			continue // the controller lists the pod running, with these addresses
		}
		p := &cluster.Pod{Namespace: cp.Namespace, Name: cp.Name, UID: cp.UID, ServiceAccount: cp.ServiceAccount,
			Labels: cp.Labels, Source: "cni " + cp.ContainerID}
		if i >= 0 {
			c := *out.Pods[i] // the same pod, with the sandbox's addresses
			p = &c
		}
		p.Node, p.IPs = node, cp.IPs
		if i >= 0 {
			out.Pods[i] = p
		} else {
			out.Pods = append(out.Pods, p)
		}
		if _, ok := out.Namespaces[cp.Namespace]; !ok {
			out.Namespaces[cp.Namespace] = &cluster.Namespace{Name: cp.Namespace, Labels: cp.NamespaceLabels}
		}
		forced[k] = true
		for _, ip := range cp.IPs {
			taken[ip] = k
		}
	}
	out.Pods = slices.DeleteFunc(out.Pods, func(p *cluster.Pod) bool {
		if p.Node != node {
			return false
		}
		for _, ip := range p.IPs {
			if k, ok := taken[ip]; ok && k != (podKey{p.Namespace, p.Name}) {
				return true
			}
		}
		return false
	})
	return &out, forced
}

// cniLink returns the veth the CNI found for a pod of the view, if it did.
func (a *Agent) cniLink(w *workload) (int, bool) {
	for _, p := range a.cniPods {
		if p.Namespace == w.pod.Namespace && p.Name == w.pod.Name && sameAddrs(p.IPs, w.pod.IPs) {
			return p.IfIndex, true
		}
	}
	return 0, false
}

func (a *Agent) cniFile(uid string) string {
	return filepath.Join(a.opts.CNIStateDir, uid+".json")
}

func (a *Agent) saveCNIPod(p *cniPod) error {
	if a.opts.CNIStateDir == "" {
		return nil
	}
	if strings.ContainsAny(p.UID, "/\\") || p.UID == "." || p.UID == ".." {
		return fmt.Errorf("uid %q is not a pod UID", p.UID)
	}
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(a.opts.CNIStateDir, 0o700); err != nil {
		return fmt.Errorf("cni state: %w", err)
	}
	tmp := a.cniFile(p.UID) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("cni state: %w", err)
	}
	if err := os.Rename(tmp, a.cniFile(p.UID)); err != nil {
		return fmt.Errorf("cni state: %w", err)
	}
	return nil
}

func (a *Agent) removeCNIPod(uid string) {
	if a.opts.CNIStateDir == "" {
		return
	}
	if err := os.Remove(a.cniFile(uid)); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("cni state: cannot remove a pod's record", "uid", uid, "err", err)
	}
}

// loadCNIPods reads the pods a previous agent enrolled for the CNI. A record that
// cannot be read is dropped with a warning: the controller's config covers the pod as
// soon as it lists it.
func (a *Agent) loadCNIPods() {
	if a.opts.CNIStateDir == "" {
		return
	}
	ents, err := os.ReadDir(a.opts.CNIStateDir)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			a.log.Warn("cni state: cannot list it", "dir", a.opts.CNIStateDir, "err", err)
		}
		return
	}
	a.cniPods = map[string]*cniPod{}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		path := filepath.Join(a.opts.CNIStateDir, e.Name())
		b, err := os.ReadFile(path)
		var p cniPod
		if err == nil {
			err = json.Unmarshal(b, &p)
		}
		if err == nil && (p.UID+".json" != e.Name() || p.Namespace == "" || p.Name == "" || len(p.IPs) == 0 || p.IfIndex <= 0) {
			err = errors.New("incomplete record")
		}
		if err != nil {
			a.log.Warn("cni state: dropping an unreadable record", "file", path, "err", err)
			os.Remove(path)
			continue
		}
		a.cniPods[p.UID] = &p
	}
}
