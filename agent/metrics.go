package agent

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Label names of the TCP metrics, as Istio names them.
var tcpLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal", "source_canonical_service",
	"destination_workload", "destination_workload_namespace", "destination_principal", "destination_canonical_service",
	"connection_security_policy", "request_protocol",
}

// metrics are the agent's Prometheus metrics, with Istio's names.
type metrics struct {
	opened, closed, sent, received *prometheus.CounterVec
	failed                         *prometheus.CounterVec // tcpLabels + response_flags
	denied                         *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	counter := func(name, help string, extra ...string) *prometheus.CounterVec {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, append(append([]string(nil), tcpLabels...), extra...))
		reg.MustRegister(c)
		return c
	}
	return &metrics{
		opened:   counter("istio_tcp_connections_opened_total", "TCP connections opened."),
		closed:   counter("istio_tcp_connections_closed_total", "TCP connections closed."),
		sent:     counter("istio_tcp_sent_bytes_total", "Bytes sent to the client (from the destination) during TCP connections."),
		received: counter("istio_tcp_received_bytes_total", "Bytes received from the client (toward the destination) during TCP connections."),
		failed:   counter("istio_tcp_connections_failed_total", "TCP connections that failed: denied by policy, destination unreachable, or tunnel setup failed.", "response_flags"),
		denied: func() *prometheus.CounterVec {
			c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "veil_policy_denied_total", Help: "Connections denied by policy, by deciding policy."}, []string{"reporter", "destination_workload_namespace", "policy"})
			reg.MustRegister(c)
			return c
		}(),
	}
}

// Values of response_flags on istio_tcp_connections_failed_total.
const (
	flagDenied      = "DENIED"            // refused by AuthorizationPolicy or PeerAuthentication
	flagUnreachable = "UPSTREAM_FAILED"   // the destination could not be reached
	flagNoRoute     = "NO_ROUTE"          // no endpoint, or a captured source that is not ours
	flagOverflow    = "UPSTREAM_OVERFLOW" // past the agent's connection limits (Envoy's UO)
)

// flow is one proxied connection's labels, computed once.
type flow struct {
	labels prometheus.Labels
}

// canonicalService is Istio's canonical service name of a pod.
func canonicalService(w *workload) string {
	if w == nil {
		return "unknown"
	}
	for _, k := range []string{"service.istio.io/canonical-name", "app.kubernetes.io/name", "app"} {
		if v := w.pod.Labels[k]; v != "" {
			return v
		}
	}
	return w.pod.Name
}

func newFlow(reporter string, src, dst *workload, srcPrincipal, dstPrincipal string, mtls bool) flow {
	name := func(w *workload) (string, string) {
		if w == nil {
			return "unknown", "unknown"
		}
		return w.pod.Name, w.pod.Namespace
	}
	sw, sns := name(src)
	dw, dns := name(dst)
	policy := "none"
	if mtls {
		policy = "mutual_tls"
	}
	if srcPrincipal == "" {
		srcPrincipal = "unknown"
	}
	if dstPrincipal == "" {
		dstPrincipal = "unknown"
	}
	return flow{labels: prometheus.Labels{
		"reporter":                       reporter,
		"source_workload":                sw,
		"source_workload_namespace":      sns,
		"source_principal":               srcPrincipal,
		"source_canonical_service":       canonicalService(src),
		"destination_workload":           dw,
		"destination_workload_namespace": dns,
		"destination_principal":          dstPrincipal,
		"destination_canonical_service":  canonicalService(dst),
		"connection_security_policy":     policy,
		"request_protocol":               "tcp",
	}}
}

func (m *metrics) open(f flow) { m.opened.With(f.labels).Inc() }

// forget deletes every series that names a pod, as source or destination, once the pod
// is gone: source_workload is the pod's name, so without this pod churn would grow the
// series without end.
func (m *metrics) forget(namespace, name string) {
	for _, v := range []*prometheus.CounterVec{m.opened, m.closed, m.sent, m.received, m.failed} {
		v.DeletePartialMatch(prometheus.Labels{"source_workload": name, "source_workload_namespace": namespace})
		v.DeletePartialMatch(prometheus.Labels{"destination_workload": name, "destination_workload_namespace": namespace})
	}
}

// close records the end of a connection: AToB is client->destination.
func (m *metrics) close(f flow, toDest, toClient int64) {
	m.closed.With(f.labels).Inc()
	m.received.With(f.labels).Add(float64(toDest))
	m.sent.With(f.labels).Add(float64(toClient))
}

func (m *metrics) fail(f flow, flags string) {
	l := prometheus.Labels{"response_flags": flags}
	for k, v := range f.labels {
		l[k] = v
	}
	m.failed.With(l).Inc()
}
