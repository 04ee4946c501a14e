package lab

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/internal/cniconf"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// sandbox is a pod's network namespace as the interface plugin leaves it before
// veil-cni runs: a veth into the node, the pod's address, routes.
type sandbox struct {
	ns, node string
	ip       string
}

func (l *Lab) newSandbox(t *testing.T, name, node, ip, hostDev string) *sandbox {
	t.Helper()
	s := &sandbox{ns: "veil-" + l.Spec.Name + "-" + name, node: node, ip: ip}
	nodeNS, gw := l.nodeNS(node), l.Spec.gateway(node).String()
	for _, c := range [][]string{
		{"ip", "netns", "add", s.ns},
		{"ip", "-n", s.ns, "link", "set", "lo", "up"},
		{"ip", "link", "add", hostDev, "netns", nodeNS, "type", "veth", "peer", "name", "eth0", "netns", s.ns},
		{"ip", "-n", s.ns, "addr", "add", ip + "/32", "dev", "eth0"},
		{"ip", "-n", s.ns, "link", "set", "eth0", "up"},
		{"ip", "-n", s.ns, "route", "add", gw, "dev", "eth0"},
		{"ip", "-n", s.ns, "route", "add", "default", "via", gw},
		{"ip", "-n", nodeNS, "addr", "add", gw + "/32", "dev", hostDev},
		{"ip", "-n", nodeNS, "link", "set", hostDev, "up"},
		{"ip", "-n", nodeNS, "route", "add", ip + "/32", "dev", hostDev},
	} {
		if err := sh(c...); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, pid := range netnsPids(s.ns) {
			exec.Command("kill", "-9", pid).Run()
		}
		exec.Command("ip", "netns", "del", s.ns).Run()
	})
	return s
}

