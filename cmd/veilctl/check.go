package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"sort"
	"strings"

	"github.com/veilmesh/veil/policy"
)

const checkUsage = `Usage: veilctl policy check -f DIR --to NS/NAME --port PORT [--from ID] [flags]

Evaluates one connection (L4, as the veil agent does, with ztunnel's semantics) or, when any
HTTP flag is given, one HTTP request (L7, as a sidecar or waypoint does, with Envoy's
semantics) against every PeerAuthentication, AuthorizationPolicy and RequestAuthentication in
the *.yaml, *.yml and *.json files of DIR. Prints the decision, the policy that decided, the
peer-authentication mode and the policies in scope. Objects Istio would reject are reported on
stderr and left out, as the admission webhook would. Other kinds are skipped; Pod objects
provide workload labels and service accounts.

Workloads:
  --from ID        the client's identity: spiffe://TD/ns/NS/sa/SA, or NS/SA (trust domain from
                   --trust-domain). Omit it, or use "none", for plaintext (no peer identity).
  --to NS/NAME     the destination workload. Labels come from the Pod NS/NAME in DIR if there is
                   one, plus --to-labels. NS alone means an unnamed workload in NS.
  --to-labels L    destination labels, k=v[,k=v...]; overrides the Pod's labels per key.
  --port PORT      destination (target/container) port.
  --from-ip IP     client address (default 10.0.0.1); --to-ip IP destination address.

HTTP request (any of these switches to L7):
  --method M, --path P, --host H, --header k=v (repeatable), --request-principal ISS/SUB
  (split at the last /), --claim k=v (repeatable; nested claims as a.b), --remote-ip IP.

Mesh:
  --root-namespace NS (default istio-system), --trust-domain TD (default cluster.local),
  --trust-domain-alias TD (repeatable).

The exit status is 0 when the command ran, whatever the decision, 2 on usage or read errors.
Example:
  veilctl policy check -f ./policies --from bookinfo/frontend --to bookinfo/reviews \
    --to-labels app=reviews --port 9080 --method GET --path /reviews/1

Flags:
`

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

type checkFlags struct {
	dir, from, to, toLabels, fromIP, toIP, remoteIP string
	port                                            uint
	method, path, host, reqPrincipal                string
	headers, claims, aliases                        multi
	root, trustDomain                               string
}

func policyCheck(_ context.Context, args []string, stdout, stderr io.Writer) error {
	var f checkFlags
	fs := flag.NewFlagSet("veilctl policy check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), checkUsage)
		fs.PrintDefaults()
	}
	fs.StringVar(&f.dir, "f", "", "directory of policy YAML (required)")
	fs.StringVar(&f.from, "from", "", "client identity: spiffe://TD/ns/NS/sa/SA, NS/SA, or none")
	fs.StringVar(&f.to, "to", "", "destination workload NS/NAME or NS (required)")
	fs.StringVar(&f.toLabels, "to-labels", "", "destination labels k=v,k=v")
	fs.UintVar(&f.port, "port", 0, "destination target port (required)")
	fs.StringVar(&f.fromIP, "from-ip", "10.0.0.1", "client IP")
	fs.StringVar(&f.toIP, "to-ip", "", "destination IP (default: the Pod's IP, else 10.0.0.2)")
	fs.StringVar(&f.remoteIP, "remote-ip", "", "original client IP (X-Forwarded-For); HTTP")
	fs.StringVar(&f.method, "method", "", "HTTP method")
	fs.StringVar(&f.path, "path", "", "HTTP path")
	fs.StringVar(&f.host, "host", "", "HTTP host (:authority)")
	fs.StringVar(&f.reqPrincipal, "request-principal", "", "JWT principal ISS/SUB; HTTP")
	fs.Var(&f.headers, "header", "HTTP header k=v (repeatable)")
	fs.Var(&f.claims, "claim", "JWT claim k=v, nested as a.b (repeatable)")
	fs.StringVar(&f.root, "root-namespace", policy.DefaultRootNamespace, "mesh root namespace")
	fs.StringVar(&f.trustDomain, "trust-domain", policy.DefaultTrustDomain, "mesh trust domain")
	fs.Var(&f.aliases, "trust-domain-alias", "trust domain alias (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if f.dir == "" || f.to == "" || f.port == 0 || f.port > 65535 {
		fs.Usage()
		return errors.New("-f, --to and --port (1-65535) are required")
	}
	opts := policy.Options{RootNamespace: f.root, TrustDomain: f.trustDomain, TrustDomainAliases: f.aliases}
	loaded, err := policy.LoadDir(f.dir, opts)
	if err != nil {
		return err
	}
	for _, e := range loaded.Errors {
		fmt.Fprintln(stderr, "rejected:", e)
	}
	for _, w := range loaded.Warnings {
		fmt.Fprintln(stderr, "warning:", w)
	}
	snap := policy.Compile(loaded.Objects, loaded.Workloads, opts)
	for _, w := range snap.Warnings {
		fmt.Fprintln(stderr, "warning:", w)
	}

	dst, err := destination(&f, loaded.Workloads)
	if err != nil {
		return err
	}
	conn := policy.Conn{DstPort: uint16(f.port)}
	if conn.SrcIP, err = netip.ParseAddr(f.fromIP); err != nil {
		return fmt.Errorf("--from-ip: %w", err)
	}
	conn.DstIP = netip.MustParseAddr("10.0.0.2")
	if len(dst.IPs) > 0 {
		conn.DstIP = dst.IPs[0]
	}
	if f.toIP != "" {
		if conn.DstIP, err = netip.ParseAddr(f.toIP); err != nil {
			return fmt.Errorf("--to-ip: %w", err)
		}
	}
	if conn.Peer, err = peer(f.from, opts); err != nil {
		return err
	}
	cw := snap.Compile(dst)

	var d policy.Decision
	mode := "L4 connection (veil agent, ztunnel semantics)"
	if f.http() {
		mode = "HTTP request (waypoint/sidecar, Envoy semantics)"
		req, err := f.request(conn)
		if err != nil {
			return err
		}
		if req.JWT != nil {
			// As the waypoint will: the rules of the workload's RequestAuthentications
			// for the token's issuer say which claims are space-delimited.
			for _, o := range cw.RequestAuthentications {
				for _, rule := range o.RequestAuthentication.GetJwtRules() {
					if rule.GetIssuer() == req.JWT.Issuer {
						req.JWT.SpaceDelimited = append(req.JWT.SpaceDelimited, rule.GetSpaceDelimitedClaims()...)
					}
				}
			}
		}
		d = cw.EvaluateHTTP(req)
	} else {
		d = cw.EvaluateL4(&conn)
	}
	printDecision(stdout, &f, mode, d, cw, conn)
	return nil
}

