package agent

import (
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"sort"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// MetricsHandler serves the agent's Prometheus metrics (the agent binary mounts it at
// /metrics on :15020).
func (a *Agent) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(a.opts.Registry, promhttp.HandlerOpts{})
}

// AdminHandler serves the admin endpoints, meant for localhost only: /certs (each local
// identity's certificate state), /config_dump (the workloads and policies in force) and
// /debug/pprof/.
func (a *Agent) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/certs", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, a.opts.Certs.States())
	})
	mux.HandleFunc("/config_dump", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, a.configDump())
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

type dumpWorkload struct {
	Namespace          string            `json:"namespace"`
	Name               string            `json:"name"`
	Identity           string            `json:"identity"`
	IPs                []string          `json:"ips"`
	Node               string            `json:"node"`
	Enrolled           bool              `json:"enrolled"`
	Local              bool              `json:"local"`
	Labels             map[string]string `json:"labels,omitempty"`
	PeerAuthentication string            `json:"peer_authentication,omitempty"`
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
		if cw := snap.Workload(w.pod.Namespace, w.pod.Name); cw != nil && w.local && w.enrolled {
			dw.PeerAuthentication = cw.PeerAuth.AmbientMode(0).String()
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

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
