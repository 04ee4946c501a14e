package policy

import (
	"net/netip"
	"strings"
	"testing"
)

// apYAML builds an AuthorizationPolicy document.
func apYAML(ns, name, spec string) string {
	return "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: " + name + ", namespace: " + ns + "}\nspec:\n" + spec + "\n---\n"
}

type authzCase struct {
	name string
	conn *Conn    // L4 when req is nil
	req  *Request // L7
	want string   // decisionOf
}

func runAuthz(t *testing.T, yaml string, w *Workload, cases []authzCase) {
	t.Helper()
	s := Compile(load(t, yaml), nil, Options{})
	cw := s.Compile(w)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var d Decision
			if tc.req != nil {
				d = cw.EvaluateHTTP(tc.req)
			} else {
				d = cw.EvaluateL4(tc.conn)
			}
			if got := decisionOf(d); got != tc.want {
				t.Errorf("got %q (%v), want %q", got, d, tc.want)
			}
		})
	}
}

func withIPs(c *Conn, src, dst string) *Conn {
	c.SrcIP, c.DstIP = netip.MustParseAddr(src), netip.MustParseAddr(dst)
	return c
}

// §2.12 scenarios 1–5.
func TestAuthzZtunnelBasics(t *testing.T) {
	policies := apYAML("ns1", "allow", "  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/default/sa/defaultacct]}") +
		apYAML("ns1", "deny", "  action: DENY\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/default/sa/denyacct]}")
	runAuthz(t, policies, wl("ns1/pod"), []authzCase{
		{"2 allowed principal", from("default/defaultacct", 80), nil, "allow by ns1/allow"},
		{"3 other principal not allowed", from("default/not-defaultacct", 80), nil, "deny: not allowed"},
		{"4 explicitly denied principal", from("default/denyacct", 80), nil, "deny by ns1/deny"},
		{"plaintext not allowed", from("", 80), nil, "deny: not allowed"},
	})
	runAuthz(t, policies, wl("ns2/pod"), []authzCase{
		{"5 destination in another namespace", from("default/not-defaultacct", 80), nil, "allow"},
	})
	runAuthz(t, "", wl("ns1/pod"), []authzCase{
		{"1 no policies allows", from("", 80), nil, "allow"},
	})
}

// §2.12 scenario 6: dry-run policies are reported, never enforced.
func TestAuthzDryRun(t *testing.T) {
	dry := func(name, action string) string {
		return "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: " + name + "\n  namespace: ns\n  annotations: {istio.io/dry-run: \"true\"}\nspec:\n  action: " + action + "\n  rules: [{}]\n---\n"
	}
	yaml := dry("dry-allow", "ALLOW") + dry("dry-deny", "DENY") +
		apYAML("ns", "real", "  rules:\n  - from:\n    - source: {namespaces: [good]}")
	s := Compile(load(t, yaml), nil, Options{})
	cw := s.Compile(wl("ns/pod"))
	d := cw.EvaluateL4(from("good/x", 80))
	if decisionOf(d) != "allow by ns/real" || d.DryRun == nil || d.DryRun.Name != "dry-allow" {
		t.Errorf("good: %v", d)
	}
	if d := cw.EvaluateL4(from("bad/x", 80)); decisionOf(d) != "deny: not allowed" || d.DryRun == nil {
		t.Errorf("bad: %v", d)
	}
}

// §2.12 scenarios 7–9, 21, 22: empty rule lists and empty rules.
func TestAuthzEmptyRules(t *testing.T) {
	runAuthz(t, apYAML("ns", "none", "  rules: []"), wl("ns/pod"), []authzCase{
		{"7 rules [] as ALLOW denies everything", from("ns/x", 80), nil, "deny: not allowed"},
	})
	runAuthz(t, apYAML("ns", "all", "  rules: [{}]"), wl("ns/pod"), []authzCase{
		{"8/22 rules [{}] ALLOW matches plaintext", from("", 80), nil, "allow by ns/all"},
		{"22 rules [{}] ALLOW at L7", nil, httpReq("x/y", 80, "GET", "/"), "allow by ns/all"},
	})
	runAuthz(t, apYAML("ns", "all", "  action: DENY\n  rules: [{}]"), wl("ns/pod"), []authzCase{
		{"22 rules [{}] DENY denies everything", from("ns/x", 80), nil, "deny by ns/all"},
		{"22 rules [{}] DENY at L7", nil, httpReq("x/y", 80, "GET", "/"), "deny by ns/all"},
	})
	runAuthz(t, apYAML("ns", "empty", "  {}"), wl("ns/pod"), []authzCase{
		{"21 spec {} denies at L4", from("ns/x", 80), nil, "deny: not allowed"},
		{"21 spec {} denies at L7", nil, httpReq("ns/x", 80, "GET", "/"), "deny: not allowed"},
	})
	// A source with only trustDomains is an all-empty match at ztunnel: the clause never matches.
	runAuthz(t, apYAML("ns", "td", "  action: DENY\n  rules:\n  - from:\n    - source: {trustDomains: [cluster.local]}"), wl("ns/pod"), []authzCase{
		{"9 clause with one all-empty match matches nothing at L4", from("ns/x", 80), nil, "allow"},
		{"trustDomains enforced at L7 (Envoy)", nil, httpReq("ns/x", 80, "GET", "/"), "deny by ns/td"},
	})
}

