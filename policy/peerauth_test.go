package policy

import (
	"testing"
	"time"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// paOpt configures a PeerAuthentication built by mkPA.
type paOpt func(*Object)

func mode(m Mode) paOpt {
	return func(o *Object) { o.PeerAuthentication.Mtls = &securityv1beta1.PeerAuthentication_MutualTLS{Mode: m} }
}
func sel(kv ...string) paOpt {
	return func(o *Object) {
		ml := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			ml[kv[i]] = kv[i+1]
		}
		o.PeerAuthentication.Selector = &typev1beta1.WorkloadSelector{MatchLabels: ml}
	}
}
func port(p uint32, m Mode) paOpt {
	return func(o *Object) {
		if o.PeerAuthentication.PortLevelMtls == nil {
			o.PeerAuthentication.PortLevelMtls = map[uint32]*securityv1beta1.PeerAuthentication_MutualTLS{}
		}
		o.PeerAuthentication.PortLevelMtls[p] = &securityv1beta1.PeerAuthentication_MutualTLS{Mode: m}
	}
}
func at(d time.Duration) paOpt { return func(o *Object) { o.Created = t0.Add(d) } }

func mkPA(ns, name string, opts ...paOpt) *Object {
	o := &Object{Kind: KindPeerAuthentication, Meta: Meta{Namespace: ns, Name: name, Created: t0},
		PeerAuthentication: &securityv1beta1.PeerAuthentication{}}
	for _, f := range opts {
		f(o)
	}
	return o
}

const root = "istio-system"

