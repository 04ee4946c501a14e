package lab

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/veilmesh/veil/policy"
)

//go:embed demo/*.yaml
var demoPolicies embed.FS

// Outcome is what a client in a pod observed: "200" (any status code), "reset",
// "timeout", or "error: ...".
type Outcome struct {
	Result string
	Body   string
}

// Request makes an HTTP GET of / from inside a pod to addr, as its application would.
func (l *Lab) Request(ctx context.Context, from, addr string) Outcome {
	return l.HTTP(ctx, from, http.MethodGet, addr, "/", nil)
}

// classify names the failure of a request as the demo reports it.
func classify(err error) Outcome {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		// EPIPE: the reset arrived before the request was written.
		return Outcome{Result: "reset"}
	case errors.As(err, &ne) && ne.Timeout():
		return Outcome{Result: "timeout"}
	}
	return Outcome{Result: "error: " + err.Error()}
}

// probe is one request of a scenario and the result Istio's semantics call for.
type probe struct {
	from, to string // pod; "pod:port" or "svc/name"
	want     string
	why      string
}

// scenario applies demo policies (files of demo/) and checks probes.
type scenario struct {
	title  string
	apply  []string
	probes []probe
	note   string
}

var scenarios = []scenario{
	{
		title: "mesh-to-mesh HTTP works, over mTLS with both identities",
		probes: []probe{
			{"bookinfo/productpage", "svc/reviews", "200", "HBONE between node-1 and node-2"},
			{"bookinfo/reviews", "ratings:9080", "200", "same node, still through the destination's policy"},
		},
	},
	{
		title: "STRICT mTLS in bookinfo (peer-auth-namespace-strict.yaml)",
		apply: []string{"peer-auth-namespace-strict.yaml"},
		probes: []probe{
			{"legacy/sleep", "reviews:9080", "reset", "plaintext from outside the mesh"},
			{"bookinfo/productpage", "reviews:9080", "200", "mTLS"},
		},
	},
	{
		title: "workload PERMISSIVE with port-level STRICT/DISABLE (peer-auth-ratings-port-level.yaml)",
		apply: []string{"peer-auth-ratings-port-level.yaml"},
		probes: []probe{
			{"legacy/sleep", "ratings:9080", "reset", "port 9080 is STRICT"},
			{"legacy/sleep", "ratings:8080", "200", "port 8080 is DISABLE, which ambient treats as PERMISSIVE"},
			{"bookinfo/productpage", "ratings:9080", "200", "mTLS"},
		},
	},
	{
		title: "zero trust: deny-all, then allow frontend -> reviews and reviews -> ratings (zero-trust-l4.yaml)",
		apply: []string{"zero-trust-l4.yaml"},
		probes: []probe{
			{"bookinfo/frontend", "reviews:9080", "200", "allowed by principal"},
			{"bookinfo/reviews", "ratings:9080", "200", "allowed by principal"},
			{"bookinfo/frontend", "ratings:9080", "reset", "no ALLOW policy matched"},
			{"bookinfo/productpage", "reviews:9080", "reset", "no ALLOW policy matched"},
		},
	},
	{
		title: "the documentation's zero-trust.yaml, whose allows need HTTP (methods: GET)",
		apply: []string{"zero-trust.yaml"},
		probes: []probe{
			{"bookinfo/frontend", "reviews:9080", "reset", "at L4 the GET-only ALLOW rule is dropped: fails closed, as ztunnel"},
		},
		note: "methods, paths and requestPrincipals need a waypoint; without one the agent fails closed (the waypoint lab enforces this file)",
	},
	{
		title: "DENY from namespace legacy (authz-deny-external.yaml)",
		apply: []string{"authz-deny-external.yaml"},
		probes: []probe{
			{"legacy/meshed-sleep", "reviews:9080", "reset", "in the mesh: its mTLS identity names namespace legacy"},
			{"legacy/sleep", "reviews:9080", "200", "plaintext has no identity, so `namespaces` cannot match; add STRICT to shut it out"},
		},
	},
	{
		title: "ALLOW by source address, IPv4 and IPv6 ranges, but one pod (authz-ip-blocks.yaml)",
		apply: []string{"authz-ip-blocks.yaml"},
		probes: []probe{
			{"bookinfo/productpage", "reviews:9080", "200", "in node-1's pod range (ipBlocks), over HBONE"},
			{"legacy/meshed-sleep", "reviews:9080", "200", "in the range; the mapped ::ffff:10.100.1.12 excludes .12 only"},
			{"legacy/sleep", "reviews:9080", "reset", "notIpBlocks names its addresses (plaintext: the packet's source)"},
			{"bookinfo/ratings", "reviews:9080", "reset", "node-2's pods are outside ipBlocks (same node)"},
		},
	},
	{
		title: "ALLOW by remoteIpBlocks, an HTTP attribute (authz-remote-ip-blocks.yaml)",
		apply: []string{"authz-remote-ip-blocks.yaml"},
		probes: []probe{
			{"bookinfo/reviews", "ratings:9080", "reset", "at L4 the remoteIpBlocks rule is dropped: fails closed, as ztunnel"},
		},
		note: "remoteIpBlocks (X-Forwarded-For) needs a waypoint; without one the ALLOW rule is dropped",
	},
}