// §2.12 scenarios 10–20: ztunnel match semantics, observed through DENY policies.
func TestAuthzZtunnelMatches(t *testing.T) {
	deny := func(rules string) string { return apYAML("ns", "d", "  action: DENY\n  rules:\n"+rules) }
	w := wl("ns/pod")
	const denied, allowed = "deny by ns/d", "allow"
	runAuthz(t, deny("  - from:\n    - source: {namespaces: [namespace]}"), w, []authzCase{
		{"10 namespaces: plaintext does not match", from("", 80), nil, allowed},
		{"10 namespaces: identity in namespace matches", from("namespace/sa", 80), nil, denied},
		{"10 namespaces: ns-alt does not match", from("ns-alt/sa", 80), nil, allowed},
	})
	runAuthz(t, deny("  - from:\n    - source: {notNamespaces: [namespace]}"), w, []authzCase{
		{"11 notNamespaces: plaintext matches", from("", 80), nil, denied},
		{"11 notNamespaces: namespace does not match", from("namespace/sa", 80), nil, allowed},
	})
	runAuthz(t, deny("  - from:\n    - source: {principals: [td/ns/namespace/sa/account]}"), w, []authzCase{
		{"12 principals: plaintext does not match", from("", 80), nil, allowed},
		{"12 principals: spiffe identity matches", from("spiffe://td/ns/namespace/sa/account", 80), nil, denied},
		{"12 principals: identity without spiffe:// does not match", &Conn{Peer: ParsePeer("td/ns/namespace/sa/account")}, nil, allowed},
	})
	runAuthz(t, deny("  - from:\n    - source: {notPrincipals: [td/ns/namespace/sa/account]}"), w, []authzCase{
		{"13 notPrincipals: plaintext matches", from("", 80), nil, denied},
		{"13 notPrincipals: that identity does not match", from("spiffe://td/ns/namespace/sa/account", 80), nil, allowed},
	})
	runAuthz(t, deny("  - from:\n    - source: {serviceAccounts: [namespace/account]}"), w, []authzCase{
		{"14 serviceAccounts: plaintext does not match", from("", 80), nil, allowed},
		{"14 serviceAccounts: matching identity", from("spiffe://other-td/ns/namespace/sa/account", 80), nil, denied},
		{"14 serviceAccounts: other account", from("namespace/account2", 80), nil, allowed},
	})
	runAuthz(t, deny("  - from:\n    - source: {ipBlocks: [127.0.0.1/32]}"), w, []authzCase{
		{"15 sourceIps: from 127.0.0.1 with mTLS", withIPs(from("a/b", 80), "127.0.0.1", "10.0.0.2"), nil, denied},
		{"15 sourceIps: from 127.0.0.1 plaintext", withIPs(from("", 80), "127.0.0.1", "10.0.0.2"), nil, denied},
		{"15 sourceIps: from 127.0.0.3", withIPs(from("", 80), "127.0.0.3", "10.0.0.2"), nil, allowed},
	})
	runAuthz(t, deny("  - when:\n    - {key: destination.ip, values: [127.0.0.1/24]}"), w, []authzCase{
		{"16 destinationIps: 127.0.0.2", withIPs(from("", 80), "10.0.0.1", "127.0.0.2"), nil, denied},
		{"16 destinationIps: 127.0.0.4", withIPs(from("", 80), "10.0.0.1", "127.0.0.4"), nil, denied},
		{"16 destinationIps: 10.0.0.2", from("", 80), nil, allowed},
	})
	runAuthz(t, deny("  - to:\n    - operation: {ports: [\"8080\"]}"), w, []authzCase{
		{"17 destinationPorts: 8080 matches", from("", 8080), nil, denied},
		{"17 destinationPorts: 9090 does not", from("", 9090), nil, allowed},
	})
	runAuthz(t, deny("  - to:\n    - operation: {notPorts: [\"8080\"]}"), w, []authzCase{
		{"17 notDestinationPorts: 8080 does not match", from("", 8080), nil, allowed},
		{"17 notDestinationPorts: 9090 matches", from("", 9090), nil, denied},
	})
	runAuthz(t, deny("  - from:\n    - source: {namespaces: [a]}\n    - source: {namespaces: [b]}\n    to:\n    - operation: {ports: [\"80\"]}"), w, []authzCase{
		{"18 ns b on port 80 matches", from("b/x", 80), nil, denied},
		{"18 ns bad does not", from("bad/x", 80), nil, allowed},
		{"18 ns b on port 12345 does not", from("b/x", 12345), nil, allowed},
	})
	runAuthz(t, deny("  - from:\n    - source: {namespaces: [a]}\n  - from:\n    - source: {namespaces: [b]}"), w, []authzCase{
		{"19 two rules: a", from("a/x", 80), nil, denied},
		{"19 two rules: b", from("b/x", 80), nil, denied},
		{"19 two rules: c", from("c/x", 80), nil, allowed},
	})
	runAuthz(t, deny("  - from:\n    - source: {namespaces: [\"ns.*.prod\"]}"), w, []authzCase{
		{"middle * is literal at L4 (ztunnel)", from("ns.any.prod/x", 80), nil, allowed},
		{"middle * is a wildcard at L7 (Envoy)", nil, httpReq("ns.any.prod/x", 80, "GET", "/"), denied},
	})
}