// TestPeerAuthenticationScenarios covers ISTIO-SEMANTICS §1.6, sidecar scenarios 1–17: the
// effective (configured) mode per port.
func TestPeerAuthenticationScenarios(t *testing.T) {
	foo := map[string]string{"app": "foo", "stage": "prod"}
	cases := []struct {
		name   string
		pas    []*Object
		ns     string
		labels map[string]string
		ports  map[uint32]Mode // port → want; port 1 stands for "any other port"
		winner string          // name of the deciding policy for port 1, "" if none
	}{
		{"1 no policies is PERMISSIVE", nil, "foo", foo, map[uint32]Mode{1: ModePermissive}, ""},
		{"2 mesh STRICT", []*Object{mkPA(root, "m", mode(ModeStrict))}, "foo", foo, map[uint32]Mode{1: ModeStrict}, "m"},
		{"3 mesh with empty matchLabels counts as mesh; namespace PERMISSIVE wins",
			[]*Object{mkPA(root, "m", sel(), mode(ModeStrict)), mkPA("foo", "n", mode(ModePermissive))}, "foo", foo, map[uint32]Mode{1: ModePermissive}, "n"},
		{"4 root-namespace selector policy is ignored",
			[]*Object{mkPA(root, "r", sel("app", "foo"), mode(ModeStrict))}, "foo", foo, map[uint32]Mode{1: ModePermissive}, ""},
		{"5 namespace UNSET and workload without mtls is PERMISSIVE",
			[]*Object{mkPA("foo", "n"), mkPA("foo", "w", sel("app", "foo"))}, "foo", foo, map[uint32]Mode{1: ModePermissive}, ""},
		{"6 namespace PERMISSIVE beats mesh DISABLE",
			[]*Object{mkPA(root, "m", mode(ModeDisable)), mkPA("foo", "n", mode(ModePermissive))}, "foo", foo, map[uint32]Mode{1: ModePermissive}, "n"},
		{"7 mesh: oldest wins, tie broken by name",
			[]*Object{mkPA(root, "now", mode(ModeDisable), at(0)), mkPA(root, "second ago", mode(ModePermissive), at(-time.Second)),
				mkPA(root, "second later", mode(ModeStrict), at(-time.Second))}, "foo", foo, map[uint32]Mode{1: ModePermissive}, "second ago"},
		{"8 namespace: oldest wins, tie broken by name",
			[]*Object{mkPA("foo", "now", mode(ModeDisable), at(0)), mkPA("foo", "second ago", mode(ModePermissive), at(-time.Second)),
				mkPA("foo", "second later", mode(ModeStrict), at(-time.Second))}, "foo", foo, map[uint32]Mode{1: ModePermissive}, "second ago"},
		{"9 single oldest workload policy",
			[]*Object{mkPA("foo", "now", sel("app", "foo"), mode(ModeDisable), at(0)),
				mkPA("foo", "second ago", sel("app", "foo"), mode(ModePermissive), at(-time.Second)),
				mkPA("foo", "second later", sel("stage", "prod"), mode(ModeStrict), at(-time.Second))}, "foo", foo, map[uint32]Mode{1: ModePermissive}, "second ago"},
		{"10 mesh UNSET only is PERMISSIVE", []*Object{mkPA(root, "m")}, "foo", foo, map[uint32]Mode{1: ModePermissive}, ""},
		{"11 mesh STRICT plus workload without mtls", []*Object{mkPA(root, "m", mode(ModeStrict)), mkPA("foo", "w", sel("app", "foo"))}, "foo", foo, map[uint32]Mode{1: ModeStrict}, "m"},
		{"12 namespace STRICT plus workload without mtls", []*Object{mkPA("foo", "n", mode(ModeStrict)), mkPA("foo", "w", sel("app", "foo"))}, "foo", foo, map[uint32]Mode{1: ModeStrict}, "n"},
		{"13 UNSET chains up two levels", []*Object{mkPA(root, "m", mode(ModeStrict)), mkPA("foo", "n", mode(ModeUnset)), mkPA("foo", "w", sel("app", "foo"))}, "foo", foo, map[uint32]Mode{1: ModeStrict}, "m"},
		{"14 port-level DISABLE, UNSET and {} under mesh STRICT",
			[]*Object{mkPA(root, "m", mode(ModeStrict)), mkPA("foo", "w", sel("app", "foo"), port(80, ModeDisable), port(90, ModeUnset), port(100, ModeUnset))},
			"foo", foo, map[uint32]Mode{80: ModeDisable, 90: ModeStrict, 100: ModeStrict, 1: ModeStrict}, "m"},
		{"15 newer namespace default is dropped",
			[]*Object{mkPA("foo", "ignored-newer-default", mode(ModePermissive), at(time.Second)), mkPA("foo", "default", mode(ModeStrict))},
			"foo", foo, map[uint32]Mode{1: ModeStrict}, "default"},
		{"17 workload in root namespace selected by root selector policy: mesh applies",
			[]*Object{mkPA(root, "m", mode(ModePermissive)), mkPA(root, "w", sel("app", "foo"), mode(ModeStrict))}, root, foo, map[uint32]Mode{1: ModePermissive}, "m"},
		{"other namespaces' policies do not apply",
			[]*Object{mkPA("bar", "n", mode(ModeStrict)), mkPA("bar", "w", sel("app", "foo"), mode(ModeStrict))}, "foo", foo, map[uint32]Mode{1: ModePermissive}, ""},
		{"selector must be a subset of the labels",
			[]*Object{mkPA("foo", "w", sel("app", "foo", "version", "v2"), mode(ModeStrict))}, "foo", foo, map[uint32]Mode{1: ModePermissive}, ""},
		{"creation time beats name",
			[]*Object{mkPA(root, "a", mode(ModeStrict), at(time.Second)), mkPA(root, "b", mode(ModeDisable))}, "foo", foo, map[uint32]Mode{1: ModeDisable}, "b"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := ResolvePeerAuthentication(tc.pas, "", tc.ns, tc.labels)
			for p, want := range tc.ports {
				if got := res.PortMode(p); got != want {
					t.Errorf("port %d: got %v, want %v", p, got, want)
				}
			}
			got := ""
			if d := res.Decider(1); d != nil {
				got = d.Name
			}
			if got != tc.winner {
				t.Errorf("decider %q, want %q", got, tc.winner)
			}
		})
	}
}

