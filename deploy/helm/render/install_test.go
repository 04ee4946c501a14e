package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/veilmesh/veil/internal/kubetest"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	helmkube "helm.sh/helm/v3/pkg/kube"
	appsv1 "k8s.io/api/apps/v1"
	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
)

// Helm installs, upgrades, uninstalls and reinstalls the chart on a real API server where
// some of its CRDs already exist: Istio's PeerAuthentication CRD from Istio's own chart
// (another Helm release) and the Gateway CRD applied with kubectl, as the Gateway API's
// instructions do. Helm refuses to take over an object another owner holds, so the chart
// must leave those alone; the CRDs it installed survive the uninstall.
func TestHelmInstallUpgradeUninstall(t *testing.T) {
	kc := kubetest.Start(t)
	crdFile := func(name string) string { return filepath.Join(chartDir, "files", "crds", name+".yaml") }
	const istioCRD, gatewayCRD, ownCRD = "peerauthentications.security.istio.io", "gateways.gateway.networking.k8s.io", "httproutes.gateway.networking.k8s.io"
	kc.Kubectl(t, "apply", "--server-side", "-f", crdFile(istioCRD))
	kc.Kubectl(t, "annotate", "crd", istioCRD, "meta.helm.sh/release-name=istio-base", "meta.helm.sh/release-namespace=istio-system")
	kc.Kubectl(t, "label", "crd", istioCRD, "app.kubernetes.io/managed-by=Helm")
	kc.Kubectl(t, "apply", "--server-side", "-f", crdFile(gatewayCRD))

	cfg := &action.Configuration{}
	if err := cfg.Init(helmkube.GetConfig(kc.Kubeconfig, "", Namespace), Namespace, "secret", t.Logf); err != nil {
		t.Fatal(err)
	}
	chrt, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	owner := func(name string) string {
		t.Helper()
		var crd apiextv1.CustomResourceDefinition
		if err := json.Unmarshal([]byte(kc.Kubectl(t, "get", "crd", name, "-o", "json")), &crd); err != nil {
			t.Fatal(err)
		}
		return crd.Annotations["meta.helm.sh/release-name"]
	}
	agentArgs := func() string {
		t.Helper()
		out, err := kc.Run("get", "daemonset", "-n", Namespace, "veil-agent", "-o", "json")
		if err != nil {
			return ""
		}
		var ds appsv1.DaemonSet
		if err := json.Unmarshal([]byte(out), &ds); err != nil {
			t.Fatal(err)
		}
		return strings.Join(ds.Spec.Template.Spec.Containers[0].Args, " ")
	}
	install := func() {
		t.Helper()
		inst := action.NewInstall(cfg)
		inst.ReleaseName, inst.Namespace, inst.CreateNamespace = ReleaseName, Namespace, true
		if _, err := inst.Run(chrt, nil); err != nil {
			t.Fatalf("helm install: %v", err)
		}
		if got := owner(istioCRD); got != "istio-base" {
			t.Errorf("Istio's CRD now belongs to %q", got)
		}
		if got := owner(gatewayCRD); got != "" {
			t.Errorf("the Gateway CRD applied with kubectl now belongs to %q", got)
		}
		if got := owner(ownCRD); got != ReleaseName {
			t.Errorf("%s belongs to %q, want the release", ownCRD, got)
		}
		if !strings.Contains(agentArgs(), "--log-level=info") {
			t.Errorf("agent args %q", agentArgs())
		}
	}
	install()

	// An upgrade renders the release's own CRDs again (they are its) and changes the agents.
	up := action.NewUpgrade(cfg)
	up.Namespace = Namespace
	if _, err := up.Run(ReleaseName, chrt, map[string]any{"logLevel": "debug"}); err != nil {
		t.Fatalf("helm upgrade: %v", err)
	}
	if !strings.Contains(agentArgs(), "--log-level=debug") {
		t.Errorf("after the upgrade the agent args are %q", agentArgs())
	}
	if got := owner(ownCRD); got != ReleaseName {
		t.Errorf("after the upgrade %s belongs to %q", ownCRD, got)
	}

	// Uninstalling removes veil and keeps every CRD.
	res, err := action.NewUninstall(cfg).Run(ReleaseName)
	if err != nil {
		t.Fatalf("helm uninstall: %v", err)
	}
	t.Logf("helm uninstall: %s", res.Info)
	if args := agentArgs(); args != "" {
		t.Errorf("the DaemonSet outlived the uninstall")
	}
	for _, crd := range []string{istioCRD, gatewayCRD, ownCRD} {
		if _, err := kc.Run("get", "crd", crd); err != nil {
			t.Errorf("CRD %s did not survive the uninstall", crd)
		}
	}

	// And installing again takes the kept CRDs back.
	install()

	// The release as Helm stored it is well under a Secret's 1 MiB, CRDs included.
	out := kc.Kubectl(t, "get", "secret", "-n", Namespace, "-l", "owner=helm,name="+ReleaseName, "-o", "jsonpath={.items[*].data.release}")
	if n := len(out); n == 0 || n > 900<<10 {
		t.Errorf("the stored release is %d bytes", n)
	}
}
