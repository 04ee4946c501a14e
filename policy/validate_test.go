package policy

import (
	"errors"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	ap := func(spec string) string {
		return "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ratings-policy, namespace: bookinfo}\nspec:\n" + spec
	}
	pa := func(ns, spec string) string {
		return "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: " + ns + "}\nspec:\n" + spec
	}
	ra := func(spec string) string {
		return "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: bookinfo}\nspec:\n" + spec
	}
	cases := []struct {
		name, doc string
		want      string // "" means valid
	}{
		{"non-numeric port names object and path", ap("  rules:\n  - {}\n  - to:\n    - operation: {ports: [\"http\"]}\n"),
			`AuthorizationPolicy bookinfo/ratings-policy: spec.rules[1].to[0].operation.ports[0]: "http" is not a port`},
		{"port above 65535", ap("  rules:\n  - to:\n    - operation: {notPorts: [\"65536\"]}\n"), `notPorts[0]: "65536" is not a port`},
		{"DENY without rules rejected (2.12 #23)", ap("  action: DENY\n"), `spec.rules: a DENY policy must have rules`},
		{"DENY with rules [{}] accepted", ap("  action: DENY\n  rules: [{}]\n"), ""},
		{"ALLOW spec {} accepted", ap("  {}\n"), ""},
		{"CUSTOM without provider", ap("  action: CUSTOM\n  rules: [{}]\n"), `spec.provider.name: required with action CUSTOM`},
		{"CUSTOM without rules", ap("  action: CUSTOM\n  provider: {name: ext}\n"), `a CUSTOM policy must have rules`},
		{"provider with ALLOW", ap("  provider: {name: ext}\n  rules: [{}]\n"), `spec.provider: only allowed with action CUSTOM`},
		{"CUSTOM with principals", ap("  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - from:\n    - source: {principals: [a]}\n"), `source.principals: not supported with action CUSTOM`},
		{"CUSTOM with source.principal key", ap("  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - when:\n    - {key: source.principal, values: [a]}\n"), `"source.principal" is not supported with action CUSTOM`},
		{"empty source", ap("  rules:\n  - from:\n    - source: {}\n"), `spec.rules[0].from[0].source: must set at least one field`},
		{"missing operation", ap("  rules:\n  - to:\n    - {}\n"), `spec.rules[0].to[0].operation: required`},
		{"empty string in list", ap("  rules:\n  - from:\n    - source: {principals: [\"\"]}\n"), `source.principals[0]: empty string is not allowed`},
		{"bad ip block", ap("  rules:\n  - from:\n    - source: {ipBlocks: [\"10.0.0.0/33\"]}\n"), `ipBlocks[0]: "10.0.0.0/33" is not an IP address or CIDR`},
		{"serviceAccounts with principals", ap("  rules:\n  - from:\n    - source: {serviceAccounts: [a/b], principals: [x]}\n"), `serviceAccounts cannot be combined with principals or namespaces`},
		{"serviceAccounts wildcard", ap("  rules:\n  - from:\n    - source: {serviceAccounts: [\"ns/*\"]}\n"), `wildcards are not supported in serviceAccounts`},
		{"serviceAccounts too many segments", ap("  rules:\n  - from:\n    - source: {serviceAccounts: [\"a/b/c\"]}\n"), `must be <namespace>/<serviceaccount>`},
		{"trustDomains middle star", ap("  rules:\n  - from:\n    - source: {trustDomains: [\"a*b\"]}\n"), `at most one *, only at the start or the end`},
		{"when without values", ap("  rules:\n  - when:\n    - {key: source.ip}\n"), `spec.rules[0].when[0]: at least one of values or notValues is required`},
		{"when unknown key", ap("  rules:\n  - when:\n    - {key: source.name, values: [a]}\n"), `unknown condition key "source.name"`},
		{"when legacy key", ap("  rules:\n  - when:\n    - {key: \"destination.labels[app]\", values: [a]}\n"), `is a legacy key`},
		{"when malformed header key", ap("  rules:\n  - when:\n    - {key: \"request.headers[x\", values: [a]}\n"), `must have the form request.headers[name]`},
		{"when nested claim accepted", ap("  rules:\n  - when:\n    - {key: \"request.auth.claims[a][b]\", values: [a]}\n"), ""},
		{"when envoy filter key accepted", ap("  rules:\n  - when:\n    - {key: \"experimental.envoy.filters.network.mysql_proxy[db.table]\", values: [\"[update]\"]}\n"), ""},
		{"when bad ip value", ap("  rules:\n  - when:\n    - {key: destination.ip, values: [nope]}\n"), `values[0]: "nope" is not an IP address or CIDR`},
		{"when bad port value", ap("  rules:\n  - when:\n    - {key: destination.port, notValues: [\"x\"]}\n"), `notValues[0]: "x" is not a port`},
		{"path template ok", ap("  rules:\n  - to:\n    - operation: {paths: [\"/a/{*}/b/{**}\"]}\n"), ""},
		{"path template {**} not last", ap("  rules:\n  - to:\n    - operation: {paths: [\"/a/{**}/b\"]}\n"), `{**} must be the last segment`},
		{"path template with other star", ap("  rules:\n  - to:\n    - operation: {paths: [\"/a/{*}/b*\"]}\n"), `a template segment must be exactly`},
		{"selector and targetRefs together", ap("  selector: {matchLabels: {a: b}}\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]\n"), `only one of selector, targetRef or targetRefs`},
		{"cross-namespace targetRef", ap("  targetRefs: [{kind: Service, group: \"\", name: s, namespace: other}]\n"), `cross-namespace references are not supported`},
		{"unsupported targetRef kind", ap("  targetRefs: [{kind: Deployment, group: apps, name: d}]\n"), `group "apps" kind "Deployment" is not supported`},
		{"GatewayClass outside root namespace", ap("  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\n"), `only allowed in the root namespace`},
		{"wildcard selector", ap("  selector: {matchLabels: {app: \"*\"}}\n"), `wildcard is not supported in selector`},
		{"PA portLevelMtls without selector rejected (1.6 #16)", pa("foo", "  portLevelMtls: {8080: {mode: STRICT}}\n"), `spec.portLevelMtls: mesh/namespace peer authentication cannot have port level mTLS`},
		{"PA portLevelMtls with empty selector rejected", pa("foo", "  selector: {matchLabels: {}}\n  portLevelMtls: {8080: {mode: STRICT}}\n"), `cannot have port level mTLS`},
		{"PA port 0 rejected", pa("foo", "  selector: {matchLabels: {a: b}}\n  portLevelMtls: {0: {mode: STRICT}}\n"), `spec.portLevelMtls[0]: port must be in 1..65535`},
		{"PA port 65536 rejected", pa("foo", "  selector: {matchLabels: {a: b}}\n  portLevelMtls: {65536: {mode: STRICT}}\n"), `spec.portLevelMtls[65536]: port must be in 1..65535`},
		{"PA spec {} accepted", pa("foo", "  {}\n"), ""},
		{"RA needs issuer or jwksUri", ra("  jwtRules: [{audiences: [a]}]\n"), `spec.jwtRules[0].issuer: issuer or jwksUri is required`},
		{"RA jwksUri scheme", ra("  jwtRules: [{issuer: i, jwksUri: \"ftp://x/keys\"}]\n"), `must be an http or https URL`},
		{"RA jwks and jwksUri exclusive", ra("  jwtRules: [{issuer: i, jwksUri: \"https://x/keys\", jwks: \"{}\"}]\n"), `jwks and jwksUri are mutually exclusive`},
		{"RA inline jwks must be JSON", ra("  jwtRules: [{issuer: i, jwks: \"not json\"}]\n"), `not a JSON Web Key Set`},
		{"RA claim header name", ra("  jwtRules: [{issuer: i, outputClaimToHeaders: [{header: \"x y\", claim: sub}]}]\n"), `outputClaimToHeaders[0].header: "x y" must match`},
		{"RA header without name", ra("  jwtRules: [{issuer: i, fromHeaders: [{prefix: \"Bearer \"}]}]\n"), `fromHeaders[0].name: required`},
		{"RA valid", ra("  jwtRules: [{issuer: i, jwksUri: \"https://x/keys\", audiences: [a], forwardOriginalToken: true}]\n"), ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := Parse("f.yaml", []byte(tc.doc))
			if len(m.Errors) > 0 || len(m.Objects) != 1 {
				t.Fatalf("parse: %v", m.Errors)
			}
			_, err := Validate(m.Objects[0], Options{})
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tc.want == "":
			case err == nil:
				t.Fatalf("accepted, want error containing %q", tc.want)
			case !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "f.yaml:1: "):
				t.Fatalf("error %q\nwant it to contain %q", err, tc.want)
			case !errors.Is(err, ErrInvalid):
				t.Fatalf("%v is not ErrInvalid", err)
			}
		})
	}
}

