package waypoint

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The benchmark's load generator and endpoint run in a helper process (this test binary
// again, with benchHelperEnv set), so that the benchmark process's CPU time is the
// proxy's alone: getrusage(RUSAGE_SELF) per request is then the proxy's CPU per request.
const benchHelperEnv = "VEIL_WAYPOINT_BENCH_HELPER"

// benchConns is the number of client connections (each a keep-alive HTTP/1.1 stream).
const benchConns = 8

// benchHelper is the helper process: it serves a small GET on loopback, prints
// "UP addr", then for each "RUN proxy n conns" line on stdin sends n requests to proxy
// over conns keep-alive connections and prints "DONE failures".
func benchHelper() int {
	body := []byte("hello, waypoint\n")
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println("ERR", err)
		return 1
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(body)
	})}
	go srv.Serve(lis)
	fmt.Println("UP", lis.Addr().String())
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var addr string
		var n, conns int
		if _, err := fmt.Sscanf(in.Text(), "RUN %s %d %d", &addr, &n, &conns); err != nil {
			fmt.Println("ERR", err)
			return 1
		}
		fmt.Println("DONE", load(addr, n, conns))
	}
	srv.Close()
	return 0
}

// load sends n GETs to addr over conns connections; it returns how many failed.
func load(addr string, n, conns int) int {
	var wg sync.WaitGroup
	var mu sync.Mutex
	failed := 0
	for i := range conns {
		share := n / conns
		if i < n%conns {
			share++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			f := func() int {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					return share
				}
				defer c.Close()
				br := bufio.NewReader(c)
				req := &http.Request{Method: "GET"}
				for j := range share {
					if _, err := io.WriteString(c, "GET /bench/item?id=7 HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: bench\r\n\r\n"); err != nil {
						return share - j
					}
					resp, err := http.ReadResponse(br, req)
					if err != nil {
						return share - j
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						return share - j
					}
				}
				return 0
			}()
			mu.Lock()
			failed += f
			mu.Unlock()
		}()
	}
	wg.Wait()
	return failed
}

// benchLoad drives the helper process.
type benchLoad struct {
	cmd      *exec.Cmd
	in       io.WriteCloser
	out      *bufio.Scanner
	upstream netip.AddrPort
}

func startLoad(b *testing.B) *benchLoad {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), benchHelperEnv+"=1")
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	outp, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	l := &benchLoad{cmd: cmd, in: in, out: bufio.NewScanner(outp)}
	b.Cleanup(func() {
		in.Close()
		cmd.Wait()
	})
	if !l.out.Scan() {
		b.Fatal("bench helper: no output")
	}
	up, ok := strings.CutPrefix(l.out.Text(), "UP ")
	if !ok {
		b.Fatalf("bench helper: %s", l.out.Text())
	}
	l.upstream = netip.MustParseAddrPort(up)
	return l
}

// run sends n requests through the proxy at addr and reports its CPU per request.
func (l *benchLoad) run(b *testing.B, addr string) (cpuPerReq time.Duration) {
	b.Helper()
	cpu0 := cpuTime()
	b.ResetTimer()
	start := time.Now()
	fmt.Fprintf(l.in, "RUN %s %d %d\n", addr, b.N, benchConns)
	if !l.out.Scan() {
		b.Fatal("bench helper: no answer")
	}
	elapsed := time.Since(start)
	b.StopTimer()
	cpu := cpuTime() - cpu0
	f, ok := strings.CutPrefix(l.out.Text(), "DONE ")
	if failed, _ := strconv.Atoi(f); !ok || failed != 0 {
		b.Fatalf("bench helper: %s", l.out.Text())
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "req/s")
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
	return cpu / time.Duration(b.N)
}

// cpuTime is this process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkProxyHTTP1 measures the proxy on its common path, keep-alive HTTP/1.1 small
// GETs over loopback TCP to a real endpoint, with a trivial Decide and metrics on,
// against net/http's httputil.ReverseProxy over the same sockets in the same run.
// cpu-ns/op is the proxy process's user+system CPU time per request; the load generator
// and the endpoint run in another process. The ratio sub-benchmark reports veil's CPU
// per request over ReverseProxy's.
func BenchmarkProxyHTTP1(b *testing.B) {
	l := startLoad(b)
	var veil, rp time.Duration
	b.Run("veil", func(b *testing.B) {
		m, err := NewMetrics(prometheus.NewRegistry())
		if err != nil {
			b.Fatal(err)
		}
		p := &Proxy{Metrics: m}
		ps := startProxy(b, p, func(*proxyServer) *Route {
			return &Route{
				Protocol: ProtocolHTTP1,
				Decide: func(r *http.Request) (Upstream, *Response) {
					if r.Method != http.MethodGet {
						return Upstream{}, &Response{Status: http.StatusForbidden, Body: "RBAC: access denied"}
					}
					return Upstream{Addr: l.upstream}, nil
				},
				Labels: MetricLabels{SourceWorkload: "bench", SourceNamespace: "bench", DestinationService: "bench.bench.svc.cluster.local"},
			}
		})
		b.ReportAllocs()
		veil = l.run(b, ps.addr)
	})
	b.Run("reverseproxy", func(b *testing.B) {
		target := &url.URL{Scheme: "http", Host: l.upstream.String()}
		tr := &http.Transport{MaxIdleConnsPerHost: 2 * benchConns, DisableCompression: true}
		rev := &httputil.ReverseProxy{
			Rewrite:    func(pr *httputil.ProxyRequest) { pr.SetURL(target); pr.Out.Host = pr.In.Host },
			Transport:  tr,
			BufferPool: bufferPool{},
		}
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		srv := &http.Server{Handler: rev}
		go srv.Serve(lis)
		defer func() {
			srv.Shutdown(context.Background())
			tr.CloseIdleConnections()
		}()
		b.ReportAllocs()
		rp = l.run(b, lis.Addr().String())
	})
	if veil > 0 && rp > 0 {
		// A sub-benchmark of its own, so that the ratio is printed with the results.
		b.Run("ratio", func(b *testing.B) {
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(float64(veil)/float64(rp), "veil/reverseproxy-cpu")
		})
	}
}

// bufferPool is a ReverseProxy BufferPool (without one it allocates 32 KiB a request).
type bufferPool struct{}

func (bufferPool) Get() []byte  { return *copyPool.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { copyPool.Put(&b) }
