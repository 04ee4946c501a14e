package controller

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/api"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/internal/kubetest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Node authorization as istiod does it, against a real API server: the projected token
// of node-1's agent (audience istio-ca, bound to its pod) obtains node-1's identities and
// is refused node-2's; a workload's token obtains only its own identity; a token for
// another audience, or not bound to a pod, is refused; a workload cannot subscribe.
func TestTokenReviewNodeAuthorization(t *testing.T) {
	kc := kubetest.Start(t)
	cs := kubernetes.NewForConfigOrDie(kc.Config)
	ctx := context.Background()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	pods := map[string]*corev1.Pod{}
	mkPod := func(ns, sa, name, node string) {
		t.Helper()
		for _, err := range []error{
			ignoreExists(cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})),
			ignoreExists(cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})),
		} {
			if err != nil {
				t.Fatal(err)
			}
		}
		p, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa, Containers: []corev1.Container{{Name: "c", Image: "none"}}}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pods[ns+"/"+name] = p
	}
	mkPod("veil-system", "veil-agent", "agent-node-1", "node-1")
	mkPod("veil-system", "veil-agent", "agent-node-2", "node-2")
	mkPod("bookinfo", "reviews", "reviews-1", "node-1")
	mkPod("bookinfo", "ratings", "ratings-1", "node-2")
	token := func(ns, sa, pod, aud string) string {
		t.Helper()
		req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{Audiences: []string{aud}}}
		if pod != "" {
			p := pods[ns+"/"+pod]
			req.Spec.BoundObjectRef = &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID}
		}
		tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return tr.Status.Token
	}
	ca, err := identity.NewSelfSignedCA(identity.CAOptions{TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	st := &cluster.State{Pods: []*cluster.Pod{
		{Namespace: "bookinfo", Name: "reviews-1", ServiceAccount: "reviews", Node: "node-1", IPs: []netip.Addr{netip.MustParseAddr("10.1.1.10")}},
		{Namespace: "bookinfo", Name: "ratings-1", ServiceAccount: "ratings", Node: "node-2", IPs: []netip.Addr{netip.MustParseAddr("10.1.2.10")}},
	}}
	placement := &LivePlacement{}
	placement.Update(td, st.Pods)
	auth := &TokenReview{Client: cs, AgentServiceAccount: "veil-system/veil-agent", TrustDomain: td}
	srv := &identity.Server{CA: ca, Auth: auth, Workloads: placement}
	reviews := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/reviews")
	ratings := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/ratings")
	ask := func(tok string, id spiffeid.ID) error {
		_, csr, err := identity.NewCSR(id)
		if err != nil {
			t.Fatal(err)
		}
		ctx := metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer "+tok))
		_, err = srv.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: string(csr), ValidityDuration: 3600})
		return err
	}
	agent1 := token("veil-system", "veil-agent", "agent-node-1", "istio-ca")
	for _, tc := range []struct {
		name string
		tok  string
		id   spiffeid.ID
		want codes.Code
		msg  string
	}{
		{"node-1's agent, a pod of node-1", agent1, reviews, codes.OK, ""},
		{"node-1's agent, a pod of node-2", agent1, ratings, codes.PermissionDenied, `node "node-1" runs no pod`},
		{"node-2's agent, a pod of node-2", token("veil-system", "veil-agent", "agent-node-2", "istio-ca"), ratings, codes.OK, ""},
		{"a workload, its own identity", token("bookinfo", "reviews", "reviews-1", "istio-ca"), reviews, codes.OK, ""},
		{"a workload, another identity", token("bookinfo", "reviews", "reviews-1", "istio-ca"), ratings, codes.PermissionDenied, "may obtain only its own identity"},
		{"another audience", token("veil-system", "veil-agent", "agent-node-1", "kubernetes.default.svc"), reviews, codes.Unauthenticated, ""},
		{"a token bound to no pod", token("veil-system", "veil-agent", "", "istio-ca"), reviews, codes.Unauthenticated, "not bound to a pod"},
		{"garbage", "not-a-token", reviews, codes.Unauthenticated, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := ask(tc.tok, tc.id)
			if got := status.Code(err); got != tc.want || tc.msg != "" && !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("CreateCertificate: %v; want %v %q", err, tc.want, tc.msg)
			}
		})
	}
	t.Run("a workload cannot subscribe to the config", func(t *testing.T) {
		c, err := auth.Authenticate(metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer "+token("bookinfo", "reviews", "reviews-1", "istio-ca"))))
		if err != nil || c.Workload != reviews || c.Node != "node-1" {
			t.Fatalf("caller %+v, %v", c, err)
		}
	})
}

func ignoreExists[T any](_ T, err error) error {
	if err != nil && strings.Contains(err.Error(), "already exists") {
		return nil
	}
	return err
}

type workloadAuth struct{ id spiffeid.ID }

func (w workloadAuth) Authenticate(context.Context) (identity.Caller, error) {
	return identity.Caller{Node: "node-1", Workload: w.id, Name: "pod bookinfo/reviews-1"}, nil
}

// onlyContext is a Subscribe stream of which the refusal reads nothing but the context.
type onlyContext struct {
	api.ConfigService_SubscribeServer
	ctx context.Context
}

func (o onlyContext) Context() context.Context { return o.ctx }

// Only node agents subscribe: a workload's credential is refused before anything is sent.
func TestWorkloadCannotSubscribe(t *testing.T) {
	s := &ConfigServer{Auth: workloadAuth{spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/reviews")}}
	defer s.Close()
	err := s.Subscribe(onlyContext{ctx: context.Background()})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "not a node agent") {
		t.Fatalf("Subscribe: %v; want PermissionDenied", err)
	}
}
