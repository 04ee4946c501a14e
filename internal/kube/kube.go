// Package kube runs a real Kubernetes API server on this machine: etcd (Debian's
// etcd-server) and a kube-apiserver built from the k8s.io/kubernetes module by
// scripts/kube-build.sh (cached after the first build), with their data in a directory
// the caller gives. There is no kubelet and no controller manager: callers create Pods
// and set their node and status themselves. internal/kubetest wraps it for tests; the
// lab (`veilctl lab up --kube`) runs one in its fabric's network namespace.
package kube

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
)

// Options say where the server runs. The zero value: in the caller's network namespace,
// on free loopback ports, as children of the caller.
type Options struct {
	// Netns runs etcd and the API server in this network namespace (a name `ip netns`
	// knows), each in a session of its own so that they outlive the caller: etcd on the
	// namespace's loopback, the API server on Addr, on the standard ports (2379, 2380,
	// 6443; the namespace is the caller's own).
	Netns string
	// Addr is the API server's address. Default 127.0.0.1.
	Addr string
	// Dial reaches the API server from the caller's namespace when it listens in
	// another (Netns). It becomes Config.Dial.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// APIServerArgs are more kube-apiserver flags (e.g. --audit-policy-file and
	// --audit-log-path, as kubetest.WithAudit gives them).
	APIServerArgs []string
}

// Server is a running API server and its etcd.
type Server struct {
	// Config reaches it as a cluster admin.
	Config *rest.Config
	// Kubeconfig is a file holding the same, for kubectl (run it with Command).
	Kubeconfig string
	// Bin holds kube-apiserver and kubectl.
	Bin string

	dir  string
	opts Options
	st   state
	mu   sync.Mutex // serializes stopping and starting the API server
}

// state is what Open needs to find a server Start left running (server.json).
type state struct {
	Host    string `json:"host"`
	Port    int    `json:"port"`
	EtcdURL string `json:"etcdURL"`
	Token   string `json:"token"`
	Bin     string `json:"bin"`
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Binaries builds (or finds in the cache) kube-apiserver and kubectl with
// scripts/kube-build.sh of this source tree, and returns their directory.
func Binaries() (string, error) {
	buildOnce.Do(func() {
		_, here, _, _ := runtime.Caller(0)
		script := filepath.Join(filepath.Dir(here), "..", "..", "scripts", "kube-build.sh")
		cmd := exec.Command(script)
		cmd.Env = append(os.Environ(), "PATH="+os.Getenv("PATH")+":/usr/local/go/bin") // sudo's secure_path drops Go
		out, err := cmd.Output()
		if err != nil {
			if ee, ok := err.(*exec.ExitError); ok {
				err = fmt.Errorf("%w: %s", err, ee.Stderr)
			}
			buildErr = fmt.Errorf("kube: %s (make kube-build): %w", script, err)
			return
		}
		buildDir = strings.TrimSpace(string(out))
	})
	return buildDir, buildErr
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Start runs etcd and the API server with their data, keys, logs and kubeconfig in dir,
// and waits until the API server is ready. Close stops them. If anything fails, what
// was started is stopped.
func Start(dir string, opts Options) (*Server, error) {
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		return nil, errors.New("kube: etcd not found: install etcd-server (scripts/deps.sh test does)")
	}
	bin, err := Binaries()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	s := newServer(dir, opts)
	s.st.Bin = bin
	b := make([]byte, 16)
	rand.Read(b)
	s.st.Token = hex.EncodeToString(b)
	clientPort, peerPort := 2379, 2380
	s.st.Port = 6443
	if opts.Netns == "" {
		for _, p := range []*int{&clientPort, &peerPort, &s.st.Port} {
			if *p, err = freePort(); err != nil {
				return nil, err
			}
		}
	}
	s.st.EtcdURL = fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	s.st.Host = "https://" + net.JoinHostPort(s.addr(), strconv.Itoa(s.st.Port))
	peer := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	if err := s.spawn("etcd", etcd, "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", s.st.EtcdURL, "--advertise-client-urls", s.st.EtcdURL,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "default="+peer); err != nil {
		return nil, err
	}
	if err := s.init(); err != nil {
		return nil, errors.Join(err, s.Close())
	}
	if err := s.startAPI(); err != nil {
		return nil, errors.Join(err, s.Close())
	}
	return s, nil
}

// Open returns the server that Start left running in dir, with the options it was
// started with.
func Open(dir string, opts Options) (*Server, error) {
	b, err := os.ReadFile(filepath.Join(dir, "server.json"))
	if err != nil {
		return nil, fmt.Errorf("kube: no API server in %s: %w", dir, err)
	}
	s := newServer(dir, opts)
	if err := json.Unmarshal(b, &s.st); err != nil {
		return nil, fmt.Errorf("kube: %s: %w", filepath.Join(dir, "server.json"), err)
	}
	s.Bin = s.st.Bin
	s.config()
	return s, nil
}

func newServer(dir string, opts Options) *Server {
	return &Server{dir: dir, opts: opts, Kubeconfig: filepath.Join(dir, "kubeconfig")}
}

func (s *Server) addr() string {
	if s.opts.Addr == "" {
		return "127.0.0.1"
	}
	return s.opts.Addr
}

// config sets Config from the state.
func (s *Server) config() {
	s.Config = &rest.Config{Host: s.st.Host, BearerToken: s.st.Token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}, QPS: 100, Burst: 200, Dial: s.opts.Dial}
}

