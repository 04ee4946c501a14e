package lab

import (
	"context"
	"crypto/tls"
	_ "embed"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"syscall"
	"time"

	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/tunnel"
)

//go:embed waypoint.yaml
var waypointSpec []byte

// WaypointSpec is the waypoint lab of `make demo`: Bookinfo with a waypoint for its
// namespace (service and workload traffic).
func WaypointSpec() *Spec {
	s, err := ParseSpec(waypointSpec)
	if err != nil {
		panic("lab: waypoint spec: " + err.Error())
	}
	return s
}

// HTTP makes one HTTP request from inside pod from to addr, as its application would:
// the Outcome's Result is the status code, or "reset", "timeout", "error: ...".
func (l *Lab) HTTP(ctx context.Context, from, method, addr, path string, header http.Header) Outcome {
	p, err := l.Spec.Pod(from)
	if err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	ns := l.podNS(p)
	client := &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DialContext:       func(ctx context.Context, _, a string) (net.Conn, error) { return dialIn(ctx, ns, a) },
			DisableKeepAlives: true,
		},
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+addr+path, nil)
	if err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := client.Do(req)
	if err != nil {
		return classify(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return Outcome{Result: fmt.Sprint(resp.StatusCode), Body: strings.TrimSpace(string(body))}
}

// Bypass opens an HBONE stream to pod to's agent with a certificate of pod from's
// identity (minted from the lab's CA) and from's address as the Forwarded source,
// dialled from pod via, outside the capture: what a holder of from's key who skips its
// agent, and so any waypoint, could do. It returns "200" when the destination's agent
// accepted the stream, else the refusal.
func (l *Lab) Bypass(ctx context.Context, via, from, to string, port uint16) Outcome {
	vp, err := l.Spec.Pod(via)
	if err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	src, err := l.Spec.Pod(from)
	if err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	dst, err := l.Spec.Pod(to)
	if err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	ca, err := identity.LoadCA(l.path("ca"), identity.CAOptions{})
	if err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	srcID, err := identity.NewID(ca.TrustDomain(), src.Namespace, src.ServiceAccount)
	if err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	dstID, err := identity.NewID(ca.TrustDomain(), dst.Namespace, dst.ServiceAccount)
	if err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	bundle := identity.NewTrustBundle(ca.TrustDomain())
	if _, err := bundle.Set("lab CA", ca.Roots()); err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	certs, err := identity.NewManager(identity.ManagerOptions{Issuer: ca, Bundle: bundle})
	if err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	defer certs.Close()
	cert, err := certs.Get(ctx, srcID)
	if err != nil {
		return Outcome{Result: "error: " + err.Error()}
	}
	ns := l.podNS(vp)
	pool := &tunnel.Pool{
		TLSConfig: func(context.Context, tunnel.Key) (*tls.Config, error) {
			return identity.ClientConfig(cert, dstID, certs), nil
		},
		Dial: func(ctx context.Context, _, addr string) (net.Conn, error) { return dialIn(ctx, ns, addr) },
	}
	defer pool.Close()
	dstIP, srcIP := l.Spec.PodIPs(dst)[0], l.Spec.PodIPs(src)[0]
	k := tunnel.Key{Src: srcID, Dst: dstID, Addr: netip.AddrPortFrom(dstIP, 15008)}
	s, err := pool.Open(ctx, k, tunnel.Target{Authority: netip.AddrPortFrom(dstIP, port), Source: netip.AddrPortFrom(srcIP, 0)})
	if err != nil {
		if se, ok := err.(*tunnel.StatusError); ok {
			return Outcome{Result: fmt.Sprint(se.Code), Body: err.Error()}
		}
		return Outcome{Result: "error: " + err.Error()}
	}
	s.Close()
	return Outcome{Result: "200"}
}

// wpProbe is one request of a waypoint scenario.
type wpProbe struct {
	from, to     string // pod; "pod:port" or "svc/name"
	method, path string
	bypass       bool   // an HBONE stream straight to the destination's agent (to is a pod)
	token        string // "valid", "tampered", "expired", "wrong-audience", or none
	want         string
	why          string
}

type wpScenario struct {
	title string
	apply []string
	// lab substitutes the lab's issuer and JWKS URI for the file's (the Istio docs'
	// Google ones).
	lab    bool
	probes []wpProbe
	note   string
}

var wpScenarios = []wpScenario{
	{
		title: "No policy: every request through the waypoint is allowed",
		probes: []wpProbe{
			{from: "frontend", to: "svc/reviews", method: "GET", path: "/", want: "200", why: "service traffic goes through the waypoint"},
			{from: "frontend", to: "reviews:9080", method: "GET", path: "/", want: "200", why: "workload traffic too (waypoint-for: all)"},
		},
	},
	{
		title: "zero-trust.yaml, enforced at the waypoint: deny-all, then frontend may GET reviews",
		apply: []string{"zero-trust.yaml"},
		probes: []wpProbe{
			{from: "frontend", to: "svc/reviews", method: "GET", path: "/", want: "200", why: "allow-frontend-to-reviews: GET from frontend"},
			{from: "frontend", to: "svc/reviews", method: "POST", path: "/", want: "403", why: "only GET is allowed: RBAC: access denied"},
			{from: "frontend", to: "svc/ratings", method: "GET", path: "/", want: "403", why: "deny-all: only reviews may call ratings"},
		},
		note: "at L4 alone the GET-only rules are dropped and reviews would refuse frontend too; the waypoint enforces them verbatim",
	},
	{
		title: "authz-reviews-allow-frontend.yaml: only frontend may GET /reviews/*",
		apply: []string{"authz-reviews-allow-frontend.yaml"},
		probes: []wpProbe{
			{from: "frontend", to: "svc/reviews", method: "GET", path: "/reviews/1", want: "200", why: "frontend, GET /reviews/1"},
			{from: "productpage", to: "svc/reviews", method: "GET", path: "/reviews/1", want: "403", why: "productpage is not frontend"},
			{from: "frontend", to: "svc/reviews", method: "GET", path: "/ratings/1", want: "403", why: "path outside /reviews/*"},
			{from: "frontend", to: "svc/reviews", method: "GET", path: "/reviews/../ratings/1", want: "403", why: "normalized to /ratings/1 before matching"},
		},
	},
	{
		title: "authz-service-account-get.yaml: only istio-serviceb/auth-test-sa may GET service-a",
		apply: []string{"authz-service-account-get.yaml"},
		probes: []wpProbe{
			{from: "client-b", to: "svc/service-a", method: "GET", path: "/", want: "200", why: "auth-test-sa, GET"},
			{from: "client-b", to: "svc/service-a", method: "POST", path: "/", want: "403", why: "only GET"},
			{from: "other-b", to: "svc/service-a", method: "GET", path: "/", want: "403", why: "another service account"},
		},
	},
	{
		title: "request-auth-jwt.yaml: frontend validates JWTs and requires one (issuer and jwksUri: the lab's)",
		apply: []string{"request-auth-jwt.yaml"},
		lab:   true,
		probes: []wpProbe{
			{from: "productpage", to: "svc/frontend", method: "GET", path: "/", token: "valid", want: "200", why: "a valid token for audience my-app.example.com"},
			{from: "productpage", to: "svc/frontend", method: "GET", path: "/", token: "tampered", want: "401", why: "Jwt verification fails"},
			{from: "productpage", to: "svc/frontend", method: "GET", path: "/", token: "expired", want: "401", why: "Jwt is expired"},
			{from: "productpage", to: "svc/frontend", method: "GET", path: "/", token: "wrong-audience", want: "403", why: "Audiences in Jwt are not allowed"},
			{from: "productpage", to: "svc/frontend", method: "GET", path: "/", want: "403", why: "no token: require-jwt denies (RBAC: access denied)"},
		},
		note: "the controller fetched the JWKS from the lab's issuer and pushed the keys inline (Istio's istiod mode)",
	},
	{
		title: "Bypass: a pod that skips its agent and the waypoint",
		probes: []wpProbe{
			{from: "frontend", to: "reviews", bypass: true, want: "401", why: "reviews is bound to a waypoint: in-mesh traffic only from it"},
			{from: "frontend", to: "ratings", bypass: true, want: "401", why: "ratings too (the namespace's waypoint takes workload traffic)"},
		},
		note: "ztunnel dropped this check (PR #873); veil refuses the bypass unless the mesh allows it (--allow-waypoint-bypass)",
	},
}

// wpIstioScenarios are the same files under --policy-placement=istio: Istio's exact
// behaviour, where the sidecar-era YAML enforces nothing useful in ambient.
var wpIstioScenarios = []wpScenario{
	{
		title: "zero-trust.yaml under Istio's placement",
		apply: []string{"zero-trust.yaml"},
		probes: []wpProbe{
			{from: "frontend", to: "svc/reviews", method: "GET", path: "/", want: "503", why: "the waypoint ignores selector policies; reviews' L4 policy sees the waypoint's identity and drops the GET-only rule: fail closed"},
		},
		note: "Istio's waypoint enforces only targetRefs policies; ztunnel applies the selector policies to the waypoint's identity",
	},
	{
		title: "request-auth-jwt.yaml under Istio's placement",
		apply: []string{"request-auth-jwt.yaml"},
		lab:   true,
		probes: []wpProbe{
			{from: "productpage", to: "svc/frontend", method: "GET", path: "/", token: "tampered", want: "200", why: "no JWT check anywhere: the waypoint ignores selector RequestAuthentications"},
			{from: "productpage", to: "svc/frontend", method: "GET", path: "/", want: "200", why: "require-jwt's DENY uses only HTTP attributes: ztunnel ignores it"},
		},
		note: "the Istio docs' JWT example enforces nothing in ambient; veil's default placement enforces it at the waypoint",
	},
	{
		title: "Bypass under Istio's placement",
		probes: []wpProbe{
			{from: "frontend", to: "reviews", bypass: true, want: "200", why: "ztunnel has no bypass check (PR #873): the connection is judged at L4 only"},
		},
	},
}

// RunWaypointDemoIstio restarts the lab's agents and waypoints with
// --policy-placement=istio and runs the same files with Istio's expectations.
func RunWaypointDemoIstio(ctx context.Context, l *Lab, w io.Writer) (mismatches int, err error) {
	fmt.Fprintln(w, "\nthe same files with --policy-placement=istio (agents and waypoints restarted): Istio's exact placement")
	l.opts.AgentArgs = append(l.opts.AgentArgs, "--policy-placement", "istio")
	l.opts.WaypointArgs = append(l.opts.WaypointArgs, "--policy-placement", "istio")
	for _, node := range l.Spec.Nodes {
		if err := l.RestartAgent(ctx, node, false); err != nil {
			return 0, err
		}
	}
	if err := l.RestartWaypoints(ctx); err != nil {
		return 0, err
	}
	return runWaypointScenarios(ctx, l, w, "istio", wpIstioScenarios)
}

// RestartWaypoints stops the lab's waypoints and starts them again (with the Lab's
// current WaypointArgs).
func (l *Lab) RestartWaypoints(ctx context.Context) error {
	for _, p := range l.Spec.waypointPods() {
		if err := l.kill("waypoint-"+p.Namespace+"-"+p.Name, syscall.SIGTERM); err != nil {
			return err
		}
		if err := l.startWaypoint(ctx, p); err != nil {
			return err
		}
	}
	return nil
}

// RunWaypointDemo runs the waypoint scenarios on a lab built from WaypointSpec and prints
// each probe with its expected and observed result. It returns how many did not match.
func RunWaypointDemo(ctx context.Context, l *Lab, w io.Writer) (mismatches int, err error) {
	return runWaypointScenarios(ctx, l, w, "waypoint", wpScenarios)
}

func runWaypointScenarios(ctx context.Context, l *Lab, w io.Writer, label string, scs []wpScenario) (mismatches int, err error) {
	for i, sc := range scs {
		fmt.Fprintf(w, "\n[%s %d] %s\n", label, i+1, sc.title)
		var subst func([]byte) []byte
		if sc.lab {
			subst = func(data []byte) []byte {
				return []byte(strings.NewReplacer("https://accounts.google.com", l.Issuer(),
					"https://www.googleapis.com/oauth2/v3/certs", l.JWKSURI()).Replace(string(data)))
			}
		}
		objects, err := l.applyDemo(ctx, sc.apply, subst)
		if err != nil {
			return mismatches, err
		}
		// The waypoint follows the same config stream as the agents; give it a moment.
		time.Sleep(500 * time.Millisecond)
		for _, pr := range sc.probes {
			var got Outcome
			target := pr.to
			if pr.bypass {
				got = l.Bypass(ctx, "sleep", pr.from, pr.to, 9080)
				target = pr.to + ":9080 (HBONE, from sleep's netns)"
			} else {
				addr, err := l.target(pr.to)
				if err != nil {
					return mismatches, err
				}
				var h http.Header
				if pr.token != "" {
					tok, err := l.demoToken(pr.token)
					if err != nil {
						return mismatches, err
					}
					h = http.Header{"Authorization": {"Bearer " + tok}}
				}
				got = l.HTTP(ctx, pr.from, pr.method, addr, pr.path, h)
				target = pr.method + " " + pr.to + " " + pr.path
			}
			mark := "ok"
			if got.Result != pr.want {
				mark = "MISMATCH"
				mismatches++
			}
			fmt.Fprintf(w, "    %-12s -> %-36s expected %-4s observed %-6s %-8s %s\n", pr.from, target, pr.want, got.Result, mark, pr.why)
			if got.Body != "" && mark != "ok" {
				fmt.Fprintf(w, "        %s\n", got.Body)
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

// demoToken mints the token a probe presents.
func (l *Lab) demoToken(kind string) (string, error) {
	o := TokenOptions{Subject: "alice", Audience: []string{"my-app.example.com"}}
	switch kind {
	case "valid":
	case "tampered":
		o.Tamper = true
	case "expired":
		o.ExpiresIn = -5 * time.Minute // past Envoy's 60 s clock skew
	case "wrong-audience":
		o.Audience = []string{"another-app.example.com"}
	default:
		return "", fmt.Errorf("demo: unknown token kind %q", kind)
	}
	return l.Token(o)
}
