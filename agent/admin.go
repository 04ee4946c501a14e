package agent

import (
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"sort"
	"strconv"

	"github.com/veilmesh/veil/policy"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// MetricsHandler serves the agent's Prometheus metrics (the agent binary mounts it at
// /metrics on :15020).
func (a *Agent) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(a.opts.Registry, promhttp.HandlerOpts{})
}

// AdminHandler serves the admin endpoints, meant for localhost only: /certs (each local
// identity's certificate state), /config_dump (the workloads and policies in force),
// /explain (a decision for a connection to a local workload, with the policy that made
// it), /trust_bundle (the roots in force, see BundleReporter) and /debug/pprof/.
func (a *Agent) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/certs", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, a.opts.Certs.States())
	})
	mux.HandleFunc("/config_dump", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, a.configDump())
	})
	mux.HandleFunc("/explain", a.explain)
	mux.HandleFunc("/trust_bundle", a.trustBundle)
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

type dumpWorkload struct {
	Namespace string            `json:"namespace"`
	Name      string            `json:"name"`
	Identity  string            `json:"identity"`
	IPs       []string          `json:"ips"`
	Node      string            `json:"node"`
	Enrolled  bool              `json:"enrolled"`
	Local     bool              `json:"local"`
	Labels    map[string]string `json:"labels,omitempty"`
	// For this node's enrolled workloads: the effective mTLS and the policies in scope.
	MTLS     *dumpMTLS `json:"mtls,omitempty"`
	Policies []string  `json:"policies,omitempty"`
	// Waypoint is the waypoint traffic to the pod's own address goes through
	// ("namespace/name", or why its binding cannot be used); ServedBy the identities of
	// the waypoints that may carry traffic to it (its own and its Services'); Placement
	// where its policies are enforced.
	Waypoint  string   `json:"waypoint,omitempty"`
	ServedBy  []string `json:"served_by,omitempty"`
	Placement string   `json:"placement,omitempty"`
}

// dumpMTLS is a workload's PeerAuthentication outcome: the mode the agent enforces
// (DISABLE acts as PERMISSIVE in ambient), the configured one, and who decided it.
type dumpMTLS struct {
	Mode       string     `json:"mode"`
	Configured string     `json:"configured"`
	DecidedBy  string     `json:"decided_by"`
	Ports      []dumpPort `json:"ports,omitempty"`
}

type dumpPort struct {
	Port       uint32 `json:"port"`
	Mode       string `json:"mode"`
	Configured string `json:"configured"`
	DecidedBy  string `json:"decided_by"`
}

type dump struct {
	Node        string         `json:"node"`
	Workloads   []dumpWorkload `json:"workloads"`
	Policies    []string       `json:"policies"`
	Objects     []string       `json:"objects"`
	OpenInbound int            `json:"open_inbound_connections"`
}

func (a *Agent) configDump() dump {
	v := a.view.Load()
	snap := a.store.Snapshot()
	d := dump{Node: a.opts.Node, OpenInbound: a.tracker.len()}
	seen := map[*workload]bool{}
	for _, w := range v.byIP {
		if seen[w] {
			continue
		}
		seen[w] = true
		dw := dumpWorkload{Namespace: w.pod.Namespace, Name: w.pod.Name, Identity: w.id.String(), Node: w.pod.Node, Enrolled: w.enrolled, Local: w.local, Labels: w.pod.Labels}
		for _, ip := range w.pod.IPs {
			dw.IPs = append(dw.IPs, ip.String())
		}
		switch {
		case w.waypointErr != nil:
			dw.Waypoint = "unusable: " + w.waypointErr.Error() + " (connections to the pod fail)"
		case w.waypoint != nil:
			dw.Waypoint = w.waypoint.String() + " (istio.io/waypoint-for=" + w.waypoint.For + ")"
		}
		for id := range w.servedBy {
			dw.ServedBy = append(dw.ServedBy, id.String())
		}
		sort.Strings(dw.ServedBy)
		if w.enrolled {
			dw.Placement = a.placement(w)
		}
		if cw := snap.Workload(w.pod.Namespace, w.pod.Name); cw != nil && w.local && w.enrolled {
			dw.MTLS = mtlsOf(cw, w.pod.Ports)
			for _, p := range cw.Policies {
				dw.Policies = append(dw.Policies, p.String())
			}
		}
		d.Workloads = append(d.Workloads, dw)
	}
	sort.Slice(d.Workloads, func(i, j int) bool {
		x, y := d.Workloads[i], d.Workloads[j]
		if x.Namespace != y.Namespace {
			return x.Namespace < y.Namespace
		}
		return x.Name < y.Name
	})
	for _, p := range snap.Policies() {
		d.Policies = append(d.Policies, p.String())
	}
	for _, o := range snap.Objects() {
		d.Objects = append(d.Objects, o.Key().String())
	}
	return d
}

