package policy

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParseMultiDocumentKindsAndDefaults(t *testing.T) {
	m := Parse("mixed.yaml", []byte(`
apiVersion: v1
kind: Namespace
metadata:
  name: bookinfo
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  creationTimestamp: "2024-01-02T03:04:05Z"
spec:
  mtls: {mode: STRICT}
--- # a comment after the separator
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1
  namespace: bookinfo
  labels: {app: reviews}
spec:
  serviceAccountName: bookinfo-reviews
status:
  podIP: 10.1.2.3
---
apiVersion: v1
kind: List
items:
- apiVersion: security.istio.io/v1beta1
  kind: AuthorizationPolicy
  metadata: {name: deny-all, namespace: bookinfo}
  spec: {}
`))
	if len(m.Errors) != 0 {
		t.Fatal(m.Errors)
	}
	if len(m.Objects) != 2 || len(m.Workloads) != 1 || len(m.Skipped) != 1 {
		t.Fatalf("objects %d workloads %d skipped %v", len(m.Objects), len(m.Workloads), m.Skipped)
	}
	pa := m.Objects[0]
	if pa.Namespace != "default" || pa.PeerAuthentication.GetMtls().GetMode() != ModeStrict {
		t.Errorf("namespace defaults to default, mode STRICT: got %s %v", pa.Namespace, pa.PeerAuthentication)
	}
	if !pa.Created.Equal(time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)) || pa.Source != "mixed.yaml:7" {
		t.Errorf("created %v source %s", pa.Created, pa.Source)
	}
	w := m.Workloads[0]
	if w.ServiceAccount != "bookinfo-reviews" || w.Labels["app"] != "reviews" || len(w.IPs) != 1 || w.IPs[0].String() != "10.1.2.3" {
		t.Errorf("pod workload %+v", w)
	}
	if !strings.Contains(m.Skipped[0], "Namespace") {
		t.Errorf("skipped %v", m.Skipped)
	}
}

func TestParsePortLevelMtlsAndIstioDocFields(t *testing.T) {
	objs := load(t, `
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: p, namespace: foo}
spec:
  selector: {matchLabels: {app: a}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    8080: {mode: STRICT}
    9090: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: foo}
spec:
  rules:
  - from:
    - source: {notRequestPrincipals: ["*"], ipBlocks: ["10.0.0.0/8", "1.2.3.4"]}
    when:
    - key: request.auth.claims[groups]
      values: ["admin"]
    - key: request.headers[X-Token]
      notValues: ["bad"]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: r, namespace: foo}
spec:
  jwtRules:
  - issuer: issuer-1
    jwksUri: https://example.com/jwks
    fromHeaders: [{name: x-jwt-token, prefix: "Value "}]
    fromParams: [token]
    outputClaimToHeaders: [{header: x-jwt-iss, claim: iss}]
    timeout: 3s
`)
	pa := objs[0].PeerAuthentication
	if pa.PortLevelMtls[8080].GetMode() != ModeStrict || pa.PortLevelMtls[9090] == nil {
		t.Errorf("portLevelMtls %v", pa.PortLevelMtls)
	}
	if got := objs[2].RequestAuthentication.JwtRules[0].Timeout.AsDuration(); got != 3*time.Second {
		t.Errorf("timeout %v", got)
	}
}

func TestParseErrors(t *testing.T) {
	const head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\n"
	cases := []struct {
		name, doc string
		sentinel  error
		want      string
	}{
		{"unknown spec field names its path", head + "spec:\n  rules:\n  - from:\n    - source: {principal: [x]}\n", ErrUnknownField,
			`test.yaml:1: AuthorizationPolicy ns/p: spec.rules[0].from[0].source.principal: unknown field "principal"`},
		{"unknown top-level field", head + "spec: {}\nextra: 1\n", ErrUnknownField, `extra: unknown field "extra"`},
		{"misspelt metadata namespace", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespce: x}\nspec: {}\n", ErrUnknownField, `metadata.namespce: unknown field`},
		{"snake_case field name", head + "spec:\n  rules:\n  - from:\n    - source: {not_principals: [x]}\n", ErrUnknownField, `source.not_principals: unknown field`},
		{"unquoted port number", head + "spec:\n  rules:\n  - to:\n    - operation: {ports: [8080]}\n", ErrSyntax, `spec.rules[0].to[0].operation.ports[0]: 8080 must be a string`},
		{"string instead of list", head + "spec:\n  rules:\n  - from:\n    - source: {principals: x}\n", ErrSyntax, `source.principals: must be a list`},
		{"unknown action", head + "spec: {action: BLOCK}\n", ErrInvalid, `spec.action: "BLOCK" must be one of ALLOW, DENY, AUDIT, CUSTOM`},
		{"unknown mode", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {mtls: {mode: strict}}\n", ErrInvalid, `spec.mtls.mode: "strict" must be one of`},
		{"empty from list", head + "spec:\n  rules:\n  - from: []\n", ErrInvalid, `spec.rules[0].from: must not be empty`},
		{"empty portLevelMtls", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {a: b}}\n  portLevelMtls: {}\n", ErrInvalid, `spec.portLevelMtls: must not be empty`},
		{"non-numeric port key", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {a: b}}\n  portLevelMtls: {http: {mode: STRICT}}\n", ErrSyntax, `spec.portLevelMtls[http]: key "http" is not a port number`},
		{"unsupported version", "apiVersion: security.istio.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {}\n", ErrUnsupported, `apiVersion: "security.istio.io/v1alpha1" is not supported`},
		{"unsupported kind", "apiVersion: security.istio.io/v1\nkind: Policy\nmetadata: {name: p}\n", ErrUnsupported, `"Policy" is not a kind`},
		{"missing name", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: x}\n", ErrInvalid, `metadata.name: required`},
		{"bad timestamp", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, creationTimestamp: yesterday}\n", ErrSyntax, `metadata.creationTimestamp: yesterday is not an RFC 3339 time`},
		{"yaml syntax", "apiVersion: [\n", ErrSyntax, `test.yaml:1: yaml:`},
		{"duplicate key", head + "spec: {}\nspec: {}\n", ErrSyntax, `yaml:`},
		{"bad duration", "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r}\nspec:\n  jwtRules: [{issuer: i, timeout: 5}]\n", ErrSyntax, `spec.jwtRules[0].timeout: 5 must be a duration string`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := Parse("test.yaml", []byte(tc.doc))
			if len(m.Errors) != 1 || len(m.Objects) != 0 {
				t.Fatalf("errors %v objects %d", m.Errors, len(m.Objects))
			}
			err := m.Errors[0]
			if !errors.Is(err, tc.sentinel) {
				t.Errorf("%v is not %v", err, tc.sentinel)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q\nwant it to contain %q", err, tc.want)
			}
		})
	}
}

// TestParseBadObjectRejectedAlone: one bad document does not stop the others.
func TestParseBadObjectRejectedAlone(t *testing.T) {
	m := Parse("f.yaml", []byte(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: good1, namespace: a}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: bad, namespace: a}
spec: {mtls: {mode: STRICT}, bogus: true}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: good2, namespace: a}
`))
	if len(m.Objects) != 2 || len(m.Errors) != 1 || !strings.HasPrefix(m.Errors[0].Error(), "f.yaml:6: PeerAuthentication a/bad: spec.bogus") {
		t.Fatalf("objects %d errors %v", len(m.Objects), m.Errors)
	}
}
