package policy

// Regressions found by a review against ISTIO-SEMANTICS.md, each named for what it checks.

import (
	"net/netip"
	"strings"
	"testing"
)

// §0 step 3: a waypoint policy with several Service targetRefs applies to each Service.
func TestAuthzEveryServiceTargetRefAttaches(t *testing.T) {
	s := Compile(load(t, apYAML("ns", "two-svcs", "  action: DENY\n  targetRefs: [{kind: Service, group: \"\", name: a}, {kind: Service, group: \"\", name: b}]\n  rules: [{}]")), nil, Options{})
	wp := s.Compile(&Workload{Namespace: "ns", Name: "wp", Waypoint: true, Labels: map[string]string{gatewayNameLabel: "waypoint"}})
	for _, svc := range []string{"a", "b"} {
		r := httpReq("x/y", 80, "GET", "/")
		r.Service = ServiceRef{"Service", "ns", svc}
		if got := decisionOf(wp.EvaluateHTTP(r)); got != "deny by ns/two-svcs" {
			t.Errorf("Service %s: %q, want the DENY", svc, got)
		}
	}
}

// §2.4 step 1: CUSTOM policies naming two providers on one workload become deny-all.
// [Envoy]
func TestAuthzConflictingCustomProvidersDenyAll(t *testing.T) {
	yaml := apYAML("ns", "c1", "  action: CUSTOM\n  provider: {name: p1}\n  rules: [{}]") +
		apYAML("ns", "c2", "  action: CUSTOM\n  provider: {name: p2}\n  rules: [{to: [{operation: {paths: [/never]}}]}]")
	s := Compile(load(t, yaml), nil, Options{})
	w := s.Compile(wl("ns/app"))
	if got := decisionOf(w.EvaluateHTTP(httpReq("x/y", 80, "GET", "/"))); got != "deny by ns/c1" {
		t.Fatalf("two CUSTOM providers: %q, want deny-all", got)
	}
	one := Compile(load(t, apYAML("ns", "c1", "  action: CUSTOM\n  provider: {name: p1}\n  rules: [{}]")), nil, Options{}).Compile(wl("ns/app"))
	if d := one.EvaluateHTTP(httpReq("x/y", 80, "GET", "/")); !d.Allowed() || d.Custom == nil {
		t.Fatalf("one CUSTOM provider: %v, want allowed subject to the provider", d)
	}
}

// An IPv4-mapped CIDR never widens into a larger IPv4 range.
func TestIPv4MappedBlocks(t *testing.T) {
	for _, tc := range []struct {
		in, want string
	}{
		{"::ffff:10.0.0.0/104", "10.0.0.0/8"},
		{"::ffff:10.1.2.3", "10.1.2.3/32"},
		{"::ffff:0.0.0.0/0", "::/0"}, // an IPv6 range: it matches no IPv4 client
		{"10.0.0.0/8", "10.0.0.0/8"},
	} {
		p, err := parseIPBlock(tc.in)
		if err != nil || p != netip.MustParsePrefix(tc.want) {
			t.Errorf("parseIPBlock(%q) = %v, %v; want %s", tc.in, p, err, tc.want)
		}
	}
	s := Compile(load(t, apYAML("ns", "allow-mapped", "  rules: [{from: [{source: {ipBlocks: [\"::ffff:0.0.0.0/0\"]}}]}]")), nil, Options{})
	if got := decisionOf(s.Compile(wl("ns/app")).EvaluateL4(from("x/y", 80))); got != "deny: not allowed" {
		t.Fatalf("ALLOW ipBlocks ::ffff:0.0.0.0/0 for an IPv4 client: %q, want not allowed", got)
	}
}

// istio.io/dry-run is a boolean as strconv.ParseBool reads it, on ALLOW and DENY only.
func TestDryRunAnnotation(t *testing.T) {
	ap := func(action, val string) string {
		return "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: ns, annotations: {istio.io/dry-run: \"" + val + "\"}}\nspec:\n  action: " + action + "\n  rules: [{}]\n"
	}
	s := Compile(load(t, ap("DENY", "True")), nil, Options{})
	if got := decisionOf(s.Compile(wl("ns/app")).EvaluateL4(from("x/y", 80))); got != "allow" {
		t.Fatalf("dry-run \"True\" DENY: %q, want it not enforced", got)
	}
	for _, tc := range []struct{ action, val, want string }{
		{"DENY", "bogus", "is not a boolean"},
		{"CUSTOM\n  provider: {name: p}", "true", "only to ALLOW and DENY"},
	} {
		objs := Parse("d.yaml", []byte(ap(tc.action, tc.val))).Objects
		if len(objs) != 1 {
			t.Fatalf("parse %q", tc.val)
		}
		if _, err := Validate(objs[0], Options{}); err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "metadata.annotations[istio.io/dry-run]") {
			t.Errorf("%s with dry-run %q: %v, want an error about %q naming the field", tc.action, tc.val, err, tc.want)
		}
	}
}