// §2.12 scenario 20.
func TestStringMatching(t *testing.T) {
	cases := []struct {
		pattern, value string
		want           bool
	}{
		{"foo", "foo", true}, {"foo", "", false}, {"foo*", "foobar", true}, {"foo*", "notfoo", false},
		{"*foo", "barfoo", true}, {"*foo", "foobar", false}, {"*", "x", true}, {"*", "", false},
		{"a*b", "a*b", true}, {"a*b", "axb", false},
	}
	for _, c := range cases {
		m := newStrMatch(c.pattern)
		if got := m.match(c.value); got != c.want {
			t.Errorf("%q vs %q: got %v", c.pattern, c.value, got)
		}
	}
	host := newStrMatch("*.Example.com")
	host.fold = true
	if !host.match("api.example.COM") {
		t.Error("hosts are case-insensitive")
	}
	if m := newStrMatch("GET"); m.match("get") {
		t.Error("methods are case-sensitive")
	}
}

// §2.12 scenarios 24, 25, 30–32: HTTP-only attributes at L4. veil follows ztunnel; where the
// sidecar differs the case name says so.
func TestAuthzHTTPAttributesAtL4(t *testing.T) {
	w := wl("ns/pod")
	runAuthz(t, apYAML("ns", "a", "  rules:\n  - from:\n    - source: {requestPrincipals: [\"*\"]}\n    to:\n    - operation: {methods: [GET]}\n  - from:\n    - source: {namespaces: [ns-1]}\n    to:\n    - operation: {hosts: [example.com]}"), w, []authzCase{
		{"24 ALLOW rules with HTTP fields are dropped: ns-1 denied over TCP", from("ns-1/x", 80), nil, "deny: not allowed"},
		{"24 the same rules work at L7", nil, &Request{Conn: *from("ns-1/x", 80), Host: "EXAMPLE.com", Method: "GET"}, "allow by ns/a"},
	})
	deny := func(rules string) string { return apYAML("ns", "d", "  action: DENY\n  rules:\n"+rules) }
	for _, c := range []struct {
		name, rules string
		conn        *Conn
		want        string
	}{
		{"25 DENY methods only: no effect (sidecar would deny all)", "  - to:\n    - operation: {methods: [GET]}", from("a/b", 80), "allow"},
		{"25 DENY requestPrincipals only: no effect (sidecar would deny all)", "  - from:\n    - source: {requestPrincipals: [\"*\"]}", from("a/b", 80), "allow"},
		{"25 DENY from ns-1 to methods: no effect (sidecar would deny ns-1)", "  - from:\n    - source: {namespaces: [ns-1]}\n    to:\n    - operation: {methods: [GET]}", from("ns-1/b", 80), "allow"},
		{"25 DENY requestPrincipals and port 80: no effect (sidecar would deny port 80)", "  - from:\n    - source: {requestPrincipals: [\"*\"]}\n    to:\n    - operation: {ports: [\"80\"]}", from("a/b", 80), "allow"},
		{"25 DENY when request.headers: no effect (sidecar would deny all)", "  - when:\n    - {key: \"request.headers[:method]\", values: [GET]}", from("a/b", 80), "allow"},
		{"25 DENY when destination.port 80: denies port 80", "  - when:\n    - {key: destination.port, values: [\"80\"]}", from("a/b", 80), "deny by ns/d"},
		{"25 DENY when destination.port 80: other ports pass", "  - when:\n    - {key: destination.port, values: [\"80\"]}", from("a/b", 81), "allow"},
		{"31 DENY notRequestPrincipals: no effect", "  - from:\n    - source: {notRequestPrincipals: [\"*\"]}", from("", 80), "allow"},
		{"31 DENY principals X and notRequestPrincipals: denies X", "  - from:\n    - source: {principals: [cluster.local/ns/a/sa/x], notRequestPrincipals: [\"*\"]}", from("a/x", 80), "deny by ns/d"},
		{"31 DENY [{notRequestPrincipals}, {principals X}]: denies X", "  - from:\n    - source: {notRequestPrincipals: [\"*\"]}\n  - from:\n    - source: {principals: [cluster.local/ns/a/sa/x]}", from("a/x", 80), "deny by ns/d"},
		{"31 DENY [{}, {L7}]: denies everything", "  - {}\n  - to:\n    - operation: {methods: [GET]}", from("", 80), "deny by ns/d"},
		{"31 DENY principals X when header: no-op", "  - from:\n    - source: {principals: [cluster.local/ns/a/sa/x]}\n    when:\n    - {key: \"request.headers[x-token]\", values: [\"*\"]}", from("a/x", 80), "allow"},
		{"31 DENY principals X to methods GET: no-op", "  - from:\n    - source: {principals: [cluster.local/ns/a/sa/x]}\n    to:\n    - operation: {methods: [GET]}", from("a/x", 80), "allow"},
		{"32 DENY P, R, N to port 80: denies P in N on 80", "  - from:\n    - source: {principals: [cluster.local/ns/nn/sa/p], requestPrincipals: [r], namespaces: [nn]}\n    to:\n    - operation: {ports: [\"80\"]}", from("nn/p", 80), "deny by ns/d"},
		{"32 DENY P, R, N to port 80: port 81 passes", "  - from:\n    - source: {principals: [cluster.local/ns/nn/sa/p], requestPrincipals: [r], namespaces: [nn]}\n    to:\n    - operation: {ports: [\"80\"]}", from("nn/p", 81), "allow"},
		{"32 DENY to ports 80 and methods, from P and N: denies P on 80", "  - from:\n    - source: {principals: [cluster.local/ns/nn/sa/p], namespaces: [nn]}\n    to:\n    - operation: {ports: [\"80\"], methods: [M]}", from("nn/p", 80), "deny by ns/d"},
		{"32 same rule: other principal passes", "  - from:\n    - source: {principals: [cluster.local/ns/nn/sa/p], namespaces: [nn]}\n    to:\n    - operation: {ports: [\"80\"], methods: [M]}", from("nn/q", 80), "allow"},
		{"remoteIpBlocks count as HTTP at ztunnel", "  - from:\n    - source: {remoteIpBlocks: [10.0.0.0/8]}", from("a/b", 80), "allow"},
		{"source.serviceAccount key counts as HTTP at ztunnel", "  - when:\n    - {key: source.serviceAccount, values: [a/b]}", from("a/b", 80), "allow"},
	} {
		runAuthz(t, deny(c.rules), w, []authzCase{{c.name, c.conn, nil, c.want}})
	}
}