// TestPeerAuthenticationAmbient covers §1.6 A1–A9 (scenarios 18–26): which DENY policy the
// ztunnel path enforces and whether plaintext is allowed per port.
func TestPeerAuthenticationAmbient(t *testing.T) {
	a := map[string]string{"app": "a"}
	b := map[string]string{"app": "b"}
	permissiveMeshStrictNS := []*Object{mkPA(root, "m", mode(ModePermissive)), mkPA("ns", "n", mode(ModeStrict))}
	type check struct {
		port      uint32
		plaintext string // the decision for a connection without identity
	}
	static := "deny by istio-system/istio_converted_static_strict"
	cases := []struct {
		name   string
		pas    []*Object
		labels map[string]string
		checks []check
	}{
		{"A1 namespace STRICT: every pod uses the static strict policy", permissiveMeshStrictNS, b, []check{{80, static}}},
		{"A2 plus workload STRICT: unchanged", append(permissiveMeshStrictNS, mkPA("ns", "w", sel("app", "a"), mode(ModeStrict))), a, []check{{80, static}}},
		{"A3 workload PERMISSIVE: plaintext allowed for app=a",
			append(permissiveMeshStrictNS, mkPA("ns", "w", sel("app", "a"), mode(ModePermissive))), a, []check{{80, "allow"}}},
		{"A3 other pods stay strict",
			append(permissiveMeshStrictNS, mkPA("ns", "w", sel("app", "a"), mode(ModePermissive))), b, []check{{80, static}}},
		{"A4 workload PERMISSIVE with 9090 STRICT",
			[]*Object{mkPA("ns", "w", sel("app", "a"), mode(ModePermissive), port(9090, ModeStrict))}, a,
			[]check{{9090, "deny by ns/converted_peer_authentication_w"}, {80, "allow"}}},
		{"A5 workload STRICT with 9090 PERMISSIVE: converted policy, not static",
			[]*Object{mkPA("ns", "w", sel("app", "a"), mode(ModeStrict), port(9090, ModePermissive))}, a,
			[]check{{9090, "allow"}, {80, "deny by ns/converted_peer_authentication_w"}}},
		{"A6 namespace STRICT, workload UNSET with 9090 PERMISSIVE",
			[]*Object{mkPA("ns", "n", mode(ModeStrict)), mkPA("ns", "w", sel("app", "a"), port(9090, ModePermissive))}, a,
			[]check{{9090, "allow"}, {80, "deny by ns/converted_peer_authentication_w"}}},
		{"A6 namespace later PERMISSIVE: conversion disappears",
			[]*Object{mkPA("ns", "n", mode(ModePermissive)), mkPA("ns", "w", sel("app", "a"), port(9090, ModePermissive))}, a,
			[]check{{9090, "allow"}, {80, "allow"}}},
		{"A7 mesh PERMISSIVE, namespace UNSET, 9090 STRICT and 8080 PERMISSIVE",
			[]*Object{mkPA(root, "m", mode(ModePermissive)), mkPA("ns", "n"), mkPA("ns", "w", sel("app", "a"), port(9090, ModeStrict), port(8080, ModePermissive))}, a,
			[]check{{9090, "deny by ns/converted_peer_authentication_w"}, {8080, "allow"}, {80, "allow"}}},
		{"A8 mesh STRICT, workload UNSET with 9090 PERMISSIVE and 8080 STRICT",
			[]*Object{mkPA(root, "m", mode(ModeStrict)), mkPA("ns", "w", sel("app", "a"), port(9090, ModePermissive), port(8080, ModeStrict))}, a,
			[]check{{9090, "allow"}, {8080, "deny by ns/converted_peer_authentication_w"}, {80, "deny by ns/converted_peer_authentication_w"}}},
		{"A9 workload DISABLE is not strict", []*Object{mkPA(root, "m", mode(ModeStrict)), mkPA("ns", "w", sel("app", "a"), mode(ModeDisable))}, a,
			[]check{{80, "allow"}}},
		{"port-level settings equal to the mode need no conversion",
			[]*Object{mkPA("ns", "w", sel("app", "a"), mode(ModeStrict), port(9090, ModeStrict))}, a, []check{{9090, static}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := Compile(tc.pas, nil, Options{})
			w := &Workload{Namespace: "ns", Name: "pod", Labels: tc.labels}
			cw := s.Compile(w)
			for _, c := range tc.checks {
				d := cw.EvaluateL4(from("", uint16(c.port)))
				if got := decisionOf(d); got != c.plaintext {
					t.Errorf("port %d plaintext: got %q, want %q", c.port, got, c.plaintext)
				}
				if cw.PeerAuth.PlaintextAllowed(c.port) != d.Allowed() {
					t.Errorf("port %d: PlaintextAllowed %v disagrees with decision %v", c.port, cw.PeerAuth.PlaintextAllowed(c.port), d)
				}
				if d := cw.EvaluateL4(from("ns/client", uint16(c.port))); !d.Allowed() {
					t.Errorf("port %d with identity: %v", c.port, d)
				}
			}
		})
	}
}

func TestPeerAuthenticationDuplicateWarning(t *testing.T) {
	s := Compile([]*Object{mkPA("foo", "default", mode(ModeStrict)), mkPA("foo", "ignored-newer-default", mode(ModePermissive), at(time.Second)),
		mkPA(root, "sel", sel("app", "x"), mode(ModeStrict))}, nil, Options{})
	if len(s.Warnings) != 2 {
		t.Fatalf("warnings %v", s.Warnings)
	}
}

func TestPeerAuthenticationCustomRootNamespace(t *testing.T) {
	pas := []*Object{mkPA("mesh-root", "m", mode(ModeStrict)), mkPA(root, "not-root", mode(ModeDisable))}
	if got := ResolvePeerAuthentication(pas, "mesh-root", "foo", nil).Mode; got != ModeStrict {
		t.Errorf("custom root namespace: %v", got)
	}
}
