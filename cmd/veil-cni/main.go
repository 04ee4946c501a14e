// Command veil-cni is veil's chained CNI plugin. The container runtime runs it after
// the plugin that sets up a pod's interface; for a pod in the mesh (its own or its
// namespace's istio.io/dataplane-mode=ambient label, as the API server has them at that
// moment) it hands the pod's network namespace to the node's agent and returns only
// once the agent has the pod in its capture, so the pod never sends or receives a byte
// outside the mesh. When the agent cannot enroll the pod the runtime gets an error: the
// sandbox fails and is retried. Pods outside the mesh pass straight through, without
// the agent, so they start even before it runs (CoreDNS, veil-controller itself).
//
// The agent installs the plugin and its configuration (veil-agent --cni-conf-dir); see
// the README, "Install on a cluster".
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/veilmesh/veil/internal/cluster"
	"github.com/veilmesh/veil/internal/cniwire"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// Conf is the plugin's entry in the chained configuration.
type Conf struct {
	types.PluginConf
	// AgentSocket is the agent's root-only unix socket (veil-agent --cni-socket).
	AgentSocket string `json:"agentSocket"`
	// Kubeconfig reaches the API server as the agent's service account (written and
	// kept fresh by the agent).
	Kubeconfig string `json:"kubeconfig"`
	// Timeout bounds the API server's and the agent's answers. Default "30s".
	Timeout string `json:"timeout,omitempty"`
}

// k8sArgs are what the kubelet passes in CNI_ARGS.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE types.UnmarshallableString // the names CNI_ARGS uses
	K8S_POD_NAME      types.UnmarshallableString
	K8S_POD_UID       types.UnmarshallableString
}

func main() {
	// 0.3.0 and later: a chained plugin needs prevResult.
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck}, version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"),
		"veil-cni: enrolls mesh pods into the veil agent's capture before their network comes up")
}

func parse(args *skel.CmdArgs) (*Conf, *k8sArgs, time.Duration, error) {
	var c Conf
	if err := json.Unmarshal(args.StdinData, &c); err != nil {
		return nil, nil, 0, fmt.Errorf("veil-cni: configuration: %w", err)
	}
	if err := version.ParsePrevResult(&c.PluginConf); err != nil {
		return nil, nil, 0, fmt.Errorf("veil-cni: configuration: prevResult: %w", err)
	}
	if c.AgentSocket == "" {
		return nil, nil, 0, errors.New("veil-cni: configuration: agentSocket is required")
	}
	timeout := 30 * time.Second
	if c.Timeout != "" {
		d, err := time.ParseDuration(c.Timeout)
		if err != nil || d <= 0 {
			return nil, nil, 0, fmt.Errorf("veil-cni: configuration: timeout %q is not a positive duration", c.Timeout)
		}
		timeout = d
	}
	var ka k8sArgs
	if err := types.LoadArgs(args.Args, &ka); err != nil {
		return nil, nil, 0, fmt.Errorf("veil-cni: CNI_ARGS: %w", err)
	}
	return &c, &ka, timeout, nil
}

func cmdAdd(args *skel.CmdArgs) error {
	c, ka, timeout, err := parse(args)
	if err != nil {
		return err
	}
	if c.PrevResult == nil {
		return errors.New("veil-cni: no prevResult: it must be chained after the plugin that sets up the pod's interface")
	}
	ns, name := string(ka.K8S_POD_NAMESPACE), string(ka.K8S_POD_NAME)
	if ns == "" || name == "" {
		return types.PrintResult(c.PrevResult, c.CNIVersion) // not a Kubernetes pod
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := meshRequest(ctx, c, ns, name, string(ka.K8S_POD_UID))
	if err != nil {
		return err
	}
	if req != nil {
		req.ContainerID = args.ContainerID
		if req.IPs, err = podIPs(c.PrevResult); err != nil {
			return fmt.Errorf("veil-cni: pod %s/%s: %w", ns, name, err)
		}
		f, err := os.Open(args.Netns)
		if err != nil {
			return fmt.Errorf("veil-cni: pod %s/%s: network namespace: %w", ns, name, err)
		}
		defer f.Close()
		if err := ask(c.AgentSocket, req, f, time.Now().Add(timeout)); err != nil {
			return fmt.Errorf("veil-cni: pod %s/%s is in the mesh and the veil agent did not enroll it: %w", ns, name, err)
		}
	}
	return types.PrintResult(c.PrevResult, c.CNIVersion)
}

// meshRequest reads the pod and its namespace from the API server and returns the
// agent's request when the pod is in the mesh, nil when it is not.
func meshRequest(ctx context.Context, c *Conf, ns, name, uid string) (*cniwire.Request, error) {
	if c.Kubeconfig == "" {
		return nil, errors.New("veil-cni: configuration: kubeconfig is required (the agent writes it)")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("veil-cni: kubeconfig %s: %w", c.Kubeconfig, err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("veil-cni: kubeconfig %s: %w", c.Kubeconfig, err)
	}
	pod, err := client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("veil-cni: pod %s/%s: %w", ns, name, err)
	}
	// A static pod's sandbox carries the kubelet's own UID; its mirror pod names it.
	if uid != "" && string(pod.UID) != uid && pod.Annotations["kubernetes.io/config.mirror"] != uid {
		return nil, fmt.Errorf("veil-cni: pod %s/%s: the API server has uid %s, the runtime %s", ns, name, pod.UID, uid)
	}
	nsObj, err := client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("veil-cni: namespace %s: %w", ns, err)
	}
	if !inMesh(pod, nsObj) {
		return nil, nil
	}
	return &cniwire.Request{Command: "ADD", UID: string(pod.UID), Namespace: ns, Name: name,
		ServiceAccount: pod.Spec.ServiceAccountName, Labels: pod.Labels, NamespaceLabels: nsObj.Labels}, nil
}