func (f *checkFlags) http() bool {
	return f.method != "" || f.path != "" || f.host != "" || len(f.headers) > 0 || f.reqPrincipal != "" || len(f.claims) > 0 || f.remoteIP != ""
}

func (f *checkFlags) request(conn policy.Conn) (*policy.Request, error) {
	r := &policy.Request{Conn: conn, Method: f.method, Path: f.path, Host: f.host}
	if f.remoteIP != "" {
		ip, err := netip.ParseAddr(f.remoteIP)
		if err != nil {
			return nil, fmt.Errorf("--remote-ip: %w", err)
		}
		r.RemoteIP = ip
	}
	for _, h := range f.headers {
		k, v, ok := strings.Cut(h, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--header %q: want name=value", h)
		}
		if r.Headers == nil {
			r.Headers = map[string][]string{}
		}
		k = strings.ToLower(k)
		r.Headers[k] = append(r.Headers[k], v)
	}
	if f.reqPrincipal != "" || len(f.claims) > 0 {
		r.JWT = &policy.JWT{Claims: map[string]any{}}
		if f.reqPrincipal != "" {
			i := strings.LastIndexByte(f.reqPrincipal, '/')
			if i <= 0 || i == len(f.reqPrincipal)-1 {
				return nil, fmt.Errorf("--request-principal %q: want ISSUER/SUBJECT", f.reqPrincipal)
			}
			r.JWT.Issuer, r.JWT.Subject = f.reqPrincipal[:i], f.reqPrincipal[i+1:]
			r.JWT.Claims["iss"], r.JWT.Claims["sub"] = r.JWT.Issuer, r.JWT.Subject
		}
		for _, c := range f.claims {
			k, v, ok := strings.Cut(c, "=")
			if !ok || k == "" {
				return nil, fmt.Errorf("--claim %q: want name=value", c)
			}
			setClaim(r.JWT.Claims, strings.Split(k, "."), v)
		}
	}
	return r, nil
}

// setClaim sets a nested claim; a repeated claim becomes a list.
func setClaim(m map[string]any, path []string, v string) {
	for _, k := range path[:len(path)-1] {
		next, ok := m[k].(map[string]any)
		if !ok {
			next = map[string]any{}
			m[k] = next
		}
		m = next
	}
	last := path[len(path)-1]
	switch old := m[last].(type) {
	case nil:
		m[last] = v
	case string:
		m[last] = []any{old, v}
	case []any:
		m[last] = append(old, v)
	}
}