// §2.12 scenario 30: the note names the dropped HTTP attributes.
func TestAuthzDroppedAllowRuleNote(t *testing.T) {
	s := Compile(load(t, apYAML("ns", "a", "  rules:\n  - from:\n    - source: {requestPrincipals: [\"*\"]}\n    to:\n    - operation: {methods: [GET]}\n    when:\n    - {key: request.auth.presenter, values: [x]}")), nil, Options{})
	p := s.Policies()[0]
	if len(p.l4) != 0 || len(p.Notes) != 1 || !strings.Contains(p.Notes[0], "found: methods, request.auth.presenter, requestPrincipals") {
		t.Errorf("l4 rules %d notes %v", len(p.l4), p.Notes)
	}
}

// §2.12 scenario 33: targetRefs, AUDIT and CUSTOM policies are not enforced at L4.
func TestAuthzNotEnforcedAtL4(t *testing.T) {
	yaml := apYAML("ns", "targeted", "  action: DENY\n  targetRefs: [{kind: Service, group: \"\", name: svc}]\n  rules: [{}]") +
		apYAML("ns", "audit", "  action: AUDIT\n  rules: [{}]") +
		apYAML("ns", "custom", "  action: CUSTOM\n  provider: {name: ext-authz}\n  rules: [{}]")
	s := Compile(load(t, yaml), nil, Options{})
	cw := s.Compile(wl("ns/pod"))
	if d := cw.EvaluateL4(from("", 80)); decisionOf(d) != "allow" {
		t.Errorf("L4: %v", d)
	}
	d := cw.EvaluateHTTP(httpReq("a/b", 80, "GET", "/"))
	if decisionOf(d) != "allow" || d.Custom == nil || d.Custom.Provider != "ext-authz" || d.Audit == nil || d.Audit.Name != "audit" {
		t.Errorf("L7 on a plain workload: %v", d)
	}
	for _, p := range s.Policies() {
		if p.Name == "audit" && !strings.Contains(strings.Join(p.Notes, " "), "ztunnel does not support the AUDIT action") {
			t.Errorf("audit notes %v", p.Notes)
		}
	}
	// A waypoint enforces the targetRefs policy for traffic to that Service only.
	wp := s.Compile(&Workload{Namespace: "ns", Name: "waypoint", Waypoint: true, Labels: map[string]string{gatewayNameLabel: "waypoint"}})
	r := httpReq("a/b", 80, "GET", "/")
	r.Service = ServiceRef{"Service", "ns", "svc"}
	if d := wp.EvaluateHTTP(r); decisionOf(d) != "deny by ns/targeted" {
		t.Errorf("waypoint, svc: %v", d)
	}
	r.Service.Name = "other"
	if d := wp.EvaluateHTTP(r); decisionOf(d) != "allow" {
		t.Errorf("waypoint, other service: %v", d)
	}
}

