package policy

import (
	"os"
	"path/filepath"
	"testing"
)

// TestExamplesParseVerbatim: every shared example parses and validates without error.
func TestExamplesParseVerbatim(t *testing.T) {
	files, _ := filepath.Glob("testdata/*.yaml")
	if len(files) < 10 {
		t.Fatalf("want the shared examples in testdata, found %d files", len(files))
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		m := Parse(f, data)
		if len(m.Errors) > 0 || len(m.Objects) == 0 {
			t.Errorf("%s: errors %v, %d objects", f, m.Errors, len(m.Objects))
		}
		for _, o := range m.Objects {
			if _, err := Validate(o, Options{}); err != nil {
				t.Errorf("%s: %v", f, err)
			}
		}
	}
}

type exampleCase struct {
	name   string
	to     *Workload
	peer   string // "" plaintext, "ns/sa"
	port   uint16
	method string // "" for an L4 check
	path   string
	want   string
}

func runExample(t *testing.T, file string, cases []exampleCase) {
	t.Helper()
	objs := loadFile(t, file)
	s := Compile(objs, nil, Options{})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cw := s.Compile(tc.to)
			var d Decision
			if tc.method == "" {
				d = cw.EvaluateL4(from(tc.peer, tc.port))
			} else {
				d = cw.EvaluateHTTP(httpReq(tc.peer, tc.port, tc.method, tc.path))
			}
			if got := decisionOf(d); got != tc.want {
				t.Errorf("got %q (%v), want %q", got, d, tc.want)
			}
		})
	}
}

func TestExampleDenyExternal(t *testing.T) {
	reviews := wl("bookinfo/reviews", "app=reviews")
	runExample(t, "authz-deny-external.yaml", []exampleCase{
		{"external namespace denied at L4", reviews, "external/client", 9080, "", "", "deny by bookinfo/deny-external"},
		{"legacy namespace denied at L4", reviews, "legacy/sleep", 9080, "", "", "deny by bookinfo/deny-external"},
		{"legacy namespace denied at L7", reviews, "legacy/sleep", 9080, "GET", "/", "deny by bookinfo/deny-external"},
		{"bookinfo namespace allowed", reviews, "bookinfo/productpage", 9080, "", "", "allow"},
		{"plaintext not in the listed namespaces is allowed", reviews, "", 9080, "", "", "allow"},
		{"other workloads unaffected", wl("bookinfo/ratings", "app=ratings"), "legacy/sleep", 9080, "", "", "allow"},
	})
}

func TestExampleRatingsCombined(t *testing.T) {
	ratings := wl("bookinfo/ratings", "app=ratings")
	runExample(t, "authz-ratings-combined.yaml", []exampleCase{
		{"reviews may GET /ratings/*", ratings, "bookinfo/reviews", 9080, "GET", "/ratings/0", "allow by bookinfo/ratings-policy"},
		{"reviews may not POST", ratings, "bookinfo/reviews", 9080, "POST", "/ratings/0", "deny: not allowed"},
		{"reviews may not GET other paths", ratings, "bookinfo/reviews", 9080, "GET", "/admin", "deny: not allowed"},
		{"admin may DELETE anything", ratings, "bookinfo/admin", 9080, "DELETE", "/x", "allow by bookinfo/ratings-policy"},
		{"admin may not PATCH", ratings, "bookinfo/admin", 9080, "PATCH", "/x", "deny: not allowed"},
		{"others denied", ratings, "bookinfo/productpage", 9080, "GET", "/ratings/0", "deny: not allowed"},
		{"L4: method rules dropped, even admin denied", ratings, "bookinfo/admin", 9080, "", "", "deny: not allowed"},
	})
}

func TestExampleReviewsAllowFrontend(t *testing.T) {
	reviews := wl("bookinfo/reviews", "app=reviews")
	runExample(t, "authz-reviews-allow-frontend.yaml", []exampleCase{
		{"frontend GET /reviews/1 allowed at L7", reviews, "bookinfo/frontend", 9080, "GET", "/reviews/1", "allow by bookinfo/reviews-allow"},
		{"frontend POST denied at L7", reviews, "bookinfo/frontend", 9080, "POST", "/reviews/1", "deny: not allowed"},
		{"frontend denied at L4 (ALLOW rule dropped)", reviews, "bookinfo/frontend", 9080, "", "", "deny: not allowed"},
		{"other workloads unaffected", wl("bookinfo/ratings", "app=ratings"), "bookinfo/x", 9080, "", "", "allow"},
	})
}

func TestExampleServiceAccountGet(t *testing.T) {
	a := wl("istio-servicea/service-a", "app=service-a")
	other := wl("istio-servicea/other", "app=other")
	runExample(t, "authz-service-account-get.yaml", []exampleCase{
		{"auth-test-sa GET allowed", a, "istio-serviceb/auth-test-sa", 80, "GET", "/", "allow by istio-servicea/service-a-allow"},
		{"auth-test-sa POST denied", a, "istio-serviceb/auth-test-sa", 80, "POST", "/", "deny: not allowed"},
		{"other SA denied", a, "istio-serviceb/other", 80, "GET", "/", "deny: not allowed"},
		{"plaintext to service-a refused (STRICT)", a, "", 80, "", "", "deny by istio-system/istio_converted_static_strict"},
		{"plaintext to other pods allowed (namespace PERMISSIVE)", other, "", 80, "", "", "allow"},
	})
	s := Compile(loadFile(t, "authz-service-account-get.yaml"), nil, Options{})
	if m := s.Compile(a).PeerAuth.Mode; m != ModeStrict {
		t.Errorf("service-a mode %v, want STRICT", m)
	}
	if m := s.Compile(other).PeerAuth.Mode; m != ModePermissive {
		t.Errorf("other mode %v, want PERMISSIVE", m)
	}
}

