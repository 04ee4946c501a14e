package agent

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/veilmesh/veil/identity"
)

// BundleReporter is implemented by Certs that describe their trust bundles
// (identity.Manager). With it the agent serves /trust_bundle on the admin port and
// exports veil_trust_bundle_root and veil_workload_certificates: how an operator sees,
// during a root rotation, that every agent trusts the new root and which root each
// certificate chains to.
type BundleReporter interface {
	Bundles() []identity.BundleState
}

// trustBundle serves the trust bundles in force: every root with its SHA-256
// fingerprint, and where the roots came from.
func (a *Agent) trustBundle(w http.ResponseWriter, r *http.Request) {
	br, ok := a.opts.Certs.(BundleReporter)
	if !ok {
		http.Error(w, "this agent's certificate source does not report its trust bundle", http.StatusNotFound)
		return
	}
	writeJSON(w, br.Bundles())
}

// trustCollector exports the trust bundle and the roots of the local certificates.
type trustCollector struct {
	bundles BundleReporter
	certs   Certs
	root    *prometheus.Desc
	leaves  *prometheus.Desc
}

func newTrustCollector(br BundleReporter, certs Certs) *trustCollector {
	return &trustCollector{
		bundles: br,
		certs:   certs,
		root: prometheus.NewDesc("veil_trust_bundle_root",
			"A root of the trust bundle the agent verifies peers and the CA against (value: its expiry, Unix seconds). "+
				"During a root rotation, count by (sha256) says how many agents trust each root.",
			[]string{"trust_domain", "sha256", "subject"}, nil),
		leaves: prometheus.NewDesc("veil_workload_certificates",
			"Local workload certificates held, by the root they chain to (root_sha256). "+
				"After a rotation switched signing to a new root, the old root's count falls to 0 as certificates renew.",
			[]string{"trust_domain", "root_sha256"}, nil),
	}
}

func (tc *trustCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- tc.root
	ch <- tc.leaves
}

func (tc *trustCollector) Collect(ch chan<- prometheus.Metric) {
	for _, b := range tc.bundles.Bundles() {
		for _, r := range b.Roots {
			ch <- prometheus.MustNewConstMetric(tc.root, prometheus.GaugeValue, float64(r.NotAfter.Unix()), b.TrustDomain, r.SHA256, r.Subject)
		}
	}
	type key struct{ td, root string }
	counts := map[key]int{}
	for _, s := range tc.certs.States() {
		if s.RootSHA256 == "" || s.State == "expired" {
			continue
		}
		td := ""
		if id, err := identity.ParseID(s.ID); err == nil {
			td = id.TrustDomain().String()
		}
		counts[key{td, s.RootSHA256}]++
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(tc.leaves, prometheus.GaugeValue, float64(n), k.td, k.root)
	}
}