// §0 attachment: GatewayClass istio-waypoint policies apply to every waypoint; Gateway refs to
// the named gateway; waypoints ignore selector policies.
func TestAuthzGatewayAttachment(t *testing.T) {
	yaml := apYAML(root, "all-waypoints", "  action: DENY\n  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\n  rules:\n  - from:\n    - source: {namespaces: [evil]}") +
		apYAML("ns", "gw", "  action: DENY\n  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: ingress}\n  rules:\n  - to:\n    - operation: {paths: [/admin]}") +
		apYAML("ns", "ns-wide", "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/secret]}")
	s := Compile(load(t, yaml), nil, Options{})
	wp := s.Compile(&Workload{Namespace: "ns", Name: "wp", Waypoint: true, Labels: map[string]string{gatewayNameLabel: "waypoint"}})
	ingress := s.Compile(&Workload{Namespace: "ns", Name: "ingress-1", Labels: map[string]string{gatewayNameLabel: "ingress"}})
	for _, c := range []struct {
		name string
		cw   *CompiledWorkload
		req  *Request
		want string
	}{
		{"GatewayClass policy applies to a waypoint", wp, httpReq("evil/x", 80, "GET", "/"), "deny by istio-system/all-waypoints"},
		{"waypoints ignore namespace-wide policies", wp, httpReq("a/x", 80, "GET", "/secret"), "allow"},
		{"Gateway ref applies to the named gateway", ingress, httpReq("a/x", 80, "GET", "/admin"), "deny by ns/gw"},
		{"other gateways keep selector-based policies", ingress, httpReq("a/x", 80, "GET", "/secret"), "deny by ns/ns-wide"},
		{"GatewayClass istio-waypoint does not apply to other gateways", ingress, httpReq("evil/x", 80, "GET", "/"), "allow"},
	} {
		if got := decisionOf(c.cw.EvaluateHTTP(c.req)); got != c.want {
			t.Errorf("%s: got %q, want %q", c.name, got, c.want)
		}
	}
}

