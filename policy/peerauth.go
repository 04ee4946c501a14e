package policy

import (
	"sort"
	"strconv"

	securityv1beta1 "istio.io/api/security/v1beta1"
)

// Mode is a PeerAuthentication mTLS mode: UNSET, DISABLE, PERMISSIVE or STRICT.
type Mode = securityv1beta1.PeerAuthentication_MutualTLS_Mode

// The mTLS modes.
const (
	ModeUnset      = securityv1beta1.PeerAuthentication_MutualTLS_UNSET
	ModeDisable    = securityv1beta1.PeerAuthentication_MutualTLS_DISABLE
	ModePermissive = securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE
	ModeStrict     = securityv1beta1.PeerAuthentication_MutualTLS_STRICT
)

// PortMode is the resolved mode of one port listed in the workload policy's portLevelMtls.
type PortMode struct {
	Port uint32
	Mode Mode
}

// PeerAuthResolution is the PeerAuthentication outcome for one workload (ISTIO-SEMANTICS §1.4).
// It is immutable once returned.
type PeerAuthResolution struct {
	// Mesh, Namespace and Workload are the policies that won at each level (oldest first by
	// creationTimestamp, then name, then namespace), or nil.
	Mesh, Namespace, Workload *Object
	// Mode is the workload's mode before port-level settings: never UNSET; DISABLE is kept as
	// configured (see AmbientMode).
	Mode Mode
	// Ports lists the workload policy's portLevelMtls, sorted by port, with UNSET entries
	// resolved to Mode.
	Ports []PortMode
	// Ignored lists the policies that applied to the workload's namespace or mesh but lost:
	// newer duplicates at a level, and root-namespace policies with a selector.
	Ignored []*Object
}

// PortMode returns the configured mode for a workload (target) port. It may be DISABLE.
func (r *PeerAuthResolution) PortMode(port uint32) Mode {
	for _, p := range r.Ports {
		if p.Port == port {
			return p.Mode
		}
	}
	return r.Mode
}

// AmbientMode is the mode the agent enforces on port: as PortMode, but DISABLE, which ambient
// does not support, behaves as PERMISSIVE (ISTIO-SEMANTICS §1.5).
func (r *PeerAuthResolution) AmbientMode(port uint32) Mode {
	if m := r.PortMode(port); m != ModeDisable {
		return m
	}
	return ModePermissive
}

// PlaintextAllowed reports whether a connection without a peer identity (non-mesh traffic via
// inbound passthrough) may reach port. It is false exactly when the port's mode is STRICT. It
// does not allocate.
func (r *PeerAuthResolution) PlaintextAllowed(port uint32) bool {
	return r.PortMode(port) != ModeStrict
}

// Decider returns the policy whose setting decides port's mode, or nil when nothing is set
// (default PERMISSIVE).
func (r *PeerAuthResolution) Decider(port uint32) *Object {
	if r.Workload != nil {
		if m, ok := r.Workload.PeerAuthentication.GetPortLevelMtls()[port]; ok && m.GetMode() != ModeUnset {
			return r.Workload
		}
	}
	for _, o := range []*Object{r.Workload, r.Namespace, r.Mesh} {
		if o != nil && o.PeerAuthentication.GetMtls().GetMode() != ModeUnset {
			return o
		}
	}
	return nil
}

// hasSelector reports whether a PeerAuthentication selects workloads: a nil selector and empty
// matchLabels both mean "no selector" (§0).
func hasSelector(pa *securityv1beta1.PeerAuthentication) bool {
	return len(pa.GetSelector().GetMatchLabels()) > 0
}

// selects reports whether every key/value of sel is in labels.
func selects(sel, labels map[string]string) bool {
	for k, v := range sel {
		if lv, ok := labels[k]; !ok || lv != v {
			return false
		}
	}
	return true
}

// olderThan orders configs by creationTimestamp, then name, then namespace (§0).
func olderThan(a, b *Object) bool {
	if !a.Created.Equal(b.Created) {
		return a.Created.Before(b.Created)
	}
	if a.Name != b.Name {
		return a.Name < b.Name
	}
	return a.Namespace < b.Namespace
}

func sortByAge(objs []*Object) {
	sort.SliceStable(objs, func(i, j int) bool { return olderThan(objs[i], objs[j]) })
}