// target resolves "pod:port" or "svc/name" to an address in the lab's primary family.
func (l *Lab) target(to string) (string, error) {
	all, err := l.targets(to)
	if err != nil {
		return "", err
	}
	return all[0], nil
}

// targets resolves "pod:port" or "svc/name" to an address in each of the lab's
// families, the primary first.
func (l *Lab) targets(to string) ([]string, error) {
	var ips []netip.Addr
	var port string
	if name, ok := strings.CutPrefix(to, "svc/"); ok {
		for i, svc := range l.Spec.Services {
			if svc.Name == name {
				ips, port = l.Spec.ServiceIPs(i), fmt.Sprint(svc.Port)
				break
			}
		}
		if ips == nil {
			return nil, fmt.Errorf("no service %s", name)
		}
	} else {
		pod, pt, ok := strings.Cut(to, ":")
		if !ok {
			return nil, fmt.Errorf("target %q: want pod:port or svc/name", to)
		}
		p, err := l.Spec.Pod(pod)
		if err != nil {
			return nil, err
		}
		ips, port = l.Spec.PodIPs(p), pt
	}
	out := make([]string, len(ips))
	for i, ip := range ips {
		out[i] = net.JoinHostPort(ip.String(), port)
	}
	return out, nil
}

// RunDemo runs the Istio documentation's scenarios on a lab built from DefaultSpec and
// prints each probe with its expected and observed result, once per IP family of the lab
// (a dual-stack lab: over IPv4, then over IPv6). It returns how many probes did not
// match.
func RunDemo(ctx context.Context, l *Lab, w io.Writer) (mismatches int, err error) {
	for i, sc := range scenarios {
		fmt.Fprintf(w, "\n[%d] %s\n", i+1, sc.title)
		objects, err := l.applyDemo(ctx, sc.apply, nil)
		if err != nil {
			return mismatches, err
		}
		for _, pr := range sc.probes {
			addrs, err := l.targets(pr.to)
			if err != nil {
				return mismatches, err
			}
			for _, addr := range addrs {
				got := l.Request(ctx, pr.from, addr)
				mark := "ok"
				if got.Result != pr.want {
					mark = "MISMATCH"
					mismatches++
				}
				fmt.Fprintf(w, "    %-22s -> %-22s expected %-6s observed %-6s %-8s %s\n", pr.from, pr.to+" ("+addr+")", pr.want, got.Result, mark, pr.why)
				if got.Body != "" {
					fmt.Fprintf(w, "        %s\n", got.Body)
				}
			}
		}
		if i == 0 {
			if err := l.showMTLS(ctx, w); err != nil {
				fmt.Fprintf(w, "    MISMATCH: %v\n", err)
				mismatches++
			}
		}
		if sc.note != "" {
			fmt.Fprintf(w, "    note: %s\n", sc.note)
		}
		if err := l.removeDemo(ctx, sc.apply, objects); err != nil {
			return mismatches, err
		}
	}
	return mismatches, nil
}