// §2.12 scenario 34: root-namespace selector policies apply in every namespace.
func TestAuthzRootNamespaceSelector(t *testing.T) {
	yaml := apYAML(root, "global-selector", "  action: DENY\n  selector: {matchLabels: {app: a}}\n  rules: [{}]") +
		apYAML(root, "global", "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [evil]}") +
		apYAML("other", "local-selector", "  action: DENY\n  selector: {matchLabels: {app: a}}\n  rules: [{}]")
	runAuthz(t, yaml, wl("ns1/pod", "app=a"), []authzCase{{"app=a in ns1 gets the root selector policy", from("x/y", 80), nil, "deny by istio-system/global-selector"}})
	runAuthz(t, yaml, wl("ns2/pod", "app=a", "v=1"), []authzCase{{"app=a in ns2 too", from("x/y", 80), nil, "deny by istio-system/global-selector"}})
	runAuthz(t, yaml, wl("ns1/pod", "app=b"), []authzCase{
		{"app=b is not selected", from("x/y", 80), nil, "allow"},
		{"root policy without selector is mesh-wide", from("evil/y", 80), nil, "deny by istio-system/global"},
	})
	changed := strings.Replace(yaml, "{app: a}}\n  rules: [{}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: global,", "{app: not-a}}\n  rules: [{}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: global,", 1)
	runAuthz(t, changed, wl("ns1/pod", "app=a"), []authzCase{{"selector changed to app=not-a removes it", from("x/y", 80), nil, "allow"}})
}

// §2.12 scenario 29: serviceAccounts at L7 (Envoy) versus L4 (ztunnel).
func TestAuthzServiceAccounts(t *testing.T) {
	yaml := apYAML("ns", "d", "  action: DENY\n  rules:\n  - from:\n    - source: {serviceAccounts: [my-ns/my-sa, my.ns/my.sa]}")
	req := func(uri string) *Request { r := httpReq("", 80, "GET", "/"); r.Peer = ParsePeer(uri); return r }
	runAuthz(t, yaml, wl("ns/pod"), []authzCase{
		{"exact identity matches", nil, req("spiffe://cluster.local/ns/my-ns/sa/my-sa"), "deny by ns/d"},
		{"other trust domain matches", nil, req("spiffe://td/ns/my-ns/sa/my-sa"), "deny by ns/d"},
		{"extra segments match in Envoy", nil, req("spiffe://cluster.local/ns/my-ns/sa/my-sa/k/v"), "deny by ns/d"},
		{"sa suffix does not match", nil, req("spiffe://cluster.local/ns/my-ns/sa/my-sa-suffix"), "allow"},
		{"ns suffix does not match", nil, req("spiffe://cluster.local/ns/my-ns-suffix/sa/my-sa"), "allow"},
		{"dots are literal", nil, req("spiffe://cluster.local/ns/myXns/sa/myXsa"), "allow"},
		{"L4 exact namespace and account", &Conn{Peer: ParsePeer("spiffe://cluster.local/ns/my-ns/sa/my-sa")}, nil, "deny by ns/d"},
		{"L4 extra segments are not an identity", &Conn{Peer: ParsePeer("spiffe://cluster.local/ns/my-ns/sa/my-sa/k/v")}, nil, "allow"},
	})
}

