package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/veilmesh/veil/agent"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/lab"
)

// admin reaches agents' admin endpoints: of a lab's nodes, or one agent at a URL.
type admin interface {
	// get fetches path from the agent of node ("" for any agent).
	get(ctx context.Context, node, path string) ([]byte, error)
}

type labAdmin struct{ l *lab.Lab }

func (a labAdmin) get(ctx context.Context, node, path string) ([]byte, error) {
	if node == "" {
		node = a.l.Spec.Nodes[0]
	}
	return a.l.NodeGet(ctx, node, "127.0.0.1:15000", path)
}

type urlAdmin struct{ base string }

func (a urlAdmin) get(ctx context.Context, _ string, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(a.base, "/")+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("agent admin endpoint: %w (on a node, the agent listens on localhost:15000; elsewhere port-forward to it)", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("%s: %s: %s", path, resp.Status, strings.TrimSpace(string(b)))
	}
	return b, err
}

// adminFlags adds --lab, --state-root and --admin to fs and returns a constructor.
func adminFlags(fs *flag.FlagSet) func() (admin, error) {
	labName := fs.String("lab", "", "read the agents of this veilctl lab")
	stateRoot := fs.String("state-root", "", "state directory of labs (default "+lab.DefaultStateRoot+")")
	base := fs.String("admin", "http://localhost:15000", "admin endpoint of the agent to ask (the pod's node's agent)")
	return func() (admin, error) {
		if *labName != "" {
			l, err := lab.Open(*labName, lab.Options{StateRoot: *stateRoot})
			if err != nil {
				return nil, err
			}
			return labAdmin{l}, nil
		}
		return urlAdmin{*base}, nil
	}
}

type workload struct {
	Namespace, Name, Identity, Node string
	IPs                             []string
	Enrolled, Local                 bool
	Labels                          map[string]string
	MTLS                            *struct {
		Mode, Configured string
		DecidedBy        string `json:"decided_by"`
		Ports            []struct {
			Port             uint32
			Mode, Configured string
			DecidedBy        string `json:"decided_by"`
		}
	}
	Policies  []string
	Waypoint  string
	ServedBy  []string `json:"served_by"`
	Placement string
}

// findWorkload looks ns/name up in an agent's config dump and returns it as its own
// node's agent describes it.
func findWorkload(ctx context.Context, a admin, ref string) (*workload, error) {
	ns, name, ok := strings.Cut(ref, "/")
	if !ok || ns == "" || name == "" {
		return nil, fmt.Errorf("%q: want namespace/name", ref)
	}
	lookup := func(node string) (*workload, error) {
		b, err := a.get(ctx, node, "/config_dump")
		if err != nil {
			return nil, err
		}
		var d struct{ Workloads []workload }
		if err := json.Unmarshal(b, &d); err != nil {
			return nil, fmt.Errorf("config_dump: %w", err)
		}
		for i := range d.Workloads {
			if w := &d.Workloads[i]; w.Namespace == ns && w.Name == name {
				return w, nil
			}
		}
		return nil, fmt.Errorf("no pod %s in the agent's view", ref)
	}
	w, err := lookup("")
	if err != nil || w.Local {
		return w, err
	}
	if _, isLab := a.(labAdmin); !isLab {
		return w, nil // one agent: its view of a remote pod lacks mTLS and policies
	}
	return lookup(w.Node)
}

// podCommand parses the flags of a command about one pod and finds the pod.
func podCommand(ctx context.Context, name string, args []string, stderr io.Writer) (admin, *workload, error) {
	fs := flag.NewFlagSet("veilctl "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	mk := adminFlags(fs)
	if err := fs.Parse(args); err != nil {
		return nil, nil, err
	}
	if fs.NArg() != 1 {
		return nil, nil, fmt.Errorf("%s: want NAMESPACE/NAME", name)
	}
	a, err := mk()
	if err != nil {
		return nil, nil, err
	}
	w, err := findWorkload(ctx, a, fs.Arg(0))
	return a, w, err
}

func describePod(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	_, w, err := podCommand(ctx, "describe pod", args, stderr)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "Pod:       %s/%s\nNode:      %s\nIPs:       %s\n", w.Namespace, w.Name, w.Node, strings.Join(w.IPs, ", "))
	if !w.Enrolled {
		fmt.Fprintf(stdout, "Mesh:      not enrolled (neither the pod nor its namespace has istio.io/dataplane-mode=ambient)\n")
		return nil
	}
	fmt.Fprintf(stdout, "Mesh:      enrolled\nIdentity:  %s\n", w.Identity)
	if w.Waypoint != "" {
		fmt.Fprintf(stdout, "Waypoint:  %s\n", w.Waypoint)
	}
	if len(w.ServedBy) > 0 {
		fmt.Fprintf(stdout, "Served by: %s\n", strings.Join(w.ServedBy, ", "))
	}
	if w.Placement != "" {
		fmt.Fprintf(stdout, "Enforced:  %s\n", w.Placement)
	}
	if w.MTLS == nil {
		fmt.Fprintf(stdout, "mTLS:      (ask the agent of %s)\n", w.Node)
		return nil
	}
	fmt.Fprintf(stdout, "mTLS:      %s (configured %s, by %s)\n", w.MTLS.Mode, w.MTLS.Configured, w.MTLS.DecidedBy)
	for _, p := range w.MTLS.Ports {
		fmt.Fprintf(stdout, "  port %-5d %s (configured %s, by %s)\n", p.Port, p.Mode, p.Configured, p.DecidedBy)
	}
	if len(w.Policies) == 0 {
		fmt.Fprintln(stdout, "Policies:  none (every connection allowed, subject to mTLS)")
	} else {
		fmt.Fprintln(stdout, "Policies:")
		for _, p := range w.Policies {
			fmt.Fprintf(stdout, "  %s\n", p)
		}
	}
	return nil
}