// applyDemo applies the demo files (rewritten by subst, when set) and waits until the
// agents hold their objects, which it returns.
func (l *Lab) applyDemo(ctx context.Context, files []string, subst func([]byte) []byte) ([]string, error) {
	var objects []string
	for _, f := range files {
		data, err := demoPolicies.ReadFile("demo/" + f)
		if err != nil {
			return nil, err
		}
		if subst != nil {
			data = subst(data)
		}
		if err := l.Apply(f, data); err != nil {
			return nil, err
		}
		for _, o := range policy.Parse(f, data).Objects {
			objects = append(objects, o.Key().String())
		}
	}
	return objects, l.WaitObjects(ctx, objects, nil)
}

// removeDemo deletes the demo files and waits until the agents no longer hold objects.
func (l *Lab) removeDemo(ctx context.Context, files, objects []string) error {
	for _, f := range files {
		if err := l.Delete(f); err != nil {
			return err
		}
	}
	return l.WaitObjects(ctx, nil, objects)
}

// showMTLS prints each agent's certificates and checks the HBONE connection of the
// first scenario was counted as mutual TLS with the source's identity.
func (l *Lab) showMTLS(ctx context.Context, w io.Writer) error {
	for _, node := range l.Spec.Nodes {
		body, err := l.NodeGet(ctx, node, "127.0.0.1:15000", "/certs")
		if err != nil {
			return err
		}
		var states []struct {
			ID, State string
			NotAfter  time.Time `json:"not_after"`
		}
		if err := json.Unmarshal(body, &states); err != nil {
			return err
		}
		for _, s := range states {
			fmt.Fprintf(w, "    %s agent holds %s (%s, expires %s)\n", node, s.ID, s.State, s.NotAfter.Format(time.RFC3339))
		}
	}
	metrics, err := l.NodeGet(ctx, "node-2", "127.0.0.1:15020", "/metrics")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(metrics), "\n") {
		if strings.HasPrefix(line, "istio_tcp_connections_opened_total{") && strings.Contains(line, `connection_security_policy="mutual_tls"`) &&
			strings.Contains(line, `source_principal="spiffe://cluster.local/ns/bookinfo/sa/productpage"`) && strings.Contains(line, `reporter="destination"`) {
			fmt.Fprintf(w, "    node-2 agent: %s\n", line)
			return nil
		}
	}
	return errors.New("node-2's agent counted no mutual_tls connection from productpage")
}

