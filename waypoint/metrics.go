package waypoint

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// MetricLabels are the labels of a stream's requests that say who talks to whom, as
// Istio's standard metrics name them. An empty value is reported as "unknown".
type MetricLabels struct {
	SourceWorkload, SourceNamespace, SourcePrincipal, SourceCanonicalService                     string
	DestinationWorkload, DestinationNamespace, DestinationPrincipal, DestinationCanonicalService string
	// DestinationService is the Service's host name (name.namespace.svc.cluster.local).
	DestinationService, DestinationServiceName, DestinationServiceNS string
	// ConnectionSecurityLabel is connection_security_policy: mutual_tls for HBONE.
	ConnectionSecurityLabel string
}

// requestLabels are the label names of istio_requests_total and
// istio_request_duration_milliseconds: the agent's TCP labels, the Service's, and the
// request's outcome.
var requestLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal", "source_canonical_service",
	"destination_workload", "destination_workload_namespace", "destination_principal", "destination_canonical_service",
	"destination_service", "destination_service_name", "destination_service_namespace",
	"connection_security_policy", "request_protocol",
	"response_code", "grpc_response_status", "response_flags",
}

// durationBuckets are Istio's buckets of istio_request_duration_milliseconds.
var durationBuckets = []float64{0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000}

// Metrics are the waypoint's request metrics, with Istio's names and reporter
// "waypoint": istio_requests_total and istio_request_duration_milliseconds. Safe for
// concurrent use.
type Metrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

// NewMetrics creates the metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istio_requests_total",
			Help: "Requests the waypoint answered or forwarded.",
		}, requestLabels),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "istio_request_duration_milliseconds",
			Help:    "Time from a request's header to the end of its response, in milliseconds.",
			Buckets: durationBuckets,
		}, requestLabels),
	}
	if err := reg.Register(m.requests); err != nil {
		return nil, err
	}
	if err := reg.Register(m.duration); err != nil {
		reg.Unregister(m.requests)
		return nil, errors.Join(errors.New("waypoint: registering istio_request_duration_milliseconds"), err)
	}
	return m, nil
}

// Forget deletes the series that name a workload, as source or destination, once it is
// gone: without this, pod churn would grow the series without end.
func (m *Metrics) Forget(namespace, workload string) {
	for _, v := range []interface {
		DeletePartialMatch(prometheus.Labels) int
	}{m.requests, m.duration} {
		v.DeletePartialMatch(prometheus.Labels{"source_workload": workload, "source_workload_namespace": namespace})
		v.DeletePartialMatch(prometheus.Labels{"destination_workload": workload, "destination_workload_namespace": namespace})
	}
}

// statKey is one series.
type statKey struct {
	l                 MetricLabels
	proto             string
	code              int
	grpcStatus, flags string
}

type statEntry struct {
	c prometheus.Counter
	h prometheus.Observer
}

// statCache keeps the series a stream uses, so that a request costs a map look-up, not
// a hash of every label value. It is bounded: past maxStats series it starts over.
type statCache struct {
	m  *Metrics
	mu sync.Mutex
	e  map[statKey]statEntry
}

const maxStats = 64

// record counts one request: l with the endpoint's workload, the request's protocol
// ("http" or "grpc"), the status sent, the gRPC status and Envoy's response flags.
func (c *statCache) record(l MetricLabels, w *Workload, proto string, code int, flags, grpcStatus string, d time.Duration) {
	if c.m == nil {
		return
	}
	if w != nil {
		l.DestinationWorkload, l.DestinationNamespace = w.Name, w.Namespace
		l.DestinationPrincipal, l.DestinationCanonicalService = w.Principal, w.CanonicalService
	}
	if flags == "" {
		flags = "-"
	}
	if grpcStatus == "" {
		grpcStatus = "-"
	}
	k := statKey{l: l, proto: proto, code: code, grpcStatus: grpcStatus, flags: flags}
	c.mu.Lock()
	e, ok := c.e[k]
	if !ok {
		if c.e == nil || len(c.e) >= maxStats {
			c.e = make(map[statKey]statEntry)
		}
		v := []string{"waypoint",
			orUnknown(l.SourceWorkload), orUnknown(l.SourceNamespace), orUnknown(l.SourcePrincipal), orUnknown(l.SourceCanonicalService),
			orUnknown(l.DestinationWorkload), orUnknown(l.DestinationNamespace), orUnknown(l.DestinationPrincipal), orUnknown(l.DestinationCanonicalService),
			orUnknown(l.DestinationService), orUnknown(l.DestinationServiceName), orUnknown(l.DestinationServiceNS),
			orUnknown(l.ConnectionSecurityLabel), proto, strconv.Itoa(code), grpcStatus, flags}
		e = statEntry{c: c.m.requests.WithLabelValues(v...), h: c.m.duration.WithLabelValues(v...)}
		c.e[k] = e
	}
	c.mu.Unlock()
	e.c.Inc()
	e.h.Observe(float64(d) / float64(time.Millisecond))
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// requestProtocol is request_protocol: grpc for a gRPC request, else http.
func requestProtocol(r *http.Request) string {
	if ct := r.Header["Content-Type"]; len(ct) > 0 && strings.HasPrefix(ct[0], "application/grpc") {
		return "grpc"
	}
	return "http"
}

// grpcStatus is a gRPC response's status, from its trailer or (trailers-only) header.
func grpcStatus(resp *http.Response) string {
	if v := resp.Trailer["Grpc-Status"]; len(v) > 0 {
		return v[0]
	}
	if v := resp.Header["Grpc-Status"]; len(v) > 0 {
		return v[0]
	}
	return ""
}
