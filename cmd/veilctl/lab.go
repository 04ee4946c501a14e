package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"

	"github.com/veilmesh/veil/lab"
)

const labUsage = `veilctl lab: a veil mesh in network namespaces on this machine (root).

  veilctl lab up [-f SPEC] [--name NAME] [--kube] [--network routed|bridge|overlay]
                 [--family ipv4|ipv6|dual]  build the lab (default: Bookinfo, name "demo") and start
                                            a controller, an agent per node, an application per pod
                                            (--kube: the cluster lives in a real kube-apiserver, see below;
                                            --network: pods wired as a routed CNI (default), on a Linux
                                            bridge (flannel's cni0), or routed with VXLAN between nodes;
                                            --family: IPv4 only (default), IPv6 only, or dual-stack:
                                            every node, pod and Service has an IPv4 and an IPv6 address)
  veilctl lab status [--name NAME]          processes, nodes, pods, services and their addresses
  veilctl lab exec [--name NAME] POD -- CMD run CMD in a pod's network namespace (POD = ns/name or name)
  veilctl lab apply [--name NAME] -f FILE   add security.istio.io policies (validated first; in a
                                            --kube lab, applied server-side to the API server)
  veilctl lab delete [--name NAME] -f FILE  remove what apply added from FILE
  veilctl lab restart-agent [--name NAME] [--kill] NODE
                                            replace a node's agent as a DaemonSet rolling update does:
                                            the new one takes the listeners over, the old one drains
                                            (--kill: kill -9 the old one first, as a crash)
  veilctl lab demo [--name NAME] [--kube] [--family ipv4|ipv6|dual]
                                            up, run the Istio documentation's scenarios, down (default
                                            dual: every probe over IPv4, then over IPv6)
  veilctl lab down [--name NAME]            remove everything the lab created, even after a crash

Binaries are taken from the directory of veilctl (make build puts them in bin/); --bin-dir overrides.

--kube runs etcd and a kube-apiserver (from make kube-build, built on first use; etcd from
etcd-server) in the lab's fabric namespace at 10.99.0.253:6443, with Istio's CRDs, veil's RBAC and
the lab's Namespaces, ServiceAccounts, Pods (node and status set, as no kubelet runs) and Services.
The controller reads it with --kubeconfig as veil-system/veil-controller; each agent authenticates
with a token of veil-system/veil-agent bound to its pod veil-system/veil-agent-NODE (audience
istio-ca), checked by TokenReview. lab status prints the kubectl command that reaches it.
`

func labCmd(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stdout, labUsage)
		return nil
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("veilctl lab "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	name := fs.String("name", lab.DefaultSpec().Name, "lab name")
	binDir := fs.String("bin-dir", "", "directory holding veil-controller, veil-agent and veilctl (default: veilctl's)")
	file := fs.String("f", "", "file (spec for up; policies for apply and delete)")
	kill := fs.Bool("kill", false, "restart-agent: kill -9 the running agent first, as a crash")
	kube := fs.Bool("kube", false, "up, demo: keep the cluster in a real Kubernetes API server (etcd + kube-apiserver)")
	network := fs.String("network", "", "up: the pods' wiring, routed, bridge or overlay (default: the spec's, else routed)")
	family := fs.String("family", "", "up, demo: the IP families, ipv4, ipv6 or dual (default for up: the spec's, else ipv4; for demo: dual)")
	var listens multiFlag
	if sub == "app" {
		// veilctl lab app --name NS/POD --listen :9080 ...: the application the lab runs in pods.
		fs = flag.NewFlagSet("veilctl lab app", flag.ContinueOnError)
		fs.SetOutput(stderr)
		pod := fs.String("name", "", "the pod's namespace/name")
		fs.Var(&listens, "listen", "address to serve on; repeatable")
		if err := fs.Parse(args); err != nil {
			return err
		}
		return lab.ServeApp(ctx, *pod, listens)
	}
	if sub == "jwks" {
		// veilctl lab jwks --listen ADDR --file JWKS: the lab's token issuer.
		fs = flag.NewFlagSet("veilctl lab jwks", flag.ContinueOnError)
		fs.SetOutput(stderr)
		listen := fs.String("listen", "", "address to serve on")
		jwks := fs.String("file", "", "the JWKS file to serve")
		if err := fs.Parse(args); err != nil {
			return err
		}
		return lab.ServeJWKS(ctx, *listen, *jwks)
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	opts := lab.Options{BinDir: *binDir, Log: stdout, Kube: *kube}
	switch sub {
	case "up":
		spec := lab.DefaultSpec()
		if *file != "" {
			var err error
			if spec, err = lab.LoadSpec(*file); err != nil {
				return err
			}
		}
		if isFlagSet(fs, "name") {
			spec.Name = *name
		}
		if *network != "" {
			if !slices.Contains([]string{lab.NetworkRouted, lab.NetworkBridge, lab.NetworkOverlay}, *network) {
				return fmt.Errorf("--network %q: must be routed, bridge or overlay", *network)
			}
			spec.Network = *network
		}
		if *family != "" {
			spec.Family = *family // checked with the spec
		}
		l, err := lab.Up(ctx, spec, opts)
		if err != nil {
			return err
		}
		fmt.Fprint(stdout, l.Status())
		return nil
	case "down":
		return lab.Down(*name, opts)
	case "demo":
		return lab.Demo(ctx, *name, *family, opts, stdout)
	}
	l, err := lab.Open(*name, opts)
	if err != nil {
		return err
	}
	switch sub {
	case "status":
		fmt.Fprint(stdout, l.Status())
		return nil
	case "apply", "delete":
		if *file == "" {
			return fmt.Errorf("lab %s: -f FILE is required", sub)
		}
		if sub == "delete" {
			return l.Delete(*file)
		}
		data, err := os.ReadFile(*file)
		if err != nil {
			return err
		}
		if err := l.Apply(*file, data); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "applied %s to lab %s\n", *file, l.Spec.Name)
		return nil
	case "restart-agent":
		if fs.NArg() != 1 {
			return errors.New("lab restart-agent: want one NODE")
		}
		if err := l.RestartAgent(ctx, fs.Arg(0), *kill); err != nil {
			return err
		}
		how := "handed over without a refused connection"
		if *kill {
			how = "killed and restarted"
		}
		fmt.Fprintf(stdout, "agent of %s %s\n", fs.Arg(0), how)
		return nil
	case "exec":
		rest := fs.Args()
		if len(rest) < 2 {
			return errors.New("lab exec: want POD -- COMMAND [ARGS...]")
		}
		pod, argv := rest[0], rest[1:]
		if argv[0] == "--" {
			argv = argv[1:]
		}
		err := l.Exec(ctx, pod, argv, stdin, stdout, stderr)
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("lab exec: %s exited with %d", strings.Join(argv, " "), ee.ExitCode())
		}
		return err
	}
	fmt.Fprint(stderr, labUsage)
	return fmt.Errorf("lab: unknown command %q", sub)
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(s string) error { *m = append(*m, s); return nil }

func isFlagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			set = true
		}
	})
	return set
}