// §2.6 namespaces [Envoy]: at L7 the value is the regex .*/ns/<v>/.* over the URI SAN, so a
// * may span segments and a non-Istio URI is matched too; at L4 (ztunnel) the parsed
// namespace is matched, a middle * literally.
func TestNamespacesAtL7AreARegexOverTheURI(t *testing.T) {
	allow := Compile(load(t, apYAML("ns", "a", "  rules: [{from: [{source: {namespaces: [\"*a\"]}}]}]")), nil, Options{}).Compile(wl("ns/app"))
	if got := decisionOf(allow.EvaluateHTTP(httpReq("foo/bar", 80, "GET", "/"))); got != "allow by ns/a" {
		t.Errorf("namespaces [*a], peer ns/foo/sa/bar at L7: %q, want allowed (the regex spans foo/s...a/)", got)
	}
	deny := Compile(load(t, apYAML("ns", "d", "  action: DENY\n  rules: [{from: [{source: {namespaces: [prod]}}]}]")), nil, Options{}).Compile(wl("ns/app"))
	if got := decisionOf(deny.EvaluateHTTP(httpReq("spiffe://cluster.local/ns/prod/sa/bar/k/v", 80, "GET", "/"))); got != "deny by ns/d" {
		t.Errorf("DENY namespaces [prod], non-Istio URI in prod at L7: %q, want denied", got)
	}
	mid := Compile(load(t, apYAML("ns", "m", "  rules: [{from: [{source: {namespaces: [\"ns.*.prod\"]}}]}]")), nil, Options{}).Compile(wl("ns/app"))
	if got := decisionOf(mid.EvaluateHTTP(httpReq("ns.eu.prod/x", 80, "GET", "/"))); got != "allow by ns/m" {
		t.Errorf("middle * at L7: %q, want allowed", got)
	}
	if got := decisionOf(mid.EvaluateL4(from("ns.eu.prod/x", 80))); got != "deny: not allowed" {
		t.Errorf("middle * at L4: %q, want it taken literally (not allowed)", got)
	}
	if got := decisionOf(mid.EvaluateHTTP(httpReq("nsXeuXprod/x", 80, "GET", "/"))); got == "allow by ns/m" {
		t.Errorf("dots must be literal in the L7 regex")
	}
}

// §2.6 claims: a claim the verifying RequestAuthentication lists in spaceDelimitedClaims is
// split on spaces, like scope and permission.
func TestSpaceDelimitedClaims(t *testing.T) {
	w := Compile(load(t, apYAML("ns", "admins", "  rules: [{when: [{key: \"request.auth.claims[roles]\", values: [admin]}]}]")), nil, Options{}).Compile(wl("ns/app"))
	req := func(delimited ...string) *Request {
		r := httpReq("x/y", 80, "GET", "/")
		r.JWT = &JWT{Issuer: "iss", Subject: "sub", Claims: map[string]any{"roles": "user admin"}, SpaceDelimited: delimited}
		return r
	}
	if got := decisionOf(w.EvaluateHTTP(req("roles"))); got != "allow by ns/admins" {
		t.Errorf("roles listed as space-delimited: %q, want allowed", got)
	}
	if got := decisionOf(w.EvaluateHTTP(req())); got != "deny: not allowed" {
		t.Errorf("roles not listed: %q, want the whole string compared (not allowed)", got)
	}
}

// §2.3: a waypoint serving a Service of another namespace applies the policies that
// target that Service from the Service's own namespace.
func TestWaypointAppliesServicePoliciesOfOtherNamespaces(t *testing.T) {
	s := Compile(load(t, apYAML("app", "deny-c", "  action: DENY\n  targetRefs: [{kind: Service, group: \"\", name: c}]\n  rules: [{}]")), nil, Options{})
	wp := s.Compile(&Workload{Namespace: "ns", Name: "wp", Waypoint: true, Labels: map[string]string{gatewayNameLabel: "waypoint"}})
	r := httpReq("x/y", 80, "GET", "/")
	r.Service = ServiceRef{"Service", "app", "c"}
	if got := decisionOf(wp.EvaluateHTTP(r)); got != "deny by app/deny-c" {
		t.Errorf("Service app/c through waypoint ns/wp: %q, want the DENY", got)
	}
	r.Service = ServiceRef{"Service", "ns", "c"}
	if got := decisionOf(wp.EvaluateHTTP(r)); got != "allow" {
		t.Errorf("Service ns/c (another Service of the same name): %q, want allow", got)
	}
}
