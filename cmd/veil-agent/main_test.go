package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/veilmesh/veil/controller"
	"github.com/veilmesh/veil/identity"
	"google.golang.org/grpc"
)

const pods = `
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews, namespace: bookinfo}
spec: {serviceAccountName: reviews, nodeName: node-1}
status: {podIP: 10.77.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings, namespace: bookinfo}
spec: {serviceAccountName: ratings, nodeName: node-2}
status: {podIP: 10.77.2.11}
`

// TestAgentFetchesCertificatesOfItsPods runs the agent binary's main against a real
// controller (CA and config stream): it learns its pods from the stream, obtains the
// certificate of its node's pod (and only that one), caches the config, and serves
// readiness, metrics and the admin endpoints.
func TestAgentFetchesCertificatesOfItsPods(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI must run the kernel tests as root: " + "needs root: the agent's listeners are transparent (CAP_NET_ADMIN); CI runs as root")
		}
		t.Skip("needs root: the agent's listeners are transparent (CAP_NET_ADMIN); CI runs as root")
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config")
	os.Mkdir(cfg, 0o755)
	os.WriteFile(filepath.Join(cfg, "pods.yaml"), []byte(pods), 0o644)
	token := "node-1-token-0123456789"
	os.WriteFile(filepath.Join(dir, "token"), []byte(token+"\n"), 0o600)

	ca, err := identity.LoadOrCreateCA(filepath.Join(dir, "ca"), identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	auth, _ := identity.NewNodeTokens(map[string]string{"node-1": token})
	// What veil-controller runs: the CA and the config stream from the directory.
	src := &controller.DirSource{Dir: cfg, Log: slog.New(slog.DiscardHandler)}
	first, err := src.Load()
	if err != nil {
		t.Fatal(err)
	}
	place := &controller.LivePlacement{}
	config := &controller.ConfigServer{Auth: auth, Source: src, Log: slog.New(slog.DiscardHandler),
		OnConfig: func(c *controller.Config) { place.Update(ca.TrustDomain(), c.Cluster.Pods) }}
	config.OnConfig(first)
	if _, err := config.Set(first); err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	configDone := make(chan error, 1)
	go func() { configDone <- config.Run(ctx) }()
	caDone := make(chan error, 1)
	go func() {
		caDone <- (&controller.CAServer{CA: ca, Auth: auth, Workloads: place, ServerNames: []string{"veil-controller"},
			Services: []interface{ Register(*grpc.Server) }{config}, Log: slog.New(slog.DiscardHandler)}).Serve(ctx, lis)
	}()

	pr, pw := io.Pipe()
	agentDone := make(chan error, 1)
	go func() {
		agentDone <- run(ctx, []string{
			"--node", "node-1", "--config-cache", filepath.Join(dir, "config.cache"), "--ca-addr", lis.Addr().String(),
			"--ca-root", filepath.Join(dir, "ca", identity.RootCertFile), "--token-file", filepath.Join(dir, "token"),
			"--capture=false", "--outbound-addr", "127.0.0.1:0", "--plaintext-addr", "127.0.0.1:0", "--hbone-addr", "127.0.0.1:0",
			"--metrics-addr", "127.0.0.1:0", "--ready-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
			"--handover-dir", filepath.Join(dir, "run"), "--drain-grace", "1s",
		}, pw, io.Discard)
		pw.Close()
	}()
	addrs := map[string]string{}
	sc := bufio.NewScanner(pr)
	for sc.Scan() && len(addrs) < 3 {
		// "veil-agent: metrics-addr on 127.0.0.1:1234"
		f := strings.Fields(sc.Text())
		if len(f) == 4 && f[2] == "on" {
			addrs[f[1]] = f[3]
		}
	}
	go io.Copy(io.Discard, pr)
	if len(addrs) < 3 {
		t.Fatalf("agent did not start: %v (run: %v)", addrs, <-agentDone)
	}
	get := func(addr, path string) (int, string) {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	var states []identity.CertState
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, body := get(addrs["admin-addr"], "/certs")
		states = nil
		json.Unmarshal([]byte(body), &states)
		if len(states) == 1 && states[0].State == "valid" || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(states) != 1 || states[0].ID != "spiffe://cluster.local/ns/bookinfo/sa/reviews" || states[0].State != "valid" {
		t.Fatalf("certificates %+v, want reviews' only, valid", states)
	}
	// Ready once the config is applied and the pods' certificates are loaded.
	if code, body := get(addrs["ready-addr"], "/healthz/ready"); code != 200 || !strings.HasPrefix(body, "ready (pid ") {
		t.Fatalf("ready: %d %q", code, body)
	}
	if _, body := get(addrs["metrics-addr"], "/metrics"); !strings.Contains(body, "go_goroutines") {
		t.Fatalf("metrics endpoint: %q", body)
	}
	// The trust bundle: the root of --ca-root, also the CA's answer, and the certificate's.
	root := identity.Fingerprint(ca.SigningRoot())
	var bundles []identity.BundleState
	_, body := get(addrs["admin-addr"], "/trust_bundle")
	if json.Unmarshal([]byte(body), &bundles); len(bundles) != 1 || len(bundles[0].Roots) != 1 || bundles[0].Roots[0].SHA256 != root || len(bundles[0].Roots[0].Sources) != 2 {
		t.Fatalf("/trust_bundle %s, want the CA's root from --ca-root and the CA's answer", body)
	}
	if states[0].RootSHA256 != root {
		t.Fatalf("/certs names root %q, want %q", states[0].RootSHA256, root)
	}
	if _, body := get(addrs["metrics-addr"], "/metrics"); !strings.Contains(body, `veil_trust_bundle_root{sha256="`+root+`"`) ||
		!strings.Contains(body, `veil_workload_certificates{root_sha256="`+root+`",trust_domain="cluster.local"} 1`) {
		t.Fatalf("metrics lack the trust bundle and the certificate's root: %s", body)
	}
	cancel()
	if err := <-agentDone; err != nil {
		t.Fatalf("agent: %v", err)
	}
	<-caDone
	<-configDone
	// The config that came over the stream was cached for the next start.
	if st, err := os.Stat(filepath.Join(dir, "config.cache")); err != nil || st.Size() == 0 {
		t.Fatalf("config cache: %v", err)
	}
}

func TestAgentRejectsMissingFlags(t *testing.T) {
	err := run(context.Background(), []string{"--node", "n"}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "--token-file") || !strings.Contains(err.Error(), "--ca-addr") {
		t.Fatalf("error %v, want one naming the missing flags", err)
	}
}

// A node where Istio's ztunnel runs (it serves istio-cni's socket) is refused: both would
// capture the same ambient pods.
func TestAgentRefusesANodeWithZtunnel(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ztunnel.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := checkNoZtunnel(sock); err == nil || !strings.Contains(err.Error(), "ztunnel captures this node's ambient pods") {
		t.Fatalf("checkNoZtunnel with ztunnel running: %v", err)
	}
	l.Close()
	if err := checkNoZtunnel(sock); err != nil {
		t.Fatalf("checkNoZtunnel without ztunnel: %v", err)
	}
	if err := checkNoZtunnel(""); err != nil {
		t.Fatal(err)
	}
}

// The agent keeps veil-cni chained: when the primary CNI rewrites its configuration, the
// entry is back well before the 5 s fallback check (the directory is watched).
func TestInstallCNIPutsTheEntryBack(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "10-kindnet.conflist")
	orig := `{"cniVersion":"1.0.0","name":"kindnet","plugins":[{"type":"ptp"}]}`
	if err := os.WriteFile(conf, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	o := cniOptions{socket: "/var/run/veil/cni.sock", confDir: dir, hostConfDir: "/etc/cni/net.d", kubeconfig: "/etc/cni/net.d/veil-cni.kubeconfig"}
	if err := installCNI(ctx, o, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	chained := func() bool {
		b, _ := os.ReadFile(conf)
		return strings.Contains(string(b), `"veil-cni"`)
	}
	if !chained() {
		t.Fatal("veil-cni not chained at start")
	}
	for i := range 3 {
		if err := os.WriteFile(conf, []byte(orig), 0o644); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		for !chained() {
			if time.Since(start) > 2*time.Second {
				t.Fatalf("rewrite %d: veil-cni not chained again within 2 s", i)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}