// cni runs veil-cni on node as the container runtime does: in the node's namespace,
// the command and the pod in the environment, the chained configuration with the
// interface plugin's result on stdin.
func (l *Lab) cni(command string, s *sandbox, pod *corev1.Pod, kubeconfig, socket string, env ...string) (string, error) {
	conf := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"lab","type":%q,"agentSocket":%q,"kubeconfig":%q,"timeout":"20s",
"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":%q}],"ips":[{"address":"%s/32","interface":0}]}}`,
		cniconf.PluginType, socket, kubeconfig, "/var/run/netns/"+s.ns, s.ip)
	cmd := exec.Command("ip", "netns", "exec", l.nodeNS(s.node), l.bin("veil-cni"))
	cmd.Env = append(os.Environ(), "CNI_COMMAND="+command, "CNI_CONTAINERID=sandbox-"+string(pod.UID),
		"CNI_NETNS=/var/run/netns/"+s.ns, "CNI_IFNAME=eth0", "CNI_PATH="+l.opts.BinDir,
		fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_UID=%s", pod.Namespace, pod.Name, pod.UID))
	cmd.Env = append(cmd.Env, env...) // later entries win
	cmd.Stdin = strings.NewReader(conf)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("veil-cni %s: %v: %s%s", command, err, out.String(), errb.String())
	}
	return out.String(), err
}

// sandboxApp starts the lab's application in a sandbox, on port 9080.
func (l *Lab) sandboxApp(t *testing.T, s *sandbox, name string) {
	t.Helper()
	proc := "app-" + strings.ReplaceAll(name, "/", "-")
	if err := l.start(proc, s.ns, l.bin("veilctl"), "lab", "app", "--name", name, "--listen", ":9080"); err != nil {
		t.Fatal(err)
	}
	err := l.waitFor(context.Background(), "the application of "+name, func(ctx context.Context) error {
		c, err := dialIn(ctx, s.ns, s.ip+":9080")
		if err == nil {
			c.Close()
		}
		return err
	}, proc)
	if err != nil {
		t.Fatal(err)
	}
}

// agentKubeconfig is what the agent writes for veil-cni in a cluster: the API server
// as the agent's service account.
func (l *Lab) agentKubeconfig(t *testing.T) string {
	t.Helper()
	path := l.path("kube", "veil-cni.kubeconfig")
	if err := l.writeKubeconfig(context.Background(), path, "veil-system", "veil-agent"); err != nil {
		t.Fatal(err)
	}
	return path
}

// get makes an HTTP GET from a network namespace.
func get(ctx context.Context, ns, addr string) string {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext:       func(ctx context.Context, _, a string) (net.Conn, error) { return dialIn(ctx, ns, a) },
		DisableKeepAlives: true,
	}}
	resp, err := client.Get("http://" + addr + "/")
	if err != nil {
		return "error: " + err.Error()
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return fmt.Sprint(resp.StatusCode)
}

// TestCNIPlugin invokes veil-cni as a container runtime would, with a real network
// namespace, against a kube lab: a pod of an ambient namespace is in the capture when
// ADD returns, before the controller knows its address (no kubelet ever reports it
// here), so its first connection already goes out over mTLS and plaintext to it is
// refused; a pod outside the mesh passes through without the agent, even with the agent
// down, while a mesh pod's ADD then fails; DEL always succeeds.
func TestCNIPlugin(t *testing.T) {
	l := upLab(t, kubeLab)
	ctx := context.Background()
	l.applyStrict(t)
	l.want(t, "legacy/sleep", "reviews:9080", "reset")

	kubeconfig := l.agentKubeconfig(t)
	socket := l.CNISocket("node-1")
	newPod := func(ns, name string) *corev1.Pod {
		t.Helper()
		cs := l.kube.cs
		if _, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		p, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: corev1.PodSpec{NodeName: "node-1", ServiceAccountName: name,
				Containers: []corev1.Container{{Name: "app", Image: "lab"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}

	t.Run("a mesh pod is captured from its first packet", func(t *testing.T) {
		pod := newPod("bookinfo", "cni-new")
		s := l.newSandbox(t, "cni-new", "node-1", "10.100.1.50", "vc0")
		out, err := l.cni("ADD", s, pod, kubeconfig, socket)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "10.100.1.50/32") {
			t.Fatalf("ADD did not print the previous result: %s", out)
		}
		// The runtime starts the containers after ADD.
		l.sandboxApp(t, s, "bookinfo/cni-new")
		// reviews is STRICT: only mTLS gets a 200, so the pod's connection was captured
		// and carried with its identity.
		if got := get(ctx, s.ns, l.mustTarget(t, "reviews:9080")); got != "200" {
			t.Fatalf("new pod -> reviews (STRICT): %s, want 200 over mTLS", got)
		}
		// Plaintext from outside the mesh to the new pod is refused: it is STRICT too.
		if got := l.Request(ctx, "legacy/sleep", "10.100.1.50:9080").Result; got != "reset" {
			t.Fatalf("legacy/sleep -> new pod: %s, want reset", got)
		}
		if got := l.Request(ctx, "bookinfo/productpage", "10.100.1.50:9080").Result; got != "200" {
			t.Fatalf("productpage -> new pod: %s, want 200", got)
		}
		// All of it before the controller could know the pod's address.
		p, err := l.kube.cs.CoreV1().Pods("bookinfo").Get(ctx, "cni-new", metav1.GetOptions{})
		if err != nil || p.Status.PodIP != "" {
			t.Fatalf("the pod's status: %v %q; want no address reported", err, p.Status.PodIP)
		}
		// A late DEL of an earlier sandbox of the same pod (the kubelet's garbage
		// collection) leaves the running sandbox enrolled.
		record := filepath.Join(l.path("run", "node-1", "cni-pods"), string(pod.UID)+".json")
		if _, err := l.cni("DEL", s, pod, kubeconfig, socket, "CNI_CONTAINERID=an-earlier-sandbox"); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(record); err != nil {
			t.Fatalf("a DEL of another sandbox dropped the running one's record: %v", err)
		}
		if got := l.Request(ctx, "legacy/sleep", "10.100.1.50:9080").Result; got != "reset" {
			t.Fatalf("legacy/sleep -> new pod after another sandbox's DEL: %s, want reset", got)
		}
		if _, err := l.cni("DEL", s, pod, kubeconfig, socket); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(record); !os.IsNotExist(err) {
			t.Fatalf("the agent still holds the pod's record after DEL: %v", err)
		}
	})

	t.Run("outside the mesh: no agent needed; a mesh pod fails while the agent is down", func(t *testing.T) {
		plain := newPod("legacy", "cni-plain")
		meshed := newPod("bookinfo", "cni-later")
		sp := l.newSandbox(t, "cni-plain", "node-1", "10.100.1.51", "vc1")
		sm := l.newSandbox(t, "cni-later", "node-1", "10.100.1.52", "vc2")
		if err := l.StopAgent("node-1"); err != nil {
			t.Fatal(err)
		}
		if out, err := l.cni("ADD", sp, plain, kubeconfig, socket); err != nil || !strings.Contains(out, "10.100.1.51/32") {
			t.Fatalf("ADD of a pod outside the mesh with the agent down: %q, %v; want its result", out, err)
		}
		_, err := l.cni("ADD", sm, meshed, kubeconfig, socket)
		if err == nil || !strings.Contains(err.Error(), "bookinfo/cni-later") || !strings.Contains(err.Error(), "did not enroll") {
			t.Fatalf("ADD of a mesh pod with the agent down: %v; want a failure naming the pod", err)
		}
		if _, err := l.cni("DEL", sm, meshed, kubeconfig, socket); err != nil {
			t.Fatalf("DEL with the agent down: %v; want success", err)
		}
		if err := l.StartAgent(ctx, "node-1"); err != nil {
			t.Fatal(err)
		}
		// The runtime retries the sandbox: now it is enrolled. With an application
		// listening, a reset can only be the agent's refusal.
		if _, err := l.cni("ADD", sm, meshed, kubeconfig, socket); err != nil {
			t.Fatal(err)
		}
		l.sandboxApp(t, sm, "bookinfo/cni-later")
		if got := l.Request(ctx, "legacy/sleep", "10.100.1.52:9080").Result; got != "reset" {
			t.Fatalf("legacy/sleep -> the retried mesh pod: %s, want reset", got)
		}
	})
}
