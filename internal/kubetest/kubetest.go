// Package kubetest runs a real Kubernetes API server for tests: etcd (Debian's
// etcd-server) and a kube-apiserver built from the k8s.io/kubernetes module by
// scripts/kube-build.sh (cached after the first build), on loopback ports of their own,
// with data in the test's temporary directory. There is no kubelet and no controller
// manager: tests create Pods and set their node and status themselves.
package kubetest

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// Cluster is a running API server.
type Cluster struct {
	// Config reaches it as a cluster admin.
	Config *rest.Config
	// Kubeconfig is a file holding the same, for kubectl.
	Kubeconfig string
	// Bin holds kube-apiserver and kubectl.
	Bin string

	dir, token string
	etcdURL    string
	port       int

	mu  sync.Mutex
	api *exec.Cmd
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// bin builds (or finds in the cache) kube-apiserver and kubectl.
func bin(t testing.TB) string {
	buildOnce.Do(func() {
		_, here, _, _ := runtime.Caller(0)
		script := filepath.Join(filepath.Dir(here), "..", "..", "scripts", "kube-build.sh")
		out, err := exec.Command(script).Output()
		if err != nil {
			if ee, ok := err.(*exec.ExitError); ok {
				err = fmt.Errorf("%w: %s", err, ee.Stderr)
			}
			buildErr = fmt.Errorf("kubetest: %s: %w", script, err)
			return
		}
		buildDir = strings.TrimSpace(string(out))
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildDir
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Start runs etcd and the API server until the test ends.
func Start(t testing.TB) *Cluster {
	t.Helper()
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatal("kubetest: etcd not found: install etcd-server (scripts/deps.sh test does)")
	}
	c := &Cluster{Bin: bin(t), dir: t.TempDir()}
	b := make([]byte, 16)
	rand.Read(b)
	c.token = hex.EncodeToString(b)

	clientPort, peerPort := freePort(t), freePort(t)
	c.etcdURL = fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	ecmd := exec.Command(etcd, "--data-dir", filepath.Join(c.dir, "etcd"),
		"--listen-client-urls", c.etcdURL, "--advertise-client-urls", c.etcdURL,
		"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", peerPort),
		"--initial-advertise-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", peerPort),
		"--initial-cluster", fmt.Sprintf("default=http://127.0.0.1:%d", peerPort))
	elog, _ := os.Create(filepath.Join(c.dir, "etcd.log"))
	ecmd.Stdout, ecmd.Stderr = elog, elog
	if err := ecmd.Start(); err != nil {
		t.Fatalf("kubetest: start etcd: %v", err)
	}
	t.Cleanup(func() { ecmd.Process.Kill(); ecmd.Wait(); elog.Close() })

	// Service account signing keys, and the admin's static token.
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	write(t, filepath.Join(c.dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}))
	write(t, filepath.Join(c.dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}))
	write(t, filepath.Join(c.dir, "tokens.csv"), []byte(c.token+",admin,admin-uid,system:masters\n"))

	c.port = freePort(t)
	c.Config = &rest.Config{Host: fmt.Sprintf("https://127.0.0.1:%d", c.port), BearerToken: c.token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}, QPS: 100, Burst: 200}
	c.Kubeconfig = filepath.Join(c.dir, "kubeconfig")
	write(t, c.Kubeconfig, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: %q, insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: %q}}]
contexts: [{name: test, context: {cluster: test, user: admin}}]
current-context: test
`, c.Config.Host, c.token)))
	c.startAPI(t)
	t.Cleanup(c.stopAPI)
	return c
}

func write(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (c *Cluster) startAPI(t testing.TB) {
	t.Helper()
	cmd := exec.Command(filepath.Join(c.Bin, "kube-apiserver"),
		"--etcd-servers", c.etcdURL, "--bind-address", "127.0.0.1", "--secure-port", strconv.Itoa(c.port),
		"--cert-dir", filepath.Join(c.dir, "certs"),
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", filepath.Join(c.dir, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(c.dir, "sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/16", "--authorization-mode", "RBAC",
		"--token-auth-file", filepath.Join(c.dir, "tokens.csv"), "--enable-priority-and-fairness=false")
	log, _ := os.OpenFile(filepath.Join(c.dir, "kube-apiserver.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("kubetest: start kube-apiserver: %v", err)
	}
	go func() { cmd.Wait(); log.Close() }()
	c.mu.Lock()
	c.api = cmd
	c.mu.Unlock()
	if err := c.waitReady(2 * time.Minute); err != nil {
		tail, _ := os.ReadFile(filepath.Join(c.dir, "kube-apiserver.log"))
		if len(tail) > 3000 {
			tail = tail[len(tail)-3000:]
		}
		t.Fatalf("kubetest: kube-apiserver not ready: %v\n%s", err, tail)
	}
}

func (c *Cluster) stopAPI() {
	c.mu.Lock()
	cmd := c.api
	c.api = nil
	c.mu.Unlock()
	if cmd != nil && cmd.Process != nil {
		cmd.Process.Kill()
		for cmd.ProcessState == nil {
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// Restart stops the API server and starts it again on the same port and data: watches
// break and informers must relist.
func (c *Cluster) Restart(t testing.TB) {
	t.Helper()
	c.stopAPI()
	c.startAPI(t)
}

// Stop stops the API server (etcd keeps the data); Restart brings it back.
func (c *Cluster) Stop() { c.stopAPI() }

func (c *Cluster) waitReady(limit time.Duration) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: insecureTLS()}}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	var last error
	for ctx.Err() == nil {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.Config.Host+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+c.token)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("readyz: %s", resp.Status)
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	return last
}

// Run runs kubectl against the cluster and returns its output and error (a command
// that answers through its exit code, as `kubectl auth can-i`).
func (c *Cluster) Run(args ...string) (string, error) {
	out, err := exec.Command(filepath.Join(c.Bin, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...).Output()
	return string(out), err
}

// Kubectl runs kubectl against the cluster and returns its combined output.
func (c *Cluster) Kubectl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(filepath.Join(c.Bin, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// InstallIstioCRDs applies Istio's CRDs from the istio.io/api module go.mod requires
// (kubernetes/customresourcedefinitions.gen.yaml) and waits for the security ones.
func (c *Cluster) InstallIstioCRDs(t testing.TB) {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil || len(strings.TrimSpace(string(out))) == 0 {
		t.Fatalf("kubetest: the istio.io/api module: %v", err)
	}
	c.Kubectl(t, "apply", "--server-side", "-f", filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml"))
	c.Kubectl(t, "wait", "--for", "condition=established", "--timeout", "60s",
		"crd/peerauthentications.security.istio.io", "crd/authorizationpolicies.security.istio.io", "crd/requestauthentications.security.istio.io")
}