// init writes the service-account signing keys, the admin's static token, the admin
// kubeconfig and server.json.
func (s *Server) init() error {
	s.Bin = s.st.Bin
	s.config()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	st, err := json.Marshal(s.st)
	if err != nil {
		return err
	}
	files := []struct {
		name string
		data []byte
	}{
		{"sa.key", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})},
		{"sa.pub", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})},
		{"tokens.csv", []byte(s.st.Token + ",admin,admin-uid,system:masters\n")},
		{"kubeconfig", []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: %q, insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: %q}}]
contexts: [{name: test, context: {cluster: test, user: admin}}]
current-context: test
`, s.st.Host, s.st.Token))},
		{"server.json", st},
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(s.dir, f.name), f.data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// spawn starts a program (in Netns when set), logging to name.log, its pid in name.pid.
func (s *Server) spawn(name string, argv ...string) error {
	if s.opts.Netns != "" {
		argv = append([]string{"nsenter", "--net=/run/netns/" + s.opts.Netns, "--"}, argv...)
	}
	log, err := os.OpenFile(filepath.Join(s.dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = log, log
	if s.opts.Netns != "" {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("kube: start %s: %w", name, err)
	}
	go cmd.Wait() // reaped when it ends, so kill sees it gone
	return os.WriteFile(filepath.Join(s.dir, name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600)
}

// kill ends the process recorded in name.pid, if any, and waits until it is gone.
func (s *Server) kill(name string) error {
	pidFile := filepath.Join(s.dir, name+".pid")
	b, err := os.ReadFile(pidFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("kube: %s: %w", pidFile, err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kube: kill %s (pid %d): %w", name, pid, err)
	}
	for deadline := time.Now().Add(10 * time.Second); syscall.Kill(pid, 0) == nil; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			return fmt.Errorf("kube: %s (pid %d) did not exit", name, pid)
		}
	}
	return os.Remove(pidFile)
}

func (s *Server) startAPI() error {
	argv := []string{filepath.Join(s.Bin, "kube-apiserver"),
		"--etcd-servers", s.st.EtcdURL, "--bind-address", s.addr(), "--secure-port", strconv.Itoa(s.st.Port),
		"--cert-dir", filepath.Join(s.dir, "certs"),
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", filepath.Join(s.dir, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(s.dir, "sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/16", "--authorization-mode", "RBAC",
		"--token-auth-file", filepath.Join(s.dir, "tokens.csv"), "--enable-priority-and-fairness=false"}
	err := s.spawn("kube-apiserver", append(argv, s.opts.APIServerArgs...)...)
	if err != nil {
		return err
	}
	if err := s.waitReady(2 * time.Minute); err != nil {
		tail, _ := os.ReadFile(filepath.Join(s.dir, "kube-apiserver.log"))
		if len(tail) > 3000 {
			tail = tail[len(tail)-3000:]
		}
		return fmt.Errorf("kube: kube-apiserver not ready: %v\n%s", err, tail)
	}
	return nil
}

// Stop stops the API server (etcd keeps the data); Restart brings it back.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.kill("kube-apiserver")
}

// Restart stops the API server and starts it again on the same address and data:
// watches break and informers must relist.
func (s *Server) Restart() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.kill("kube-apiserver"); err != nil {
		return err
	}
	return s.startAPI()
}

// Close stops the API server and etcd. The data stays in the directory.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return errors.Join(s.kill("kube-apiserver"), s.kill("etcd"))
}

func (s *Server) waitReady(limit time.Duration) error {
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DialContext: s.opts.Dial}
	defer tr.CloseIdleConnections()
	client := &http.Client{Timeout: 2 * time.Second, Transport: tr}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	var last error
	for ctx.Err() == nil {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.st.Host+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+s.st.Token)
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

// CACert is the file holding the API server's self-signed serving certificate and the
// CA that signed it, for clients that verify it.
func (s *Server) CACert() string { return filepath.Join(s.dir, "certs", "apiserver.crt") }

// Command is kubectl against the server as a cluster admin (in Netns when set).
func (s *Server) Command(args ...string) *exec.Cmd {
	argv := append([]string{filepath.Join(s.Bin, "kubectl"), "--kubeconfig", s.Kubeconfig}, args...)
	if s.opts.Netns != "" {
		argv = append([]string{"nsenter", "--net=/run/netns/" + s.opts.Netns, "--"}, argv...)
	}
	return exec.Command(argv[0], argv[1:]...)
}

// Run runs kubectl against the cluster and returns its output and error (a command
// that answers through its exit code, as `kubectl auth can-i`).
func (s *Server) Run(args ...string) (string, error) {
	out, err := s.Command(args...).Output()
	return string(out), err
}

// InstallIstioCRDs applies Istio's CRDs from the istio.io/api module this program was
// built with (kubernetes/customresourcedefinitions.gen.yaml) and waits for the
// security ones.
func (s *Server) InstallIstioCRDs() error {
	crds, err := IstioCRDs()
	if err != nil {
		return err
	}
	for _, args := range [][]string{
		{"apply", "--server-side", "-f", crds},
		{"wait", "--for", "condition=established", "--timeout", "60s",
			"crd/peerauthentications.security.istio.io", "crd/authorizationpolicies.security.istio.io", "crd/requestauthentications.security.istio.io"},
	} {
		if out, err := s.Command(args...).CombinedOutput(); err != nil {
			return fmt.Errorf("kube: kubectl %s: %w\n%s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// IstioCRDs returns the path of kubernetes/customresourcedefinitions.gen.yaml in the
// istio.io/api module: the version this program was built with (downloaded into the
// module cache if need be), or else the one the module in the working directory requires.
func IstioCRDs() (string, error) {
	goTool := "go"
	if _, err := exec.LookPath(goTool); err != nil {
		goTool = "/usr/local/go/bin/go" // sudo's secure_path drops it
	}
	args := []string{"list", "-m", "-json", "istio.io/api"}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Replace != nil {
				d = d.Replace
			}
			if d.Path == "istio.io/api" && d.Version != "" {
				args = []string{"mod", "download", "-json", "istio.io/api@" + d.Version}
			}
		}
	}
	out, err := exec.Command(goTool, args...).Output()
	var m struct{ Dir string }
	if err == nil {
		err = json.Unmarshal(out, &m)
	}
	if err == nil && m.Dir == "" {
		err = errors.New("no module directory")
	}
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			err = fmt.Errorf("%w: %s", err, ee.Stderr)
		}
		return "", fmt.Errorf("kube: the istio.io/api module (go %s): %w", strings.Join(args, " "), err)
	}
	return filepath.Join(m.Dir, "kubernetes", "customresourcedefinitions.gen.yaml"), nil
}