// ResolvePeerAuthentication computes the PeerAuthentication outcome for a workload with labels
// in namespace, from every PeerAuthentication in pas (others kinds and namespaces are ignored),
// per ISTIO-SEMANTICS §1.3–1.4. rootNamespace "" means DefaultRootNamespace.
func ResolvePeerAuthentication(pas []*Object, rootNamespace, namespace string, labels map[string]string) PeerAuthResolution {
	if rootNamespace == "" {
		rootNamespace = DefaultRootNamespace
	}
	var mesh, ns, wl []*Object
	var res PeerAuthResolution
	for _, o := range pas {
		if o.Kind != KindPeerAuthentication || o.PeerAuthentication == nil {
			continue
		}
		switch {
		case o.Namespace == rootNamespace && !hasSelector(o.PeerAuthentication):
			mesh = append(mesh, o)
		case o.Namespace == rootNamespace:
			// A root-namespace policy with a selector is ignored entirely, even for workloads
			// in the root namespace (§1.3).
			if selects(o.PeerAuthentication.Selector.MatchLabels, labels) {
				res.Ignored = append(res.Ignored, o)
			}
		case o.Namespace != namespace:
		case !hasSelector(o.PeerAuthentication):
			ns = append(ns, o)
		case selects(o.PeerAuthentication.Selector.MatchLabels, labels):
			wl = append(wl, o)
		}
	}
	pick := func(c []*Object) *Object {
		if len(c) == 0 {
			return nil
		}
		sortByAge(c)
		res.Ignored = append(res.Ignored, c[1:]...)
		return c[0]
	}
	res.Mesh, res.Namespace, res.Workload = pick(mesh), pick(ns), pick(wl)
	res.Mode = ModePermissive
	for _, o := range []*Object{res.Mesh, res.Namespace, res.Workload} {
		if o == nil {
			continue
		}
		if m := o.PeerAuthentication.GetMtls().GetMode(); m != ModeUnset {
			res.Mode = m
		}
	}
	if res.Workload != nil {
		plm := res.Workload.PeerAuthentication.PortLevelMtls
		for _, port := range sortedPorts(plm) {
			m := plm[port].GetMode()
			if m == ModeUnset {
				m = res.Mode
			}
			res.Ports = append(res.Ports, PortMode{port, m})
		}
	}
	return res
}

// Names of the DENY policies istiod derives from PeerAuthentication for ztunnel (§1.5).
const (
	staticStrictName    = "istio_converted_static_strict"
	convertedPeerPrefix = "converted_peer_authentication_"
)

// newStaticStrict builds <root>/istio_converted_static_strict: deny any connection without a
// peer identity.
func newStaticStrict(root string) *Policy {
	p := &Policy{Namespace: root, Name: staticStrictName, Action: ActionDeny, order: -2,
		Notes: []string{"derived from PeerAuthentication: the workload's effective mTLS mode is STRICT, so connections without a peer identity are refused"}}
	r := rule{clauses: []clause{{matches: []match{{preds: []pred{noIdentity()}}}}}}
	p.l4, p.l7 = []rule{r}, []rule{r}
	return p
}

// noIdentity is notPrincipals: ["*"]: true when the peer has no identity.
func noIdentity() pred {
	return pred{attr: attrPrincipal, not: true, strs: []strMatch{{kind: strPresence}}}
}

// peerAuthPolicy converts a resolution into the DENY policy the ztunnel path enforces, or nil
// when plaintext is allowed everywhere (ISTIO-SEMANTICS §1.5). static is the shared static
// strict policy.
func peerAuthPolicy(res *PeerAuthResolution, static *Policy) *Policy {
	strict := res.Mode == ModeStrict
	if len(res.Ports) == 0 {
		if strict {
			return static
		}
		return nil
	}
	w := res.Workload
	p := &Policy{Namespace: w.Namespace, Name: convertedPeerPrefix + w.Name, Action: ActionDeny, order: -1,
		Origin: w.Key(), Object: w}
	var r []rule
	if !strict {
		// One rule per STRICT port: {dstPort p, no identity}.
		for _, pm := range res.Ports {
			if pm.Mode == ModeStrict {
				r = append(r, rule{clauses: []clause{{matches: []match{{preds: []pred{
					{attr: attrDestPort, ports: []uint16{uint16(pm.Port)}}, noIdentity()}}}}}})
			}
		}
		if len(r) == 0 {
			return nil
		}
		p.Notes = []string{"derived from PeerAuthentication " + w.Namespace + "/" + w.Name + ": connections without a peer identity are refused on its STRICT ports"}
	} else {
		// One rule: {no identity} AND {dstPort != p} for each exempt port.
		cl := []clause{{matches: []match{{preds: []pred{noIdentity()}}}}}
		for _, pm := range res.Ports {
			if pm.Mode != ModeStrict {
				cl = append(cl, clause{matches: []match{{preds: []pred{{attr: attrDestPort, not: true, ports: []uint16{uint16(pm.Port)}}}}}})
			}
		}
		if len(cl) == 1 {
			return static
		}
		r = []rule{{clauses: cl}}
		p.Notes = []string{"derived from PeerAuthentication " + w.Namespace + "/" + w.Name + ": connections without a peer identity are refused except on ports " + exemptPorts(res)}
	}
	p.l4, p.l7 = r, r
	return p
}

func exemptPorts(res *PeerAuthResolution) string {
	s := ""
	for _, pm := range res.Ports {
		if pm.Mode != ModeStrict {
			if s != "" {
				s += ", "
			}
			s += strconv.FormatUint(uint64(pm.Port), 10)
		}
	}
	return s
}