func decidedBy(o *policy.Object) string {
	if o == nil {
		return "default (no PeerAuthentication sets a mode)"
	}
	return "PeerAuthentication " + o.Namespace + "/" + o.Name
}

// mtlsOf describes the workload's mTLS, per declared port and per port-level setting.
func mtlsOf(cw *policy.CompiledWorkload, declared []uint16) *dumpMTLS {
	pa := &cw.PeerAuth
	m := &dumpMTLS{Mode: pa.AmbientMode(0).String(), Configured: pa.Mode.String(), DecidedBy: decidedBy(pa.Decider(0))}
	ports := map[uint32]bool{}
	for _, p := range declared {
		ports[uint32(p)] = true
	}
	for _, p := range pa.Ports {
		ports[p.Port] = true
	}
	list := make([]uint32, 0, len(ports))
	for p := range ports {
		list = append(list, p)
	}
	sort.Slice(list, func(i, j int) bool { return list[i] < list[j] })
	for _, p := range list {
		m.Ports = append(m.Ports, dumpPort{Port: p, Mode: pa.AmbientMode(p).String(), Configured: pa.PortMode(p).String(), DecidedBy: decidedBy(pa.Decider(p))})
	}
	return m
}

// placement says where the policies that select w are enforced.
func (a *Agent) placement(w *workload) string {
	switch {
	case len(w.servedBy) == 0:
		return "at L4 by this node's agent (no waypoint carries its traffic): HTTP-only ALLOW rules are dropped (fail closed)"
	case a.opts.Policy.Istio():
		return "policy placement istio: its selector policies at L4 by its agent, against the waypoint's identity for traffic a waypoint carries; the waypoint enforces only targetRefs policies"
	}
	s := "policy placement veil: at the waypoint serving it (HTTP attributes and JWT, with the real client's identity) for the traffic it carries; at L4 by its agent for everything else"
	switch {
	case w.waypoint != nil && a.opts.Policy.AllowWaypointBypass:
		s += "; in-mesh connections that bypass its waypoint are judged at L4 (--allow-waypoint-bypass)"
	case w.waypoint != nil:
		s += "; in-mesh connections that bypass its waypoint are refused"
	}
	return s
}

// Explanation is the answer of /explain.
type Explanation struct {
	Allowed  bool   `json:"allowed"`
	Decision string `json:"decision"`
	// Policy is the deciding policy, "namespace/name", or empty.
	Policy      string `json:"policy,omitempty"`
	Destination string `json:"destination"`
	MTLS        string `json:"mtls"`
	// Placement is where the destination's policies are enforced (see dumpWorkload).
	Placement string `json:"placement,omitempty"`
}

// explain decides a connection to a local enrolled workload:
// /explain?dst=IP&port=N[&src=IP][&principal=spiffe://...]. No principal means plaintext.
func (a *Agent) explain(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	dst, err := netip.ParseAddr(q.Get("dst"))
	if err != nil {
		http.Error(w, "dst: "+err.Error(), http.StatusBadRequest)
		return
	}
	port, err := strconv.ParseUint(q.Get("port"), 10, 16)
	if err != nil || port == 0 {
		http.Error(w, "port: want 1-65535", http.StatusBadRequest)
		return
	}
	var src netip.Addr
	if s := q.Get("src"); s != "" {
		if src, err = netip.ParseAddr(s); err != nil {
			http.Error(w, "src: "+err.Error(), http.StatusBadRequest)
			return
		}
	}
	wl := a.view.Load().localEnrolled(dst)
	if wl == nil {
		http.Error(w, dst.String()+" is not an enrolled pod of node "+a.opts.Node, http.StatusNotFound)
		return
	}
	var peer policy.Peer
	if p := q.Get("principal"); p != "" {
		peer = policy.ParsePeer(p)
	}
	snap := a.store.Snapshot()
	d := a.decide(a.view.Load(), snap, &policy.Conn{Peer: peer, SrcIP: src, DstIP: dst, DstPort: uint16(port)})
	e := Explanation{Allowed: d.Allowed(), Decision: d.String(), Destination: wl.String(), Placement: a.placement(wl)}
	if d.Policy != nil {
		e.Policy = d.Policy.Namespace + "/" + d.Policy.Name
	}
	if cw := snap.Workload(wl.pod.Namespace, wl.pod.Name); cw != nil {
		e.MTLS = cw.PeerAuth.AmbientMode(uint32(port)).String() + " on port " + strconv.Itoa(int(port)) + ", set by " + decidedBy(cw.PeerAuth.Decider(uint32(port)))
	}
	writeJSON(w, e)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
