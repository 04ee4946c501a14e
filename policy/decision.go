package policy

// Reason says why a Decision was reached.
type Reason uint8

const (
	// ReasonNoAllowPolicy: allowed, no DENY matched and no ALLOW policy applies to the workload.
	ReasonNoAllowPolicy Reason = iota + 1
	// ReasonAllowed: allowed by Decision.Policy, an ALLOW policy that matched.
	ReasonAllowed
	// ReasonDenied: denied by Decision.Policy, a DENY policy that matched. This includes the
	// policies derived from PeerAuthentication STRICT (a connection without a peer identity).
	ReasonDenied
	// ReasonNotAllowed: denied, ALLOW policies apply but none matched.
	ReasonNotAllowed
	// ReasonUnknownWorkload: denied, the destination is not in the snapshot (fail closed).
	ReasonUnknownWorkload
	// ReasonViaWaypoint: allowed, the connection comes from a waypoint that serves the
	// workload and enforced its policies for this request (policy placement veil).
	ReasonViaWaypoint
	// ReasonWaypointBypass: denied, the workload is bound to a waypoint and this in-mesh
	// connection did not come through a waypoint that serves it.
	ReasonWaypointBypass
)

func (r Reason) String() string {
	switch r {
	case ReasonNoAllowPolicy:
		return "no ALLOW policy applies"
	case ReasonAllowed:
		return "allowed by policy"
	case ReasonDenied:
		return "denied by policy"
	case ReasonNotAllowed:
		return "no ALLOW policy matched"
	case ReasonUnknownWorkload:
		return "unknown destination workload"
	case ReasonViaWaypoint:
		return "from a waypoint that serves the workload: its policies were enforced there"
	case ReasonWaypointBypass:
		return "the workload is bound to a waypoint and the connection did not come through one that serves it"
	}
	return "no decision"
}

// Decision is the outcome of an evaluation with its reason. It is a small value with pointers
// into the immutable Snapshot, so the hot path returns it without allocating.
type Decision struct {
	Reason Reason
	// Policy is the deciding policy for ReasonAllowed and ReasonDenied, else nil.
	Policy *Policy
	// Custom is the first matching CUSTOM policy (HTTP only): its provider must also allow the
	// request; veil does not call external authorizers itself.
	Custom *Policy
	// Audit is the first matching AUDIT policy (HTTP only); it never changes the decision.
	Audit *Policy
	// DryRun is the first matching istio.io/dry-run policy; it never changes the decision.
	DryRun *Policy
}

// Allowed reports whether the connection or request may proceed.
func (d Decision) Allowed() bool {
	return d.Reason == ReasonNoAllowPolicy || d.Reason == ReasonAllowed || d.Reason == ReasonViaWaypoint
}

// String is a one-line explanation, such as
// "DENY: denied by AuthorizationPolicy bookinfo/deny-external (DENY)". It allocates.
func (d Decision) String() string {
	verdict := "DENY"
	if d.Allowed() {
		verdict = "ALLOW"
	}
	s := verdict + ": " + d.Reason.String()
	if d.Policy != nil {
		s = verdict + ": " + d.Policy.describe()
	}
	if d.Custom != nil {
		s += "; CUSTOM " + d.Custom.Namespace + "/" + d.Custom.Name + " also requires provider " + d.Custom.Provider + " to allow"
	}
	if d.Audit != nil {
		s += "; audited by " + d.Audit.Namespace + "/" + d.Audit.Name
	}
	if d.DryRun != nil {
		s += "; dry-run policy " + d.DryRun.String() + " matched (not enforced)"
	}
	return s
}

func (p *Policy) describe() string {
	verb := "allowed by"
	if p.Action == ActionDeny {
		verb = "denied by"
	}
	switch {
	case p.Origin.Kind == KindPeerAuthentication:
		return "no peer identity (plaintext) and mTLS is STRICT: " + verb + " " + p.String() + ", derived from " + p.Origin.String()
	case p.Name == staticStrictName:
		return "no peer identity (plaintext) and mTLS is STRICT: " + verb + " " + p.String()
	}
	return verb + " AuthorizationPolicy " + p.String()
}
