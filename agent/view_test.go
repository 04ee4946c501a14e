package agent

import (
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/internal/cluster"
)

func TestViewRefusesAnAddressTwoPodsClaim(t *testing.T) {
	st, errs := cluster.Parse("dup.yaml", []byte(`
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: bookinfo}
spec: {serviceAccountName: a, nodeName: node-1}
status: {podIP: 10.77.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: bookinfo}
spec: {serviceAccountName: b, nodeName: node-1}
status: {podIP: 10.77.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: bookinfo}
spec: {serviceAccountName: c, nodeName: node-1}
status: {podIP: 10.77.1.11}
`))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	v := newView(st, "node-1", spiffeid.RequireTrustDomainFromString("cluster.local"), nil)
	if w := v.byIP[netip.MustParseAddr("10.77.1.10")]; w != nil {
		t.Fatalf("the contested address resolves to %s", w)
	}
	if len(v.conflicts) != 1 {
		t.Fatalf("conflicts %v", v.conflicts)
	}
	if w := v.localEnrolled(netip.MustParseAddr("10.77.1.11")); w == nil || w.pod.Name != "c" {
		t.Fatal("an uncontested pod was lost")
	}
}
