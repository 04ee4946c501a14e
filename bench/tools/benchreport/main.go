// Command benchreport turns what bench/path.sh measured into its table and the veil targets.
//
//	benchreport DIR
//
// DIR holds metrics.tsv, lines of "path<TAB>key<TAB>value" in the order the paths ran, and
// the iperf3 and fortio JSON files it names. Keys (W is iperf, ka or nc: the iperf3 run,
// fortio with keepalive at 1000 qps, fortio with a new connection per request):
//
//	clk_tck          (path "-") clock ticks per second of /proc/PID/stat
//	procs            the tunnel processes as label:pid, space separated (none for raw)
//	W_json           the client's JSON output, relative to DIR
//	W_ticks, W_wall  the tunnel processes' utime+stime over W, and W's wall time in seconds
//	W_rc             the client's exit status
//	rss_kb:LABEL     peak VmRSS of one tunnel process over the path's runs
//	rss_sum_kb       peak of the summed VmRSS of the path's tunnel processes
//	nc_syn_retrans   SYNs the client pod retransmitted during the keepalive-off run
//	note             a line to print under the table
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
}

func run(args []string, w io.Writer) error {
	if len(args) != 1 {
		return errors.New("usage: benchreport DIR")
	}
	r, err := load(args[0])
	if err != nil {
		return err
	}
	r.print(w)
	return nil
}

// metrics is one path's raw measurements.
type metrics struct {
	kv    map[string]string
	notes []string
}

type report struct {
	dir   string
	clk   float64
	order []string
	m     map[string]*metrics
	res   map[string]*result
}

// result is one path's row.
type result struct {
	gbps, coresIperf, perCore     float64
	p50, p99, add50, add99, kaQPS float64
	coresKA                       float64
	kaErr, ncErr                  float64
	n50, n99, ncQPS, coresNC      float64
	rssSum                        float64
	rss                           map[string]float64 // MB by process label
	tunnel                        bool
}

var na = math.NaN()

