package interop

import (
	"context"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/controller"
	"github.com/veilmesh/veil/identity"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/credentialfetcher/plugin"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	pkiutil "istio.io/istio/security/pkg/pki/util"
)

const (
	node1Token = "node-1-bootstrap-token-0123456789"
	node2Token = "node-2-bootstrap-token-9876543210"
)

const (
	productpage = "spiffe://cluster.local/ns/bookinfo/sa/productpage" // on node-1
	ratings     = "spiffe://cluster.local/ns/bookinfo/sa/ratings"     // on node-2
)

// vca is veil's CA server as veil-controller runs it (controller.CAServer: Istio's
// IstioCertificateService over TLS, node bootstrap tokens, node placement), on loopback.
type vca struct {
	port     string
	rootFile string // the trust bundle, as veil-controller writes root-cert.pem
	rootPEM  []byte
}

// startCA serves a fresh CA on 127.0.0.1 with serving certificate names serverNames
// (veil-controller's --server-name) and the listener's IP. node-1 runs productpage,
// node-2 runs ratings.
func startCA(t *testing.T, serverNames ...string) *vca {
	t.Helper()
	ca, err := identity.NewSelfSignedCA(identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	auth, err := identity.NewNodeTokens(map[string]string{"node-1": node1Token, "node-2": node2Token})
	if err != nil {
		t.Fatal(err)
	}
	pl := identity.Placement{}
	pl.Add("node-1", spiffeid.RequireFromString(productpage))
	pl.Add("node-2", spiffeid.RequireFromString(ratings))

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := &controller.CAServer{CA: ca, Auth: auth, Workloads: pl, ServerNames: serverNames, Log: testLogger(t)}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("CAServer.Serve: %v", err)
		}
	})

	v := &vca{port: strconv.Itoa(lis.Addr().(*net.TCPAddr).Port), rootPEM: ca.RootsPEM()}
	v.rootFile = filepath.Join(t.TempDir(), identity.RootCertFile)
	if err := os.WriteFile(v.rootFile, v.rootPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	return v
}

// istioClient is Istio's CA client as istio-agent builds it: endpoint is CA_ADDR (or,
// when that is unset, the discovery address), san is ISTIOD_SAN (which istio-agent
// applies only when CA_ADDR is unset), the trust bundle is the CA's root-cert.pem, and
// Istio's token credential fetcher reads the token from a file: here the node's
// bootstrap token, where istio-agent reads its service account token.
func istioClient(t *testing.T, v *vca, endpoint, san, token string) *citadel.CitadelClient {
	t.Helper()
	tokenFile := filepath.Join(t.TempDir(), "istio-token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := citadel.NewCitadelClient(&security.Options{
		CAEndpoint:    endpoint,
		CAEndpointSAN: san,
		ClusterID:     "Kubernetes",
		CredFetcher:   plugin.CreateTokenPlugin(tokenFile),
	}, &citadel.TLSOptions{RootCert: v.rootFile})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// csr makes a key and CSR for id as istio-agent's secret cache does
// (pkiutil.GenCSR): ECDSA P-256 when ECC_SIGNATURE_ALGORITHM=ECDSA, RSA 2048 by default.
func csr(t *testing.T, id string, ecdsa bool) (csrPEM, keyPEM []byte) {
	t.Helper()
	opts := pkiutil.CertOptions{Host: id, RSAKeySize: 2048}
	if ecdsa {
		opts.ECSigAlg = pkiutil.EcdsaSigAlg
	}
	csrPEM, keyPEM, err := pkiutil.GenCSR(opts)
	if err != nil {
		t.Fatal(err)
	}
	return csrPEM, keyPEM
}

// sign asks for a one-hour certificate, bounding the call: Istio's client has no
// deadline of its own.
func sign(t *testing.T, c *citadel.CitadelClient, csrPEM []byte) ([]string, error) {
	t.Helper()
	type result struct {
		chain []string
		err   error
	}
	ch := make(chan result, 1)
	go func() {
		chain, err := c.CSRSign(csrPEM, 3600)
		ch <- result{chain, err}
	}()
	select {
	case r := <-ch:
		return r.chain, r.err
	case <-time.After(30 * time.Second):
		t.Fatal("CSRSign did not return in 30s")
		return nil, nil
	}
}