// WaitObjects waits until every agent's config holds the present objects ("Kind
// ns/name") and none of the absent ones.
func (l *Lab) WaitObjects(ctx context.Context, present, absent []string) error {
	if len(present)+len(absent) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for _, node := range l.Spec.Nodes {
		for {
			body, err := l.NodeGet(ctx, node, "127.0.0.1:15000", "/config_dump")
			if err == nil {
				var d struct{ Objects []string }
				if err = json.Unmarshal(body, &d); err == nil && holds(d.Objects, present, absent) {
					break
				}
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("lab: %s's agent did not pick up the config change (present %v, absent %v): %v", node, present, absent, err)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}

func holds(have, present, absent []string) bool {
	set := map[string]bool{}
	for _, h := range have {
		set[h] = true
	}
	for _, p := range present {
		if !set[p] {
			return false
		}
	}
	for _, a := range absent {
		if set[a] {
			return false
		}
	}
	return true
}

// Demo builds the default lab under name with the IP families of family ("ipv4",
// "ipv6" or "dual"; empty: dual, both in one run, or ipv4 where the kernel has no IPv6),
// runs the scenarios, and tears it down. The error reports a lab that failed or
// scenarios that did not match.
func Demo(ctx context.Context, name, family string, opts Options, w io.Writer) error {
	spec := DefaultSpec()
	if name != "" {
		spec.Name = name
	}
	spec.Family = family
	if family == "" {
		spec.Family = FamilyDual
		if _, err := os.Stat("/proc/sys/net/ipv6"); err != nil || opts.Kube {
			spec.Family = FamilyIPv4
			fmt.Fprintln(w, "demo: IPv4 only (a kube lab, or a kernel without IPv6)")
		}
	}
	if err := CheckName(spec.Name); err != nil {
		return err
	}
	opts.Log = w
	_ = Down(spec.Name, opts) // a previous run that crashed
	l, err := Up(ctx, spec, opts)
	if err != nil {
		return err
	}
	fmt.Fprint(w, l.Status())
	mismatches, runErr := RunDemo(ctx, l, w)
	if mismatches > 0 || runErr != nil {
		fmt.Fprintf(w, "\nlogs of the lab's processes before teardown: %s\n", l.path("logs"))
		for _, f := range []string{"agent-node-1", "agent-node-2", "controller"} {
			if b, err := os.ReadFile(l.path("logs", f+".log")); err == nil {
				if len(b) > 3000 {
					b = b[len(b)-3000:]
				}
				fmt.Fprintf(w, "--- %s (last lines)\n%s\n", f, b)
			}
		}
	}
	downErr := Down(spec.Name, opts)
	if runErr != nil {
		return errors.Join(runErr, downErr)
	}
	if mismatches > 0 {
		return errors.Join(fmt.Errorf("demo: %d probe(s) did not match", mismatches), downErr)
	}
	fmt.Fprintln(w, "\ndemo: every scenario matched; lab torn down")
	if downErr != nil {
		return downErr
	}
	if opts.Kube {
		fmt.Fprintln(w, "demo: the waypoint scenarios need a lab without --kube; skipped")
		return nil
	}
	return WaypointDemo(ctx, name, opts, w)
}

// WaypointDemo brings up the waypoint lab (WaypointSpec, IPv4), runs RunWaypointDemo,
// and tears it down.
func WaypointDemo(ctx context.Context, name string, opts Options, w io.Writer) error {
	spec := WaypointSpec()
	if name != "" {
		spec.Name = name + "wp"
	}
	if err := CheckName(spec.Name); err != nil {
		return err
	}
	opts.Log = w
	_ = Down(spec.Name, opts)
	fmt.Fprintln(w, "\ndemo: the waypoint lab: bookinfo and istio-servicea use a waypoint (istio.io/use-waypoint)")
	l, err := Up(ctx, spec, opts)
	if err != nil {
		return errors.Join(err, Down(spec.Name, opts))
	}
	fmt.Fprint(w, l.Status())
	mismatches, runErr := RunWaypointDemo(ctx, l, w)
	if runErr == nil {
		var n int
		n, runErr = RunWaypointDemoIstio(ctx, l, w)
		mismatches += n
	}
	if mismatches > 0 || runErr != nil {
		fmt.Fprintf(w, "\nlogs of the lab's processes before teardown: %s\n", l.path("logs"))
		for _, f := range []string{"agent-node-1", "agent-node-2", "controller", "waypoint-bookinfo-waypoint"} {
			if b, err := os.ReadFile(l.path("logs", f+".log")); err == nil {
				if len(b) > 3000 {
					b = b[len(b)-3000:]
				}
				fmt.Fprintf(w, "--- %s (last lines)\n%s\n", f, b)
			}
		}
	}
	downErr := Down(spec.Name, opts)
	if runErr != nil {
		return errors.Join(runErr, downErr)
	}
	if mismatches > 0 {
		return errors.Join(fmt.Errorf("demo: %d waypoint probe(s) did not match", mismatches), downErr)
	}
	fmt.Fprintln(w, "\ndemo: every waypoint scenario matched; lab torn down")
	return downErr
}