// §2.12 scenarios 26–28: request principals and claims at L7.
func TestAuthzRequestPrincipalsAndClaims(t *testing.T) {
	jwt := func(iss, sub string, claims map[string]any) *Request {
		r := httpReq("a/b", 80, "GET", "/token1")
		r.JWT = &JWT{Issuer: iss, Subject: sub, Claims: claims}
		return r
	}
	yaml := apYAML("ns", "a", "  rules:\n  - from:\n    - source: {requestPrincipals: [test-issuer-1@istio.io/sub-1]}\n    to:\n    - operation: {methods: [GET], paths: [/token1]}")
	runAuthz(t, yaml, wl("ns/pod"), []authzCase{
		{"26/27 valid issuer-1 token", nil, jwt("test-issuer-1@istio.io", "sub-1", nil), "allow by ns/a"},
		{"27 no JWT", nil, httpReq("a/b", 80, "GET", "/token1"), "deny: not allowed"},
		{"27 issuer-2 token", nil, jwt("test-issuer-2@istio.io", "sub-1", nil), "deny: not allowed"},
		{"wrong method", nil, func() *Request { r := jwt("test-issuer-1@istio.io", "sub-1", nil); r.Method = "POST"; return r }(), "deny: not allowed"},
		{"query string ignored", nil, func() *Request { r := jwt("test-issuer-1@istio.io", "sub-1", nil); r.Path = "/token1?x=1"; return r }(), "allow by ns/a"},
	})
	claims := apYAML("ns", "c", "  rules:\n  - when:\n    - {key: \"request.auth.claims[scope]\", values: [a]}\n  - when:\n    - {key: \"request.auth.claims[nested][key1]\", values: [v1]}\n  - when:\n    - {key: \"request.auth.claims[groups]\", values: [admins]}")
	runAuthz(t, claims, wl("ns/pod"), []authzCase{
		{"28 space-delimited scope", nil, jwt("i", "s", map[string]any{"scope": "b a"}), "allow by ns/c"},
		{"28 nested claim", nil, jwt("i", "s", map[string]any{"nested": map[string]any{"key1": "v1"}}), "allow by ns/c"},
		{"28 other nested value", nil, jwt("i", "s", map[string]any{"nested": map[string]any{"key1": "v2"}}), "deny: not allowed"},
		{"28 list claim", nil, jwt("i", "s", map[string]any{"groups": []any{"users", "admins"}}), "allow by ns/c"},
		{"28 non-string scalar never matches", nil, jwt("i", "s", map[string]any{"groups": 1.0}), "deny: not allowed"},
		{"28 non-existent claim", nil, jwt("i", "s", map[string]any{}), "deny: not allowed"},
	})
	rp := apYAML("ns", "r", "  rules:\n  - from:\n    - source: {requestPrincipals: [\"https://iss.example/*\", \"*/exact-sub\", \"pre*\"]}")
	runAuthz(t, rp, wl("ns/pod"), []authzCase{
		{"iss exact with any sub (issuer is a URL)", nil, jwt("https://iss.example", "x", nil), "allow by ns/r"},
		{"any iss with exact sub", nil, jwt("other", "exact-sub", nil), "allow by ns/r"},
		{"iss prefix", nil, jwt("prefix-issuer", "s", nil), "allow by ns/r"},
		{"JWT without sub never matches", nil, jwt("https://iss.example", "", nil), "deny: not allowed"},
	})
}

// §2.5, §2.6: not-fields against missing attributes, headers, hosts, when notValues.
func TestAuthzL7Attributes(t *testing.T) {
	yaml := apYAML("ns", "d", "  action: DENY\n  rules:\n  - to:\n    - operation: {notMethods: [GET]}\n  - when:\n    - {key: \"request.headers[X-Debug]\", values: [\"*\"]}\n  - to:\n    - operation: {hosts: [\"*.internal\"]}\n  - when:\n    - {key: request.auth.principal, notValues: [\"*\"]}\n    - {key: remote.ip, values: [192.168.0.0/16]}\n  - to:\n    - operation: {paths: [\"/api/{*}/delete\", \"/files/{**}\"]}")
	base := func() *Request { return httpReq("a/b", 80, "GET", "/") }
	mod := func(f func(*Request)) *Request { r := base(); f(r); return r }
	runAuthz(t, yaml, wl("ns/pod"), []authzCase{
		{"plain GET passes", nil, base(), "allow"},
		{"notMethods: POST is denied", nil, mod(func(r *Request) { r.Method = "POST" }), "deny by ns/d"},
		{"header presence, any case", nil, mod(func(r *Request) { r.Headers = map[string][]string{"x-debug": {""}} }), "deny by ns/d"},
		{"host suffix, case-insensitive", nil, mod(func(r *Request) { r.Host = "DB.Internal" }), "deny by ns/d"},
		{"no JWT satisfies notValues; remote.ip from XFF", nil, mod(func(r *Request) { r.RemoteIP = netip.MustParseAddr("192.168.1.1") }), "deny by ns/d"},
		{"remote.ip defaults to the source address", nil, mod(func(r *Request) { r.SrcIP = netip.MustParseAddr("192.168.1.1") }), "deny by ns/d"},
		{"with a JWT the notValues fails", nil, mod(func(r *Request) {
			r.RemoteIP = netip.MustParseAddr("192.168.1.1")
			r.JWT = &JWT{Issuer: "i", Subject: "s"}
		}), "allow"},
		{"path template {*}", nil, mod(func(r *Request) { r.Path = "/api/users/delete" }), "deny by ns/d"},
		{"path template {*} needs one segment", nil, mod(func(r *Request) { r.Path = "/api/a/b/delete" }), "allow"},
		{"path template {**}", nil, mod(func(r *Request) { r.Path = "/files/a/b/c" }), "deny by ns/d"},
	})
}