func certs(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	a, w, err := podCommand(ctx, "certs", args, stderr)
	if err != nil {
		return err
	}
	if !w.Enrolled {
		return fmt.Errorf("%s/%s is not in the mesh: it has no certificate", w.Namespace, w.Name)
	}
	b, err := a.get(ctx, w.Node, "/certs")
	if err != nil {
		return err
	}
	var states []identity.CertState
	if err := json.Unmarshal(b, &states); err != nil {
		return fmt.Errorf("certs: %w", err)
	}
	for _, s := range states {
		if s.ID != w.Identity {
			continue
		}
		fmt.Fprintf(stdout, "SPIFFE ID:    %s\nState:        %s\n", s.ID, s.State)
		if s.State != "pending" {
			fmt.Fprintf(stdout, "Serial:       %s\nValid:        %s to %s\nRotation:     %s (in %s)\n", s.Serial,
				s.NotBefore.Format(time.RFC3339), s.NotAfter.Format(time.RFC3339), s.RenewAt.Format(time.RFC3339), time.Until(s.RenewAt).Round(time.Second))
		}
		if s.LastError != "" {
			fmt.Fprintf(stdout, "Last error:   %s (failures %d, next attempt %s)\n", s.LastError, s.Failures, s.NextAttempt.Format(time.RFC3339))
		}
		fmt.Fprintln(stdout, "Chain:")
		for i, c := range s.Chain {
			kind := "leaf"
			switch {
			case c.Root:
				kind = "root"
			case c.IsCA:
				kind = "intermediate"
			}
			subject := c.Subject
			if len(c.URIs) > 0 {
				subject = strings.TrimSpace(subject + " " + strings.Join(c.URIs, " "))
			}
			fmt.Fprintf(stdout, "  [%d] %-12s %s\n      issuer %s, serial %s, %s to %s\n", i, kind, subject, c.Issuer, c.Serial,
				c.NotBefore.Format(time.RFC3339), c.NotAfter.Format(time.RFC3339))
		}
		return nil
	}
	return fmt.Errorf("the agent of %s holds no certificate for %s yet", w.Node, w.Identity)
}

func policyExplain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("veilctl policy explain", flag.ContinueOnError)
	fs.SetOutput(stderr)
	mk := adminFlags(fs)
	from := fs.String("from", "", "source pod, NAMESPACE/NAME")
	to := fs.String("to", "", "destination pod and port, NAMESPACE/NAME:PORT")
	if err := fs.Parse(args); err != nil {
		return err
	}
	dstRef, portStr, ok := strings.Cut(*to, ":")
	port, err := strconv.ParseUint(portStr, 10, 16)
	if *from == "" || !ok || err != nil || port == 0 {
		return errors.New("policy explain: want --from NAMESPACE/NAME --to NAMESPACE/NAME:PORT")
	}
	a, err := mk()
	if err != nil {
		return err
	}
	src, err := findWorkload(ctx, a, *from)
	if err != nil {
		return err
	}
	dst, err := findWorkload(ctx, a, dstRef)
	if err != nil {
		return err
	}
	if !dst.Enrolled {
		fmt.Fprintf(stdout, "ALLOW: %s is not in the mesh; veil does not enforce policy for it\n", dstRef)
		return nil
	}
	q := url.Values{"dst": {dst.IPs[0]}, "port": {portStr}}
	if len(src.IPs) > 0 {
		q.Set("src", src.IPs[0])
	}
	how := "plaintext (the source is not in the mesh)"
	if src.Enrolled {
		q.Set("principal", src.Identity)
		how = "mTLS as " + src.Identity
	}
	b, err := a.get(ctx, dst.Node, "/explain?"+q.Encode())
	if err != nil {
		return err
	}
	var e agent.Explanation
	if err := json.Unmarshal(b, &e); err != nil {
		return fmt.Errorf("explain: %w", err)
	}
	fmt.Fprintf(stdout, "%s\nfrom:     %s, %s\nto:       %s port %d, on %s\nmTLS:     %s\n", e.Decision, *from, how, e.Destination, port, dst.Node, e.MTLS)
	if e.Policy != "" {
		fmt.Fprintf(stdout, "policy:   %s\n", e.Policy)
	}
	if dst.Waypoint != "" {
		fmt.Fprintf(stdout, "waypoint: %s: the source's agent sends traffic to the pod through it; the decision above is for a connection straight from the source\n", dst.Waypoint)
	}
	if e.Placement != "" {
		fmt.Fprintf(stdout, "enforced: %s\n", e.Placement)
	}
	return nil
}