// inMesh decides as the controller and agent do (cluster.State.Enrolled).
func inMesh(pod *corev1.Pod, ns *corev1.Namespace) bool {
	st := &cluster.State{Namespaces: map[string]*cluster.Namespace{ns.Name: {Name: ns.Name, Labels: ns.Labels}}}
	return st.Enrolled(&cluster.Pod{Namespace: pod.Namespace, Name: pod.Name, Labels: pod.Labels,
		Annotations: pod.Annotations, HostNetwork: pod.Spec.HostNetwork})
}

// podIPs are the addresses the previous plugins gave the pod's own interfaces.
func podIPs(prev types.Result) ([]netip.Addr, error) {
	r, err := current.NewResultFromResult(prev)
	if err != nil {
		return nil, fmt.Errorf("prevResult: %w", err)
	}
	var out []netip.Addr
	for _, ip := range r.IPs {
		if ip.Interface != nil && *ip.Interface >= 0 && *ip.Interface < len(r.Interfaces) && r.Interfaces[*ip.Interface].Sandbox == "" {
			continue // a host-side interface's address
		}
		a, ok := netip.AddrFromSlice(ip.Address.IP)
		if !ok {
			return nil, fmt.Errorf("prevResult: %v is not an address", ip.Address.IP)
		}
		out = append(out, a.Unmap())
	}
	if len(out) == 0 {
		return nil, errors.New("prevResult has no pod address")
	}
	return out, nil
}

// ask sends req to the agent and returns its refusal, if any.
func ask(socket string, req *cniwire.Request, netnsFile *os.File, deadline time.Time) error {
	d := net.Dialer{Deadline: deadline}
	c, err := d.Dial("unixpacket", socket)
	if err != nil {
		return fmt.Errorf("the agent's socket %s: %w", socket, err)
	}
	defer c.Close()
	a, err := cniwire.Send(c.(*net.UnixConn), req, netnsFile, deadline)
	if err != nil {
		return err
	}
	if a.Error != "" {
		return errors.New(a.Error)
	}
	return nil
}

// cmdDel tells the agent the pod's sandbox is going away. It never fails: a pod must
// be deletable when the agent is gone (the agent forgets pods whose veth disappeared).
func cmdDel(args *skel.CmdArgs) error {
	c, ka, _, err := parse(args)
	if err != nil {
		return nil
	}
	req := &cniwire.Request{Command: "DEL", ContainerID: args.ContainerID, UID: string(ka.K8S_POD_UID),
		Namespace: string(ka.K8S_POD_NAMESPACE), Name: string(ka.K8S_POD_NAME)}
	if err := ask(c.AgentSocket, req, nil, time.Now().Add(5*time.Second)); err != nil {
		fmt.Fprintf(os.Stderr, "veil-cni: DEL of %s/%s: %v (ignored)\n", req.Namespace, req.Name, err)
	}
	return nil
}

// cmdCheck checks the configuration only: the agent keeps the capture in step itself.
func cmdCheck(args *skel.CmdArgs) error {
	c, _, _, err := parse(args)
	if err != nil {
		return err
	}
	if c.PrevResult == nil {
		return errors.New("veil-cni: no prevResult: it must be chained after the plugin that sets up the pod's interface")
	}
	return nil
}