func TestValidateWarnsOnHTTPOnlyDeny(t *testing.T) {
	m := Parse("f.yaml", []byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: ns}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [GET]}\n"))
	warnings, err := Validate(m.Objects[0], Options{})
	if err != nil || len(warnings) != 1 || !strings.Contains(warnings[0], "uses only HTTP attributes") {
		t.Fatalf("warnings %v err %v", warnings, err)
	}
}

// TestStoreKeepsLastGoodVersion: an invalid new version of an object is rejected and the
// previous version stays in force, so a bad edit cannot loosen policy.
func TestStoreKeepsLastGoodVersion(t *testing.T) {
	var s Store
	good := load(t, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-legacy, namespace: bookinfo}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}\n")
	if _, err := s.Apply(good...); err != nil {
		t.Fatal(err)
	}
	s.SetWorkloads(&Workload{Namespace: "bookinfo", Name: "reviews", IPs: nil})
	c := from("legacy/sleep", 80)
	if d := s.Snapshot().Workload("bookinfo", "reviews").EvaluateL4(c); d.Allowed() {
		t.Fatalf("good policy not enforced: %v", d)
	}
	// The new version drops the rules: a DENY without rules is invalid.
	bad := Parse("f.yaml", []byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-legacy, namespace: bookinfo}\nspec:\n  action: DENY\n"))
	before := s.Snapshot()
	_, err := s.Apply(bad.Objects...)
	var oe *ObjectError
	if !errors.As(err, &oe) || oe.Key() != good[0].Key() || !errors.Is(err, ErrInvalid) {
		t.Fatalf("Apply(bad) = %v", err)
	}
	if s.Snapshot() != before {
		t.Error("a rejected object must not republish the snapshot")
	}
	if d := s.Snapshot().Workload("bookinfo", "reviews").EvaluateL4(c); d.Allowed() || d.Policy.Name != "deny-legacy" {
		t.Fatalf("previous version not kept: %v", d)
	}
	// A valid object in the same batch still applies.
	okObj := load(t, "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: bookinfo}\nspec: {mtls: {mode: STRICT}}\n")
	if _, err := s.Apply(append(bad.Objects, okObj...)...); err == nil {
		t.Fatal("want error for the bad object")
	}
	if m := s.Snapshot().Workload("bookinfo", "reviews").PeerAuth.Mode; m != ModeStrict {
		t.Errorf("valid object in the batch not applied: mode %v", m)
	}
	s.Delete(good[0].Key())
	if d := s.Snapshot().Workload("bookinfo", "reviews").EvaluateL4(c); !d.Allowed() {
		t.Errorf("after delete: %v", d)
	}
}

func TestStoreZeroValueSnapshot(t *testing.T) {
	var s Store
	if d := s.Snapshot().EvaluateL4(from("a/b", 80)); d.Reason != ReasonUnknownWorkload || d.Allowed() {
		t.Errorf("empty store: %v", d)
	}
}
