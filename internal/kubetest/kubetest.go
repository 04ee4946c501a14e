// Package kubetest runs a real Kubernetes API server for tests (internal/kube): etcd and
// a kube-apiserver on loopback ports of their own, with data in the test's temporary
// directory, stopped when the test ends. There is no kubelet and no controller manager:
// tests create Pods and set their node and status themselves.
package kubetest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/veilmesh/veil/internal/kube"
)

// Cluster is a running API server. Its Config reaches it as a cluster admin; its
// Kubeconfig file holds the same, for kubectl.
type Cluster struct {
	*kube.Server
	// AuditLog is the API server's audit log (JSON lines of audit.k8s.io/v1 Events) when
	// Start was given WithAudit.
	AuditLog string
}

// Option changes how Start runs the API server.
type Option func(t testing.TB, o *kube.Options, c *Cluster)

// DefaultAuditPolicy logs every request's metadata: user, verb, resource, namespace,
// name, and the authorization decision (annotation authorization.k8s.io/decision).
const DefaultAuditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
`

// WithAudit makes the API server write an audit log to Cluster.AuditLog
// (--audit-policy-file, --audit-log-path) following policy, an audit.k8s.io/v1 Policy
// in YAML ("" is DefaultAuditPolicy).
func WithAudit(policy string) Option {
	if policy == "" {
		policy = DefaultAuditPolicy
	}
	return func(t testing.TB, o *kube.Options, c *Cluster) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "audit-policy.yaml"), []byte(policy), 0o600); err != nil {
			t.Fatal(err)
		}
		c.AuditLog = filepath.Join(dir, "audit.log")
		o.APIServerArgs = append(o.APIServerArgs, "--audit-policy-file", filepath.Join(dir, "audit-policy.yaml"), "--audit-log-path", c.AuditLog)
	}
}

// Start runs etcd and the API server until the test ends.
func Start(t testing.TB, opts ...Option) *Cluster {
	t.Helper()
	c := &Cluster{}
	var ko kube.Options
	for _, o := range opts {
		o(t, &ko, c)
	}
	s, err := kube.Start(t.TempDir(), ko)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	c.Server = s
	return c
}

// Restart stops the API server and starts it again on the same port and data: watches
// break and informers must relist.
func (c *Cluster) Restart(t testing.TB) {
	t.Helper()
	if err := c.Server.Restart(); err != nil {
		t.Fatal(err)
	}
}

// Kubectl runs kubectl against the cluster and returns its combined output.
func (c *Cluster) Kubectl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := c.Command(args...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// InstallIstioCRDs applies Istio's CRDs from the istio.io/api module go.mod requires
// (kubernetes/customresourcedefinitions.gen.yaml) and waits for the security ones.
func (c *Cluster) InstallIstioCRDs(t testing.TB) {
	t.Helper()
	if err := c.Server.InstallIstioCRDs(); err != nil {
		t.Fatal(err)
	}
}