func load(dir string) (*report, error) {
	f, err := os.Open(filepath.Join(dir, "metrics.tsv"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := &report{dir: dir, clk: 100, m: map[string]*metrics{}, res: map[string]*result{}}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		path, rest, ok1 := strings.Cut(sc.Text(), "\t")
		key, val, ok2 := strings.Cut(rest, "\t")
		if !ok1 || !ok2 {
			continue
		}
		if path == "-" {
			if key == "clk_tck" {
				if v, err := strconv.ParseFloat(val, 64); err == nil && v > 0 {
					r.clk = v
				}
			}
			continue
		}
		mm := r.m[path]
		if mm == nil {
			mm = &metrics{kv: map[string]string{}}
			r.m[path] = mm
			r.order = append(r.order, path)
		}
		if key == "note" {
			mm.notes = append(mm.notes, val)
		} else {
			mm.kv[key] = val
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	for _, p := range r.order {
		r.res[p] = r.compute(r.m[p])
	}
	if raw := r.res["raw"]; raw != nil {
		for _, res := range r.res {
			res.add50, res.add99 = res.p50-raw.p50, res.p99-raw.p99
		}
	}
	return r, nil
}

func (r *report) num(mm *metrics, key string) float64 {
	v, err := strconv.ParseFloat(mm.kv[key], 64)
	if err != nil {
		return na
	}
	return v
}

func (r *report) readJSON(mm *metrics, key string, v any) bool {
	name := mm.kv[key]
	if name == "" {
		return false
	}
	b, err := os.ReadFile(filepath.Join(r.dir, name))
	if err != nil {
		return false
	}
	return json.Unmarshal(b, v) == nil
}

// iperf3 -J, the part read here.
type iperfJSON struct {
	Error string `json:"error"`
	End   struct {
		SumReceived struct {
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
	} `json:"end"`
}

// fortio load -json, the part read here.
type fortioJSON struct {
	ActualQPS         float64
	RetCodes          map[string]float64
	DurationHistogram struct {
		Count       float64
		Percentiles []struct {
			Percentile float64
			Value      float64
		}
	}
}

// latency returns fortio's p50 and p99 in milliseconds, its achieved qps and the count of
// answers other than 200 (-1 is a socket error or timeout). fortio's percentiles count failed
// requests too (a timeout as its duration): when every request failed they are NA.
func (r *report) latency(mm *metrics, key string) (p50, p99, qps, errs float64) {
	var f fortioJSON
	if !r.readJSON(mm, key, &f) || f.DurationHistogram.Count == 0 {
		return na, na, na, na
	}
	defer func() {
		if errs >= f.DurationHistogram.Count {
			p50, p99 = na, na
		}
	}()
	p50, p99 = na, na
	for _, p := range f.DurationHistogram.Percentiles {
		switch p.Percentile {
		case 50:
			p50 = p.Value * 1e3
		case 99:
			p99 = p.Value * 1e3
		}
	}
	for code, n := range f.RetCodes {
		if code != "200" {
			errs += n
		}
	}
	return p50, p99, f.ActualQPS, errs
}

// cores is the tunnel processes' CPU over workload w, in cores.
func (r *report) cores(mm *metrics, w string) float64 {
	ticks, wall := r.num(mm, w+"_ticks"), r.num(mm, w+"_wall")
	if !(wall > 0) {
		return na
	}
	return ticks / r.clk / wall
}

func (r *report) compute(mm *metrics) *result {
	res := &result{rss: map[string]float64{}, tunnel: strings.TrimSpace(mm.kv["procs"]) != ""}
	res.gbps = na
	var ip iperfJSON
	if r.readJSON(mm, "iperf_json", &ip) && ip.Error == "" && ip.End.SumReceived.BitsPerSecond > 0 {
		res.gbps = ip.End.SumReceived.BitsPerSecond / 1e9
	}
	res.p50, res.p99, res.kaQPS, res.kaErr = r.latency(mm, "ka_json")
	res.n50, res.n99, res.ncQPS, res.ncErr = r.latency(mm, "nc_json")
	res.add50, res.add99 = na, na
	res.coresIperf, res.coresKA, res.coresNC, res.perCore, res.rssSum = na, na, na, na, na
	if res.tunnel {
		res.coresIperf, res.coresKA, res.coresNC = r.cores(mm, "iperf"), r.cores(mm, "ka"), r.cores(mm, "nc")
		if res.coresIperf > 0 {
			res.perCore = res.gbps / res.coresIperf
		}
		res.rssSum = r.num(mm, "rss_sum_kb") / 1024
		for k, v := range mm.kv {
			if label, ok := strings.CutPrefix(k, "rss_kb:"); ok {
				if kb, err := strconv.ParseFloat(v, 64); err == nil {
					res.rss[label] = kb / 1024
				}
			}
		}
	}
	return res
}

// marked formats a latency measured in a run that had errs failed requests: a * says the
// percentile counts them (each as long as it took to fail).
func marked(v float64, prec int, errs float64) string {
	if errs > 0 && !math.IsNaN(v) {
		return f(v, prec) + "*"
	}
	return f(v, prec)
}

func f(v float64, prec int) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "NA"
	}
	return strconv.FormatFloat(v, 'f', prec, 64)
}

var columns = []struct{ head, help string }{
	{"path", ""},
	{"Gbps", "iperf3, one stream"},
	{"tun_cores", "tunnel processes' CPU over the iperf3 run, in cores (both ends)"},
	{"Gbps/core", "Gbps per tunnel core"},
	{"p50_ms", "fortio 1 KiB, 1000 qps x 8 connections, keepalive"},
	{"p99_ms", ""},
	{"+p50_ms", "added against raw"},
	{"+p99_ms", ""},
	{"cores@1k", "tunnel CPU during the 1000 qps run"},
	{"ka_err", "non-200 answers at 1000 qps"},
	{"nc_p50_ms", "fortio keepalive off, 200 qps x 4: a new connection per request"},
	{"nc_p99_ms", ""},
	{"nc_err", "non-200 answers (socket errors, timeouts) with keepalive off"},
	{"nc_qps", "achieved qps with keepalive off"},
	{"rss_MB", "peak summed RSS of the tunnel processes (both ends)"},
}

func (r *report) print(w io.Writer) {
	rows := [][]string{}
	head := make([]string, len(columns))
	for i, c := range columns {
		head[i] = c.head
	}
	rows = append(rows, head)
	for _, p := range r.order {
		x := r.res[p]
		ka := func(v float64) string { return marked(v, 3, x.kaErr) }
		nc := func(v float64) string { return marked(v, 3, x.ncErr) }
		rows = append(rows, []string{p, f(x.gbps, 2), f(x.coresIperf, 2), f(x.perCore, 2),
			ka(x.p50), ka(x.p99), ka(x.add50), ka(x.add99), f(x.coresKA, 2), f(x.kaErr, 0),
			nc(x.n50), nc(x.n99), f(x.ncErr, 0), f(x.ncQPS, 0), f(x.rssSum, 1)})
	}
	width := make([]int, len(columns))
	for _, row := range rows {
		for i, c := range row {
			width[i] = max(width[i], len(c))
		}
	}
	for _, row := range rows {
		var b strings.Builder
		for i, c := range row {
			if i == 0 {
				fmt.Fprintf(&b, "%-*s", width[i], c)
			} else {
				fmt.Fprintf(&b, "  %*s", width[i], c)
			}
		}
		fmt.Fprintln(w, b.String())
	}
	fmt.Fprintln(w)
	for _, p := range r.order {
		if x := r.res[p]; x.kaErr > 0 || x.ncErr > 0 {
			fmt.Fprintln(w, "  *          the run had failed requests (ka_err, nc_err): its percentiles count them, each as long as it took to fail; NA: all failed")
			break
		}
	}
	for _, c := range columns[1:] {
		if c.help != "" {
			fmt.Fprintf(w, "  %-10s %s\n", c.head, c.help)
		}
	}
	for _, p := range r.order {
		x := r.res[p]
		if len(x.rss) > 0 {
			labels := make([]string, 0, len(x.rss))
			for l := range x.rss {
				labels = append(labels, l)
			}
			sort.Strings(labels)
			parts := make([]string, len(labels))
			for i, l := range labels {
				parts[i] = fmt.Sprintf("%s %s MB", l, f(x.rss[l], 1))
			}
			fmt.Fprintf(w, "  %s peak RSS: %s; CPU %s cores at 1000 qps, %s cores with keepalive off\n",
				p, strings.Join(parts, ", "), f(x.coresKA, 2), f(x.coresNC, 2))
		}
		if n := r.num(r.m[p], "nc_syn_retrans"); n > 0 {
			fmt.Fprintf(w, "  %s: the client retransmitted %s SYNs during the keepalive-off run (connections slow or failing to open)\n", p, f(n, 0))
		}
		for _, n := range r.m[p].notes {
			fmt.Fprintf(w, "  %s: %s\n", p, n)
		}
	}
	r.printTargets(w)
}

// printTargets prints veil against the plain Go tunnel and stunnel as ratios (veil /
// other): below 1 is better for latency, above 1 for throughput per core.
func (r *report) printTargets(w io.Writer) {
	v := r.res["veil"]
	if v == nil {
		return
	}
	type other struct {
		name string
		res  *result
	}
	gotls, stunnel := other{"gotls", r.res["gotls"]}, other{"stunnel", r.res["stunnel"]}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "veil against the others (ratio = veil / other):")
	ratio := func(label, unit string, prec int, get, errsOf func(*result) float64, others ...other) {
		line := fmt.Sprintf("  %-27s veil %s %s", label, f(get(v), prec), unit)
		for _, o := range others {
			if o.res == nil {
				continue
			}
			a, b := get(v), get(o.res)
			q := "NA"
			if a > 0 && b > 0 {
				q = f(a/b, 2) + "x"
			} else if !math.IsNaN(a) && !math.IsNaN(b) {
				q = "NA (not both > 0)"
			}
			line += fmt.Sprintf("; %s %s %s: %s", o.name, f(b, prec), unit, q)
		}
		if e := errsOf(v); e > 0 {
			line += fmt.Sprintf(" (veil's run had %s failed requests)", f(e, 0))
		}
		fmt.Fprintln(w, line)
	}
	none := func(*result) float64 { return 0 }
	kaErr := func(x *result) float64 { return x.kaErr }
	ratio("throughput per tunnel core", "Gbps/core", 2, func(x *result) float64 { return x.perCore }, none, gotls)
	ratio("added p50 at 1000 qps", "ms", 3, func(x *result) float64 { return x.add50 }, kaErr, gotls, stunnel)
	ratio("added p99 at 1000 qps", "ms", 3, func(x *result) float64 { return x.add99 }, kaErr, gotls, stunnel)
	ratio("new-connection p50", "ms", 3, func(x *result) float64 { return x.n50 }, func(x *result) float64 { return x.ncErr }, stunnel)
	labels := make([]string, 0, len(v.rss))
	for l := range v.rss {
		labels = append(labels, l)
	}
	sort.Strings(labels)
	for _, l := range labels {
		fmt.Fprintf(w, "  %-27s %s MB\n", "RSS of "+l+" (peak)", f(v.rss[l], 1))
	}
}