func TestExampleMeshStrict(t *testing.T) {
	runExample(t, "peer-auth-mesh-strict.yaml", []exampleCase{
		{"plaintext refused in any namespace", wl("bookinfo/reviews", "app=reviews"), "", 9080, "", "", "deny by istio-system/istio_converted_static_strict"},
		{"plaintext refused in another namespace", wl("legacy/sleep"), "", 80, "", "", "deny by istio-system/istio_converted_static_strict"},
		{"mTLS allowed", wl("bookinfo/reviews", "app=reviews"), "bookinfo/productpage", 9080, "", "", "allow"},
	})
}

func TestExampleNamespaceStrict(t *testing.T) {
	reviews := wl("bookinfo/reviews", "app=reviews")
	runExample(t, "peer-auth-namespace-strict.yaml", []exampleCase{
		{"pod outside the mesh calling reviews:9080 refused", reviews, "", 9080, "", "", "deny by istio-system/istio_converted_static_strict"},
		{"bookinfo pod with mTLS allowed", reviews, "bookinfo/productpage", 9080, "", "", "allow"},
		{"legacy namespace still accepts plaintext", wl("legacy/sleep"), "", 80, "", "", "allow"},
	})
}

func TestExampleRatingsPortLevel(t *testing.T) {
	ratings := wl("bookinfo/ratings", "app=ratings")
	runExample(t, "peer-auth-ratings-port-level.yaml", []exampleCase{
		{"plaintext on 9080 refused", ratings, "", 9080, "", "", "deny by bookinfo/converted_peer_authentication_ratings-permissive"},
		{"plaintext on 8080 allowed (DISABLE acts as PERMISSIVE)", ratings, "", 8080, "", "", "allow"},
		{"plaintext on other ports allowed", ratings, "", 9999, "", "", "allow"},
		{"mTLS on 9080 allowed", ratings, "bookinfo/reviews", 9080, "", "", "allow"},
	})
	s := Compile(loadFile(t, "peer-auth-ratings-port-level.yaml"), nil, Options{})
	pa := s.Compile(ratings).PeerAuth
	for _, c := range []struct {
		port            uint32
		mode, ambient   Mode
		plaintextAllows bool
	}{{9080, ModeStrict, ModeStrict, false}, {8080, ModeDisable, ModePermissive, true}, {1234, ModePermissive, ModePermissive, true}} {
		if pa.PortMode(c.port) != c.mode || pa.AmbientMode(c.port) != c.ambient || pa.PlaintextAllowed(c.port) != c.plaintextAllows {
			t.Errorf("port %d: mode %v ambient %v plaintext %v", c.port, pa.PortMode(c.port), pa.AmbientMode(c.port), pa.PlaintextAllowed(c.port))
		}
	}
}

func TestExampleWorkloadStrict(t *testing.T) {
	runExample(t, "peer-auth-workload-strict.yaml", []exampleCase{
		{"reviews refuses plaintext", wl("book-info/reviews", "app=reviews"), "", 9080, "", "", "deny by istio-system/istio_converted_static_strict"},
		{"ratings accepts plaintext", wl("book-info/ratings", "app=ratings"), "", 9080, "", "", "allow"},
		{"reviews in another namespace accepts plaintext", wl("bookinfo/reviews", "app=reviews"), "", 9080, "", "", "allow"},
	})
}

func TestExampleRequestAuthJWT(t *testing.T) {
	objs := loadFile(t, "request-auth-jwt.yaml")
	s := Compile(objs, nil, Options{})
	frontend := s.Compile(wl("bookinfo/frontend", "app=frontend"))
	if len(frontend.RequestAuthentications) != 1 || frontend.RequestAuthentications[0].Name != "jwt-auth" {
		t.Fatalf("RequestAuthentications = %v", frontend.RequestAuthentications)
	}
	r := httpReq("bookinfo/ingress", 8080, "GET", "/")
	if got := decisionOf(frontend.EvaluateHTTP(r)); got != "deny by bookinfo/require-jwt" {
		t.Errorf("no token: %s", got)
	}
	r.JWT = &JWT{Issuer: "https://accounts.google.com", Subject: "user-1"}
	if got := decisionOf(frontend.EvaluateHTTP(r)); got != "allow" {
		t.Errorf("valid token: %s", got)
	}
	// ztunnel: DENY {notRequestPrincipals} has no L4 part, so it has no effect at L4.
	if got := decisionOf(frontend.EvaluateL4(from("bookinfo/ingress", 8080))); got != "allow" {
		t.Errorf("L4: %s", got)
	}
}

func TestExampleZeroTrust(t *testing.T) {
	reviews := wl("bookinfo/reviews", "app=reviews")
	ratings := wl("bookinfo/ratings", "app=ratings")
	runExample(t, "zero-trust.yaml", []exampleCase{
		{"frontend to reviews GET allowed", reviews, "bookinfo/frontend", 9080, "GET", "/", "allow by bookinfo/allow-frontend-to-reviews"},
		{"frontend to ratings GET denied", ratings, "bookinfo/frontend", 9080, "GET", "/", "deny: not allowed"},
		{"reviews to ratings GET allowed", ratings, "bookinfo/reviews", 9080, "GET", "/", "allow by bookinfo/allow-reviews-to-ratings"},
		{"frontend to reviews at L4 denied (GET rule dropped)", reviews, "bookinfo/frontend", 9080, "", "", "deny: not allowed"},
		{"any other workload denied (deny-all)", wl("bookinfo/details", "app=details"), "bookinfo/frontend", 9080, "GET", "/", "deny: not allowed"},
	})
}