// §2.12 scenario 35: trust-domain aliases expand principals at L7 only.
func TestAuthzTrustDomainAliases(t *testing.T) {
	cases := []struct {
		name      string
		opts      Options
		principal string
		peers     map[string]bool // peer trust domain → denied
	}{
		{"alias td1 of td2", Options{TrustDomain: "td2", TrustDomainAliases: []string{"td1"}}, "td1/ns/foo/sa/bar",
			map[string]bool{"td2": true, "td1": true, "td3": false}},
		{"cluster.local placeholder", Options{TrustDomain: "td1", TrustDomainAliases: []string{"cluster.local"}}, "cluster.local/ns/foo/sa/bar",
			map[string]bool{"td1": true, "cluster.local": true}},
		{"wildcard alias kept", Options{TrustDomain: "td2", TrustDomainAliases: []string{"foo-td1", "cluster.local"}}, "*-td1/ns/foo/sa/bar",
			map[string]bool{"td2": true, "cluster.local": true, "foo-td1": true, "bar-td1": true, "td3": false}},
		{"unknown trust domain unchanged", Options{TrustDomain: "td2", TrustDomainAliases: []string{"td1"}}, "some-td/ns/foo/sa/bar",
			map[string]bool{"some-td": true, "td2": false}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := Compile(load(t, apYAML("ns", "d", "  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\""+tc.principal+"\"]}")), nil, tc.opts)
			cw := s.Compile(wl("ns/pod"))
			for td, want := range tc.peers {
				r := httpReq("spiffe://"+td+"/ns/foo/sa/bar", 80, "GET", "/")
				if got := !cw.EvaluateHTTP(r).Allowed(); got != want {
					t.Errorf("L7 peer in %s: denied=%v, want %v", td, got, want)
				}
			}
			// ztunnel does no alias expansion: only the literal principal matches at L4.
			lit, _, _ := strings.Cut(tc.principal, "/")
			for td := range tc.peers {
				c := from("spiffe://"+td+"/ns/foo/sa/bar", 80)
				lm := newStrMatch(lit)
				want := lm.match(td)
				if got := !cw.EvaluateL4(c).Allowed(); got != want {
					t.Errorf("L4 peer in %s: denied=%v, want %v", td, got, want)
				}
			}
		})
	}
}

// §2.12 scenario 36: PERMISSIVE plus DENY notPrincipals ["*"] denies plaintext, allows mTLS.
func TestAuthzDenyPlaintext(t *testing.T) {
	yaml := "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: ns}\nspec: {mtls: {mode: PERMISSIVE}}\n---\n" +
		apYAML("ns", "deny-plaintext", "  action: DENY\n  rules:\n  - from:\n    - source: {notPrincipals: [\"*\"]}")
	runAuthz(t, yaml, wl("ns/pod"), []authzCase{
		{"plaintext TCP denied", from("", 80), nil, "deny by ns/deny-plaintext"},
		{"plaintext HTTP denied", nil, httpReq("", 80, "GET", "/"), "deny by ns/deny-plaintext"},
		{"mTLS TCP allowed", from("other/client", 80), nil, "allow"},
		{"mTLS HTTP allowed", nil, httpReq("other/client", 80, "GET", "/"), "allow"},
	})
}

// The reported policy is the first matching one by namespace/name, whatever the index path.
func TestAuthzReasonIsDeterministic(t *testing.T) {
	yaml := apYAML("ns", "b-by-principal", "  action: DENY\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/x/sa/y]}") +
		apYAML("ns", "a-by-namespace", "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [x]}") +
		apYAML("ns", "c-scan", "  action: DENY\n  rules:\n  - from:\n    - source: {ipBlocks: [0.0.0.0/0]}")
	runAuthz(t, yaml, wl("ns/pod"), []authzCase{
		{"earliest name wins", from("x/y", 80), nil, "deny by ns/a-by-namespace"},
		{"principal bucket before scan", from("q/y", 80), nil, "deny by ns/c-scan"},
	})
}
