package waypoint

import "strings"

// Protocol is how the waypoint treats the traffic of one Service port.
type Protocol int

const (
	// ProtocolTCP is opaque bytes: decided once, then spliced.
	ProtocolTCP Protocol = iota
	// ProtocolHTTP1 is HTTP: requests go to the endpoint over HTTP/1.1. A client may still speak
	// HTTP/2 with prior knowledge (Envoy's codec is AUTO).
	ProtocolHTTP1
	// ProtocolHTTP2 is HTTP/2 (http2, grpc, grpc-web, h2c): requests go to the endpoint over
	// HTTP/2 with prior knowledge. A client may still speak HTTP/1.1.
	ProtocolHTTP2
	// ProtocolAuto is a port whose protocol is not declared: the first bytes decide, as Envoy's
	// http_inspector. An HTTP/1.1 request line or the HTTP/2 preface makes it HTTP, in the
	// client's protocol end to end; anything else is TCP.
	ProtocolAuto
)

func (p Protocol) String() string {
	switch p {
	case ProtocolTCP:
		return "tcp"
	case ProtocolHTTP1:
		return "http"
	case ProtocolHTTP2:
		return "http2"
	case ProtocolAuto:
		return "auto"
	}
	return "unknown"
}

// ProtocolOf is Istio's protocol selection for a Service port (pkg/config/kube
// ConvertProtocol and protocol.Parse): appProtocol when set, else the port name; the
// name's part before the first '-' (all of it for grpc-web), case-insensitive:
//
//	http, http_proxy, kubernetes.io/ws                             ProtocolHTTP1
//	http2, grpc, grpc-web, kubernetes.io/h2c                       ProtocolHTTP2
//	tcp, udp, https, tls, mongo, redis, mysql, kubernetes.io/wss  ProtocolTCP
//	anything else, or nothing                                      ProtocolAuto (Istio sniffs)
//
// veil also reads h2c as ProtocolHTTP2 (Istio would sniff it, which gives the
// same for a prior-knowledge client). PortProtocol adds Istio's rule for server-first
// well-known ports.
func ProtocolOf(portName, appProtocol string) Protocol {
	name := portName
	if appProtocol != "" {
		name = appProtocol
		switch appProtocol {
		case "kubernetes.io/h2c":
			return ProtocolHTTP2
		case "kubernetes.io/ws":
			return ProtocolHTTP1
		case "kubernetes.io/wss":
			return ProtocolTCP
		}
	}
	if len(name) >= len("grpc-web") && strings.EqualFold(name[:len("grpc-web")], "grpc-web") {
		return ProtocolHTTP2
	}
	if i := strings.IndexByte(name, '-'); i >= 0 {
		name = name[:i]
	}
	switch strings.ToLower(name) {
	case "http", "http_proxy":
		return ProtocolHTTP1
	case "http2", "grpc", "h2c":
		return ProtocolHTTP2
	case "tcp", "udp", "https", "tls", "mongo", "redis", "mysql":
		return ProtocolTCP
	}
	return ProtocolAuto
}

// PortProtocol is ProtocolOf for a Service port number: an undeclared protocol on the
// ports of server-first protocols (SMTP 25, DNS 53, MySQL 3306, MongoDB 27017) is ProtocolTCP, as
// in Istio, since sniffing would wait for a client that waits for the server.
func PortProtocol(port uint16, portName, appProtocol string) Protocol {
	p := ProtocolOf(portName, appProtocol)
	if p == ProtocolAuto {
		switch port {
		case 25, 53, 3306, 27017:
			return ProtocolTCP
		}
	}
	return p
}
