package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
)

// waypointGateway is the Gateway a waypoint pod p runs, as istiod (or veil's controller)
// leaves it once the waypoint is ready: status.addresses names the pod.
func waypointGateway(p *PodSpec, ips []netip.Addr) map[string]any {
	labels := map[string]string{}
	if p.WaypointFor != "" {
		labels[cluster.WaypointForLabel] = p.WaypointFor
	}
	var addrs []map[string]any
	for _, ip := range ips {
		addrs = append(addrs, map[string]any{"type": "IPAddress", "value": ip.String()})
	}
	return map[string]any{
		"apiVersion": cluster.GatewayAPIGroup + "/v1", "kind": "Gateway",
		"metadata": map[string]any{"name": p.Waypoint, "namespace": p.Namespace, "labels": labels},
		"spec": map[string]any{"gatewayClassName": cluster.WaypointClass,
			"listeners": []map[string]any{{"name": "mesh", "port": 15008, "protocol": "HBONE"}}},
		"status": map[string]any{"addresses": addrs},
	}
}

// waypointLabels are the labels a waypoint pod carries besides its own: the Gateway's
// name, and out of the mesh's capture.
func waypointLabels(p *PodSpec) {
	if p.Labels == nil {
		p.Labels = map[string]string{}
	}
	p.Labels[cluster.GatewayNameLabel] = p.Waypoint
	p.Labels[cluster.DataplaneModeLabel] = cluster.DataplaneNone
}

// waypointPods are the spec's waypoint pods.
func (s *Spec) waypointPods() []*PodSpec {
	var out []*PodSpec
	for i := range s.Pods {
		if s.Pods[i].Waypoint != "" {
			out = append(out, &s.Pods[i])
		}
	}
	return out
}

// writeWorkloadTokens writes a bootstrap token for each waypoint pod (tokens/<ns>-<name>)
// and the controller's --workload-tokens file.
func (l *Lab) writeWorkloadTokens() error {
	var b strings.Builder
	b.WriteString("[]\n")
	var entries []string
	for _, p := range l.Spec.waypointPods() {
		t := make([]byte, 24)
		rand.Read(t)
		tok := hex.EncodeToString(t)
		entries = append(entries, fmt.Sprintf("- {token: %s, node: %s, namespace: %s, serviceAccount: %s}\n", tok, p.Node, p.Namespace, p.ServiceAccount))
		if err := os.WriteFile(l.path("tokens", "waypoint-"+p.Namespace+"-"+p.Name), []byte(tok+"\n"), 0o600); err != nil {
			return err
		}
	}
	out := b.String()
	if len(entries) > 0 {
		out = strings.Join(entries, "")
	}
	return os.WriteFile(l.path("workload-tokens.yaml"), []byte(out), 0o600)
}

// startWaypoint runs veil-waypoint in waypoint pod p and waits until it is ready.
func (l *Lab) startWaypoint(ctx context.Context, p *PodSpec) error {
	ip := l.Spec.PodIPs(p)[0]
	ready := net.JoinHostPort(ip.String(), "15021")
	argv := []string{l.bin("veil-waypoint"), "--namespace", p.Namespace, "--gateway", p.Waypoint,
		"--service-account", p.ServiceAccount, "--pod-ip", ip.String(), "--node", p.Node,
		"--ca-addr", net.JoinHostPort(l.Spec.controllerIP().String(), "15012"), "--ca-server-name", "veil-controller",
		"--ca-root", l.path("ca", identity.RootCertFile), "--token-file", l.path("tokens", "waypoint-"+p.Namespace+"-"+p.Name),
		"--hbone-addr", "[::]:15008", "--metrics-addr", net.JoinHostPort(ip.String(), "15020"), "--ready-addr", ready,
		"--log-level", "debug"}
	argv = append(argv, l.opts.WaypointArgs...)
	name := "waypoint-" + p.Namespace + "-" + p.Name
	if err := l.start(name, l.podNS(p), argv...); err != nil {
		return err
	}
	return l.waitFor(ctx, "the waypoint "+p.Name, func(ctx context.Context) error {
		c, err := dialIn(ctx, l.podNS(p), ready)
		if err != nil {
			return err
		}
		defer c.Close()
		fmt.Fprintf(c, "GET /healthz/ready HTTP/1.0\r\nHost: x\r\n\r\n")
		buf := make([]byte, 64)
		n, _ := c.Read(buf)
		if !strings.Contains(string(buf[:n]), " 200 ") {
			return fmt.Errorf("not ready: %q", buf[:n])
		}
		return nil
	}, name)
}

// fabricPodRoutes route each node's pod range from the fabric through the node, so that
// waypoint pods (which run their own client of the controller, as in a cluster) reach
// the controller and the token issuer. Without waypoints only nodes talk to the fabric.
func (l *Lab) fabricPodRoutes() [][]string {
	s := l.Spec
	if len(s.waypointPods()) == 0 {
		return nil
	}
	var cmds [][]string
	for _, node := range s.Nodes {
		for _, via := range s.NodeIPs(node) {
			gw, ok := inFamily(s.addrsOf(s.gateway(node)), familyOf(via))
			if !ok {
				continue
			}
			cidr := netip.PrefixFrom(gw, prefixLen(gw)).Masked().String()
			cmds = append(cmds, []string{"ip", "-n", l.fabricNS(), "route", "add", cidr, "via", via.String()})
		}
	}
	return cmds
}

// podMeta is a pod's metadata; a waypoint pod declares veil's policy placement, as the
// controller's waypoints do (the lab's waypoints run veil-waypoint).
func podMeta(p *PodSpec) map[string]any {
	m := map[string]any{"name": p.Name, "namespace": p.Namespace, "labels": p.Labels}
	if p.Waypoint != "" {
		m["annotations"] = map[string]string{cluster.PolicyPlacementAnnotation: "veil"}
	}
	return m
}
