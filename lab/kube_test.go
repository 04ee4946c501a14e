package lab

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// kubeLab makes upLab's lab a kube lab: its cluster in a real API server, IPv4 only
// (the API server's Service range is).
func kubeLab(s *Spec, o *Options) { o.Kube, s.Family = true, FamilyIPv4 }

// TestKubeLab runs `make demo`'s scenarios on a lab whose controller reads a real
// kube-apiserver (the policies are objects of the API server), shows that node
// authorization there is TokenReview's, and that a policy applied after an API server
// restart reaches the agents (the controller's informers relist).
func TestKubeLab(t *testing.T) {
	l := upLab(t, kubeLab)
	ctx := context.Background()
	step := func(name string, f func(t *testing.T)) {
		if !t.Run(name, f) {
			t.FailNow()
		}
	}

	step("demo scenarios, the policies applied to the API server", func(t *testing.T) {
		var out bytes.Buffer
		mismatches, err := RunDemo(ctx, l, &out)
		t.Log("\n" + out.String())
		if err != nil || mismatches != 0 {
			t.Fatalf("demo: %d mismatches, %v", mismatches, err)
		}
	})

	step("node-1's agent token obtains node-1's identities only (TokenReview)", func(t *testing.T) {
		tok, err := os.ReadFile(l.path("tokens", "node-1"))
		if err != nil {
			t.Fatal(err)
		}
		issue := func(tok, id string) error {
			t.Helper()
			return l.issueFrom(t, "node-1", strings.TrimSpace(tok), spiffeid.RequireFromString(id))
		}
		if err := issue(string(tok), "spiffe://cluster.local/ns/bookinfo/sa/productpage"); err != nil {
			t.Fatalf("node-1's agent, productpage (on node-1): %v", err)
		}
		ratings := "spiffe://cluster.local/ns/bookinfo/sa/ratings"
		err = issue(string(tok), ratings)
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), `node "node-1"`) {
			t.Fatalf("node-1's agent, ratings (only on node-2): %v; want PermissionDenied naming node-1", err)
		}
		// The refusal is logged with the caller (the agent's pod, from the token review),
		// the identity and the node.
		if line := l.logLine(t, "controller", "veil-agent-node-1", ratings); !strings.Contains(line, "node=node-1") {
			t.Fatalf("controller log line of the refusal lacks the node: %s", line)
		}
		// No bootstrap tokens: a token the API server did not issue is refused.
		if err := issue("0123456789abcdef", "spiffe://cluster.local/ns/bookinfo/sa/productpage"); status.Code(err) != codes.Unauthenticated {
			t.Fatalf("a token the API server did not issue: %v; want Unauthenticated", err)
		}
	})

	step("the controller's token is least privilege", func(t *testing.T) {
		cfg, err := clientcmd.BuildConfigFromFlags("", l.controllerKubeconfig())
		if err != nil {
			t.Fatal(err)
		}
		cfg.Dial = l.kube.srv.Config.Dial
		cs := kubernetes.NewForConfigOrDie(cfg)
		if _, err := cs.CoreV1().Pods("bookinfo").List(ctx, metav1.ListOptions{}); err != nil {
			t.Fatalf("the controller cannot list pods: %v", err)
		}
		if _, err := cs.CoreV1().Secrets("bookinfo").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Fatalf("the controller listing secrets in bookinfo: %v; want Forbidden", err)
		}
	})

	step("a policy applied after an API server restart reaches the agents", func(t *testing.T) {
		if err := l.kube.srv.Restart(); err != nil {
			t.Fatal(err)
		}
		// Through the lab as `veilctl lab apply` finds it.
		reopened, err := Open(l.Spec.Name, l.opts)
		if err != nil {
			t.Fatal(err)
		}
		strict, err := demoPolicies.ReadFile("demo/peer-auth-namespace-strict.yaml")
		if err != nil {
			t.Fatal(err)
		}
		if err := reopened.Apply("strict.yaml", strict); err != nil {
			t.Fatal(err)
		}
		key := []string{"PeerAuthentication bookinfo/default"}
		if err := l.WaitObjects(ctx, key, nil); err != nil {
			t.Fatal(err)
		}
		l.want(t, "legacy/sleep", "reviews:9080", "reset")
		l.want(t, "bookinfo/productpage", "reviews:9080", "200")
		if err := reopened.Delete("strict.yaml"); err != nil {
			t.Fatal(err)
		}
		if err := l.WaitObjects(ctx, nil, key); err != nil {
			t.Fatal(err)
		}
		l.want(t, "legacy/sleep", "reviews:9080", "200")
	})
}

// issueFrom asks the controller's CA for a certificate for id from inside node's
// namespace with token, as that node's agent does.
func (l *Lab) issueFrom(t *testing.T, node, token string, id spiffeid.ID) error {
	t.Helper()
	pem, err := os.ReadFile(l.path("ca", identity.RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	roots, err := identity.ParseCertificates(pem)
	if err != nil {
		t.Fatal(err)
	}
	ns := l.nodeNS(node)
	conn, err := identity.DialCA(net.JoinHostPort(ControllerIP().String(), "15012"), "veil-controller", roots, token,
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return dialIn(ctx, ns, addr) }))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	key, csr, err := identity.NewCSR(id)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = identity.NewClient(conn).Issue(ctx, id, csr, key, time.Hour)
	return err
}

// logLine returns the first line of a process's log that holds every one of words.
func (l *Lab) logLine(t *testing.T, proc string, words ...string) string {
	t.Helper()
	b, err := os.ReadFile(l.path("logs", proc+".log"))
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		found := true
		for _, w := range words {
			found = found && strings.Contains(line, w)
		}
		if found {
			return line
		}
	}
	t.Fatalf("no line of %s.log holds %q", proc, words)
	return ""
}
