package main

import (
	"strings"
	"testing"
)

// testdata/run: raw, gotls (1 core over the iperf3 run at 2 Gbps) and veil (1.5 cores at
// 1.5 Gbps, 10 failed requests at 1000 qps, every keepalive-off request failed).
func TestReport(t *testing.T) {
	var out strings.Builder
	if err := run([]string{"testdata/run"}, &out); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{
		"throughput per tunnel core  veil 1.00 Gbps/core; gotls 2.00 Gbps/core: 0.50x",
		"added p50 at 1000 qps       veil 1.000 ms; gotls 0.500 ms: 2.00x (veil's run had 10 failed requests)",
		"added p99 at 1000 qps       veil 4.000 ms; gotls 2.000 ms: 2.00x",
		"new-connection p50          veil NA ms (veil's run had 8 failed requests)", // no stunnel in this run
		"RSS of agent-node-2 (peak)  30.0 MB",
		"gotls peak RSS: gotls-client 11.0 MB, gotls-server 10.0 MB; CPU 0.20 cores at 1000 qps",
		"veil: a note",
		"veil: the client retransmitted 12 SYNs during the keepalive-off run",
		"*          the run had failed requests",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("report lacks %q:\n%s", want, got)
		}
	}
	row := func(path string) []string {
		for _, line := range strings.Split(got, "\n") {
			if f := strings.Fields(line); len(f) > 0 && f[0] == path {
				return f
			}
		}
		t.Fatalf("no row for %s:\n%s", path, got)
		return nil
	}
	// path Gbps tun_cores Gbps/core p50 p99 +p50 +p99 cores@1k ka_err nc_p50 nc_p99 nc_err nc_qps rss
	if r := row("raw"); r[2] != "NA" || r[14] != "NA" || r[6] != "0.000" {
		t.Errorf("raw row %v: want no tunnel CPU or RSS, added latency 0", r)
	}
	if r := row("gotls"); r[1] != "2.00" || r[3] != "2.00" || r[6] != "0.500" || r[10] != "9.000" || r[14] != "21.0" {
		t.Errorf("gotls row %v", r)
	}
	if r := row("veil"); r[4] != "1.500*" || r[9] != "10" || r[10] != "NA" || r[12] != "8" {
		t.Errorf("veil row %v: want marked keepalive latencies, NA where every request failed", r)
	}
}
