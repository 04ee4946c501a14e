package identity

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
)

// syncBuffer is a bytes.Buffer safe for the server's goroutines to log into.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

var testTokens = map[string]string{
	"node-1": "node-1-bootstrap-token-0123456789",
	"node-2": "node-2-bootstrap-token-0123456789",
}

type testCA struct {
	ca   *CA
	addr string
	logs *syncBuffer
}

// startCA serves a CA over gRPC with TLS on loopback. Pods: bookinfo/reviews on node-1,
// bookinfo/ratings on node-2.
func startCA(t testing.TB, ca *CA) *testCA {
	t.Helper()
	if ca == nil {
		var err error
		if ca, err = NewSelfSignedCA(CAOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	auth, err := NewNodeTokens(testTokens)
	if err != nil {
		t.Fatal(err)
	}
	place := Placement{}
	place.Add("node-1", mustID(t, "bookinfo", "reviews"))
	place.Add("node-2", mustID(t, "bookinfo", "ratings"))
	serving, err := ca.ServingCertificate([]string{"veil-ca.test"}, []net.IP{net.IPv4(127, 0, 0, 1)}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{serving}})))
	(&Server{CA: ca, Auth: auth, Workloads: place, Log: slog.New(slog.NewJSONHandler(logs, nil))}).Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = g.Serve(lis) }()
	t.Cleanup(func() { g.Stop(); <-done })
	return &testCA{ca: ca, addr: lis.Addr().String(), logs: logs}
}

func (c *testCA) client(t testing.TB, token string) *Client {
	t.Helper()
	conn, err := DialCA(c.addr, "veil-ca.test", c.ca.Roots(), token)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return NewClient(conn)
}

func TestCAServiceIssuesToTheNodeOfThePod(t *testing.T) {
	srv := startCA(t, nil)
	id := mustID(t, "bookinfo", "reviews")
	key, csr, err := NewCSR(id)
	if err != nil {
		t.Fatal(err)
	}
	iss, err := srv.client(t, testTokens["node-1"]).Issue(context.Background(), id, csr, key, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if iss.ID != id || !iss.Roots[0].Equal(srv.ca.Roots()[0]) {
		t.Fatalf("issued %v with roots %v", iss.ID, iss.Roots)
	}
	if life := iss.Leaf().NotAfter.Sub(iss.Leaf().NotBefore); life != time.Hour+Backdate {
		t.Fatalf("lifetime %v, want the requested hour (plus backdating)", life)
	}
}

func TestCAServiceRefuses(t *testing.T) {
	srv := startCA(t, nil)
	reviews := mustID(t, "bookinfo", "reviews")
	ratings := mustID(t, "bookinfo", "ratings")
	good := func() string {
		_, csr, err := NewCSR(reviews)
		if err != nil {
			t.Fatal(err)
		}
		return string(csr)
	}
	meta := func(imp string) *structpb.Struct {
		s, _ := structpb.NewStruct(map[string]any{ImpersonatedIdentityKey: imp})
		return s
	}
	tests := []struct {
		name     string
		token    string
		req      *pb.IstioCertificateRequest
		code     codes.Code
		wantLogs []string
	}{
		{
			name:     "wrong bootstrap credential",
			token:    "not-a-token-of-any-node-000",
			req:      &pb.IstioCertificateRequest{Csr: good()},
			code:     codes.Unauthenticated,
			wantLogs: []string{"unauthenticated"},
		},
		{
			name:     "pod on another node",
			token:    testTokens["node-2"],
			req:      &pb.IstioCertificateRequest{Csr: good()},
			code:     codes.PermissionDenied,
			wantLogs: []string{`"node":"node-2"`, reviews.String()},
		},
		{
			name:     "identity of no pod at all",
			token:    testTokens["node-1"],
			req:      &pb.IstioCertificateRequest{Csr: csrFor(t, "spiffe://cluster.local/ns/kube-system/sa/admin")},
			code:     codes.PermissionDenied,
			wantLogs: []string{`"node":"node-1"`, "kube-system"},
		},
		{
			name:     "malformed CSR",
			token:    testTokens["node-1"],
			req:      &pb.IstioCertificateRequest{Csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"},
			code:     codes.InvalidArgument,
			wantLogs: []string{`"node":"node-1"`, "invalid CSR"},
		},
		{
			name:  "CSR with a DNS SAN",
			token: testTokens["node-1"],
			req: &pb.IstioCertificateRequest{Csr: string(csrPEM(t, &x509.CertificateRequest{
				URIs: uris(t, reviews.String()), DNSNames: []string{"reviews"},
			}, mustKey(t)))},
			code: codes.InvalidArgument,
		},
		{
			name:     "impersonated identity differs from the CSR",
			token:    testTokens["node-1"],
			req:      &pb.IstioCertificateRequest{Csr: good(), Metadata: meta(ratings.String())},
			code:     codes.InvalidArgument,
			wantLogs: []string{ratings.String()},
		},
		{
			name:  "negative validity",
			token: testTokens["node-1"],
			req:   &pb.IstioCertificateRequest{Csr: good(), ValidityDuration: -5},
			code:  codes.InvalidArgument,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := srv.client(t, tc.token).rpc.CreateCertificate(context.Background(), tc.req)
			if got := status.Code(err); got != tc.code {
				t.Fatalf("code %v (%v), want %v", got, err, tc.code)
			}
			logs := srv.logs.String()
			for _, w := range tc.wantLogs {
				if !strings.Contains(logs, w) {
					t.Errorf("refusal log lacks %q:\n%s", w, logs)
				}
			}
		})
	}
}

func TestCAServiceWithImpersonationMetadataAsZtunnelSends(t *testing.T) {
	srv := startCA(t, nil)
	id := mustID(t, "bookinfo", "ratings")
	_, csr, err := NewCSR(id)
	if err != nil {
		t.Fatal(err)
	}
	md, _ := structpb.NewStruct(map[string]any{ImpersonatedIdentityKey: id.String()})
	resp, err := srv.client(t, testTokens["node-2"]).rpc.CreateCertificate(context.Background(),
		&pb.IstioCertificateRequest{Csr: string(csr), ValidityDuration: 3600, Metadata: md})
	if err != nil {
		t.Fatal(err)
	}
	// Istio's layout: leaf first, the trust bundle last.
	if n := len(resp.CertChain); n != 2 {
		t.Fatalf("%d cert_chain elements, want leaf + root", n)
	}
	if resp.CertChain[1] != string(srv.ca.RootsPEM()) {
		t.Fatal("last cert_chain element is not root-cert.pem")
	}
}

func TestNodeTokensRejectsWeakOrSharedTokens(t *testing.T) {
	if _, err := NewNodeTokens(map[string]string{"n": "short"}); err == nil {
		t.Error("accepted a 5-byte token")
	}
	if _, err := NewNodeTokens(map[string]string{"a": "same-token-0123456789", "b": "same-token-0123456789"}); err == nil {
		t.Error("accepted two nodes with one token")
	}
}

func csrFor(t testing.TB, uri string) string {
	return string(csrPEM(t, &x509.CertificateRequest{URIs: uris(t, uri)}, mustKey(t)))
}