// peer parses --from.
func peer(from string, opts policy.Options) (policy.Peer, error) {
	switch {
	case from == "" || from == "none":
		return policy.Peer{}, nil
	case strings.HasPrefix(from, "spiffe://"):
		p := policy.ParsePeer(from)
		if p.Namespace == "" {
			return p, fmt.Errorf("--from %q: not an Istio identity spiffe://TD/ns/NS/sa/SA", from)
		}
		return p, nil
	}
	ns, sa, ok := strings.Cut(from, "/")
	if !ok || ns == "" || sa == "" || strings.Contains(sa, "/") {
		return policy.Peer{}, fmt.Errorf("--from %q: want spiffe://TD/ns/NS/sa/SA, NS/SA or none", from)
	}
	td := opts.TrustDomain
	if td == "" {
		td = policy.DefaultTrustDomain
	}
	return policy.ParsePeer("spiffe://" + td + "/ns/" + ns + "/sa/" + sa), nil
}

// destination builds the destination workload from --to, the Pods in the directory and
// --to-labels.
func destination(f *checkFlags, pods []*policy.Workload) (*policy.Workload, error) {
	ns, name, _ := strings.Cut(f.to, "/")
	if ns == "" || strings.Contains(name, "/") {
		return nil, fmt.Errorf("--to %q: want NS/NAME or NS", f.to)
	}
	w := &policy.Workload{Namespace: ns, Name: name, Labels: map[string]string{}}
	for _, p := range pods {
		if p.Namespace == ns && p.Name == name && name != "" {
			for k, v := range p.Labels {
				w.Labels[k] = v
			}
			w.ServiceAccount, w.IPs, w.Source = p.ServiceAccount, p.IPs, p.Source
		}
	}
	if f.toLabels != "" {
		for _, kv := range strings.Split(f.toLabels, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok || k == "" {
				return nil, fmt.Errorf("--to-labels %q: want k=v,k=v", f.toLabels)
			}
			w.Labels[k] = v
		}
	}
	return w, nil
}

func printDecision(out io.Writer, f *checkFlags, mode string, d policy.Decision, cw *policy.CompiledWorkload, conn policy.Conn) {
	verdict := "DENY"
	if d.Allowed() {
		verdict = "ALLOW"
	}
	fmt.Fprintf(out, "decision:  %s\n", verdict)
	fmt.Fprintf(out, "reason:    %s\n", strings.TrimPrefix(strings.TrimPrefix(d.String(), "ALLOW: "), "DENY: "))
	fmt.Fprintf(out, "evaluated: %s\n", mode)
	from := conn.Peer.URI
	if from == "" {
		from = "no peer identity (plaintext)"
	}
	fmt.Fprintf(out, "from:      %s (%s)\n", from, conn.SrcIP)
	w := cw.Workload
	fmt.Fprintf(out, "to:        %s/%s %s port %d (%s)\n", w.Namespace, w.Name, labels(w.Labels), conn.DstPort, conn.DstIP)

	pa := &cw.PeerAuth
	port := uint32(conn.DstPort)
	m := pa.PortMode(port)
	line := m.String()
	if am := pa.AmbientMode(port); am != m {
		line += " (acts as " + am.String() + " in veil, as in ambient)"
	}
	if src := pa.Decider(port); src != nil {
		line += ", set by PeerAuthentication " + src.Namespace + "/" + src.Name
	} else {
		line += ", the default"
	}
	if !pa.PlaintextAllowed(port) {
		line += "; plaintext refused"
	}
	fmt.Fprintf(out, "mTLS:      %s\n", line)
	for _, o := range pa.Ignored {
		fmt.Fprintf(out, "           ignored: PeerAuthentication %s/%s\n", o.Namespace, o.Name)
	}

	fmt.Fprintln(out, "policies in scope:")
	if len(cw.Policies) == 0 {
		fmt.Fprintln(out, "  (none)")
	}
	for _, p := range cw.Policies {
		mark := ""
		if d.Policy == p {
			mark = "  <- decided"
		}
		fmt.Fprintf(out, "  %s%s\n", p, mark)
		if !f.http() || strings.Contains(strings.Join(p.Notes, ""), "targetRefs") {
			for _, n := range p.Notes {
				fmt.Fprintf(out, "    note: %s\n", n)
			}
		}
	}
	if len(cw.RequestAuthentications) > 0 {
		fmt.Fprintln(out, "request authentication (JWT, enforced by a waypoint):")
		for _, o := range cw.RequestAuthentications {
			fmt.Fprintf(out, "  %s/%s\n", o.Namespace, o.Name)
		}
	}
}

func labels(m map[string]string) string {
	if len(m) == 0 {
		return "{}"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + m[k]
	}
	return "{" + strings.Join(parts, ",") + "}"
}