// checkIssued verifies a CSRSign answer as istio-agent uses it: the last element is the
// root bundle, the rest the chain of a certificate for id with the CSR's key, with the
// fields Istio's CA gives a workload certificate (not a CA; serverAuth and clientAuth;
// no subject), but for key encipherment, which veil allows only RSA keys.
func checkIssued(t *testing.T, v *vca, chain []string, keyPEM []byte, id string, ecdsa bool) {
	t.Helper()
	if len(chain) < 2 {
		t.Fatalf("got %d PEM elements, want the leaf (and intermediates) then the root bundle", len(chain))
	}
	root := chain[len(chain)-1]
	if root != string(v.rootPEM) {
		t.Errorf("last element is not the CA's root-cert.pem:\n%s", root)
	}
	certs := strings.Join(chain[:len(chain)-1], "")
	want := &pkiutil.VerifyFields{
		Host:        id,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
	}
	if ecdsa {
		want.KeyUsage = x509.KeyUsageDigitalSignature
	}
	if err := pkiutil.VerifyCertificate(keyPEM, []byte(certs), []byte(root), want); err != nil {
		t.Fatalf("Istio's VerifyCertificate: %v", err)
	}
	leaf, err := pkiutil.ParsePemEncodedCertificate([]byte(certs))
	if err != nil {
		t.Fatal(err)
	}
	if left := time.Until(leaf.NotAfter); left < 55*time.Minute || left > 61*time.Minute {
		t.Errorf("certificate expires in %v, want the hour asked for", left)
	}
}

// TestIstioCAClientToVeilCA: Istio's CA client (istio-agent's citadel provider) against
// veil's CA server.
func TestIstioCAClientToVeilCA(t *testing.T) {
	// veil-controller --server-name istiod.istio-system.svc: the name Istio's client
	// checks when CA_ADDR names localhost.
	v := startCA(t, "istiod.istio-system.svc")
	localhost := "localhost:" + v.port

	for _, tc := range []struct {
		name  string
		ecdsa bool
	}{
		{"ECDSA CSR signed", true},
		{"RSA CSR signed", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := istioClient(t, v, localhost, "", node1Token)
			csrPEM, keyPEM := csr(t, productpage, tc.ecdsa)
			chain, err := sign(t, c, csrPEM)
			if err != nil {
				t.Fatalf("CSRSign: %v", err)
			}
			checkIssued(t, v, chain, keyPEM, productpage, tc.ecdsa)
		})
	}

	// Istio's client formats the gRPC error with %v: the status code survives only in
	// the text, "rpc error: code = ...".
	for _, tc := range []struct {
		name, token, id, code string
	}{
		{"wrong token", "not-a-token-of-any-node-000", productpage, "Unauthenticated"},
		{"no token", "", productpage, "Unauthenticated"},
		{"identity of a pod on another node", node1Token, ratings, "PermissionDenied"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := istioClient(t, v, localhost, "", tc.token)
			csrPEM, _ := csr(t, tc.id, true)
			chain, err := sign(t, c, csrPEM)
			if err == nil {
				t.Fatalf("CSRSign signed %d elements, want %s", len(chain), tc.code)
			}
			if !strings.Contains(err.Error(), "code = "+tc.code+" ") {
				t.Fatalf("CSRSign: %v; want code %s", err, tc.code)
			}
		})
	}
}

// TestIstioCAClientServerName: which name Istio's client checks in veil-controller's
// serving certificate, for each way of pointing it at the CA.
func TestIstioCAClientServerName(t *testing.T) {
	defaults := []string{"veil-controller", "localhost"} // veil-controller's default --server-name
	for _, tc := range []struct {
		name        string
		serverNames []string
		host, san   string // CA_ADDR's host, ISTIOD_SAN
		wantErr     string
	}{
		// A CA_ADDR naming localhost makes Istio's client check istiod.istio-system.svc.
		{name: "localhost, --server-name istiod.istio-system.svc", serverNames: []string{"istiod.istio-system.svc"}, host: "localhost"},
		{name: "localhost, default names", serverNames: defaults, host: "localhost", wantErr: "istiod.istio-system.svc"},
		// An IP address is checked against the IP SAN: the listener's address when
		// --listen gives one.
		{name: "listener IP, default names", serverNames: defaults, host: "127.0.0.1"},
		// ISTIOD_SAN (CA_ADDR unset, the discovery address used) overrides both.
		{name: "ISTIOD_SAN=veil-controller, default names", serverNames: defaults, host: "localhost", san: "veil-controller"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := startCA(t, tc.serverNames...)
			c := istioClient(t, v, net.JoinHostPort(tc.host, v.port), tc.san, node1Token)
			csrPEM, keyPEM := csr(t, productpage, true)
			chain, err := sign(t, c, csrPEM)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("CSRSign: %v", err)
			case tc.wantErr == "":
				checkIssued(t, v, chain, keyPEM, productpage, true)
			case err == nil:
				t.Fatalf("CSRSign succeeded; want a TLS failure naming %s", tc.wantErr)
			case !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "code = Unavailable"):
				t.Fatalf("CSRSign: %v; want Unavailable naming %s", err, tc.wantErr)
			}
		})
	}
}
