package waypoint

import "testing"

// Istio's protocol selection (pkg/config/kube ConvertProtocol, protocol.Parse).
func TestProtocolOf(t *testing.T) {
	for _, tc := range []struct {
		name, app string
		want      Protocol
	}{
		{"http", "", ProtocolHTTP1},
		{"http-web", "", ProtocolHTTP1},
		{"HTTP-web", "", ProtocolHTTP1},
		{"http_proxy", "", ProtocolHTTP1},
		{"http2", "", ProtocolHTTP2},
		{"http2-api", "", ProtocolHTTP2},
		{"grpc", "", ProtocolHTTP2},
		{"grpc-reviews", "", ProtocolHTTP2},
		{"grpc-web", "", ProtocolHTTP2},
		{"GRPC-Web-x", "", ProtocolHTTP2},
		{"tcp-db", "", ProtocolTCP},
		{"https", "", ProtocolTCP},
		{"tls-x", "", ProtocolTCP},
		{"mongo", "", ProtocolTCP},
		{"redis-cache", "", ProtocolTCP},
		{"mysql", "", ProtocolTCP},
		{"udp-dns", "", ProtocolTCP},
		{"web", "", ProtocolAuto},
		{"", "", ProtocolAuto},
		{"httpx", "", ProtocolAuto},
		// appProtocol wins over the name.
		{"tcp", "http", ProtocolHTTP1},
		{"http", "tcp", ProtocolTCP},
		{"web", "kubernetes.io/h2c", ProtocolHTTP2},
		{"web", "kubernetes.io/ws", ProtocolHTTP1},
		{"http", "kubernetes.io/wss", ProtocolTCP},
		{"web", "grpc", ProtocolHTTP2},
		{"web", "h2c", ProtocolHTTP2},
		{"http", "example.com/custom", ProtocolAuto},
	} {
		if got := ProtocolOf(tc.name, tc.app); got != tc.want {
			t.Errorf("ProtocolOf(%q, %q) = %v, want %v", tc.name, tc.app, got, tc.want)
		}
	}
	for port, want := range map[uint16]Protocol{25: ProtocolTCP, 53: ProtocolTCP, 3306: ProtocolTCP, 27017: ProtocolTCP, 8080: ProtocolAuto} {
		if got := PortProtocol(port, "", ""); got != want {
			t.Errorf("PortProtocol(%d) = %v, want %v", port, got, want)
		}
	}
	if got := PortProtocol(3306, "http", ""); got != ProtocolHTTP1 {
		t.Errorf("a declared protocol on 3306: %v", got)
	}
}
