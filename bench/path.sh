#!/usr/bin/env bash
# bench/path.sh: `make bench-path`. What veil's data path costs, against raw TCP, a plain Go
# TLS tunnel (bench/tools/gotls) and stunnel, measured in one run over one two-node lab
# (bench/lab.yaml: pod -> node-1 -> node-2 -> pod). See bench/README.md.
#
#   sudo make bench-path           builds bin/, installs what is missing, runs this (~3 minutes)
#   sudo QUICK=1 bench/path.sh     a few seconds per measurement, to try the harness
#   sudo bench/path.sh --cleanup   remove the lab of a run that was killed with -9
#
# Environment: BENCH_PATHS (raw gotls stunnel veil), BENCH_IPERF_SECS (10), BENCH_KA_SECS (15),
# BENCH_NC_SECS (10), BENCH_FORTIO_TIMEOUT (2s), BENCH_OUT (keep the raw results there),
# BENCH_LAB (lab name, bench), BIN (veil binaries, ./bin), QUICK=1 (3 s per measurement),
# BENCH_PROFILE_DIR (CPU profiles of both agents over the veil iperf3 run go there).
set -uo pipefail
export LC_ALL=C # EPOCHREALTIME with a dot
export PATH=$PATH:/usr/local/go/bin # sudo's secure_path leaves Go out

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/bin}
VEILCTL=$BIN/veilctl
SPEC=$ROOT/bench/lab.yaml
LAB=${BENCH_LAB:-bench}
PATHS=${BENCH_PATHS:-raw gotls stunnel veil}
if [ "${QUICK:-0}" = 1 ]; then d_iperf=3 d_ka=3 d_nc=3; else d_iperf=10 d_ka=15 d_nc=10; fi
IPERF_SECS=${BENCH_IPERF_SECS:-$d_iperf}
KA_SECS=${BENCH_KA_SECS:-$d_ka}
NC_SECS=${BENCH_NC_SECS:-$d_nc}
FORTIO_TIMEOUT=${BENCH_FORTIO_TIMEOUT:-2s}

# Ports: the backends in the server pods, and the tunnels' ends on the nodes.
IPERF_PORT=5201 FORTIO_PORT=8080 TUN_PLAIN_PORT=7000 TUN_TLS_PORT=7443
SERVER_NAME="node-2.bench.test" # the name in the gotls/stunnel server certificate

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- processes: everything is stopped by PID
SERVER_PIDS=() # veilctl lab exec wrappers of the backends (stopped with INT: they kill their child)
TUN_PIDS=()    # tunnel processes of the gotls/stunnel path that is up
PROCS=()       # label:pid of the tunnel processes measured now
CLIENT_PID='' SAMPLER_PID='' IPERF_PID='' WORK='' LAB_UP=''

alive() { # PID exists and is not a zombie
	local s
	{ read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
	s=${s##*) }
	[[ ${s:0:1} != Z ]]
}

stop_pids() { # SIGNAL PID...: signal, up to 5 s grace, then KILL; reap our children
	local sig=$1 p i left
	shift
	(($#)) || return 0
	for p in "$@"; do kill "-$sig" "$p" 2>/dev/null; done
	for i in {1..50}; do
		left=0
		for p in "$@"; do alive "$p" && left=1; done
		((left)) || break
		sleep 0.1
	done
	for p in "$@"; do alive "$p" && kill -KILL "$p" 2>/dev/null; done
	for p in "$@"; do { wait "$p"; } 2>/dev/null; done
	return 0
}

cleanup() {
	local rc=$?
	trap - EXIT
	trap '' INT TERM # a second Ctrl-C must not cut the cleanup short
	set +e
	((rc == 0)) || log "exit $rc: cleaning up"
	stop_pids INT $CLIENT_PID
	stop_pids TERM $SAMPLER_PID "${TUN_PIDS[@]}"
	stop_pids INT $IPERF_PID "${SERVER_PIDS[@]}"
	if [ -n "$LAB_UP" ]; then # also stops whatever is left in the lab's namespaces
		local f
		if ((rc != 0)); then # the lab's logs go with it: show their ends
			for f in "/run/veil-lab/$LAB/logs/"{controller,agent-node-1,agent-node-2}.log; do
				[ -s "$f" ] && { echo "--- last lines of $f" && tail -n 5 "$f"; } >&2
			done
		fi
		[ -n "${BENCH_OUT:-}" ] && cp -r "/run/veil-lab/$LAB/logs" "$OUT/lab-logs" 2>/dev/null
		"$VEILCTL" lab down --name "$LAB" >&2 || log "veilctl lab down --name $LAB failed: run it again"
	fi
	[ -n "$WORK" ] && rm -rf -- "$WORK"
	exit "$rc"
}

# ---- the lab
lab_exists() {
	[ -e "/run/veil-lab/$LAB" ] && return 0
	ip netns list | awk '{ print $1 }' | grep -q "^veil-$LAB-"
}
in_pod() { "$VEILCTL" lab exec --name "$LAB" "$@"; }                 # POD -- CMD...
in_node() { local n=$1; shift; nsenter --net="/run/netns/veil-$LAB-$n" -- "$@"; } # NODE CMD...

wait_listen() { # where(pod|node) NAME PORT: until something listens on PORT there (10 s)
	local i
	for i in {1..100}; do
		if [ "$1" = pod ]; then
			[ -n "$(in_pod "$2" -- ss -Hltn "sport = :$3" 2>/dev/null)" ] && return 0
		else
			[ -n "$(in_node "$2" ss -Hltn "sport = :$3" 2>/dev/null)" ] && return 0
		fi
		sleep 0.1
	done
	die "nothing listens on port $3 in $1 $2 after 10 s"
}

start_backend() { # POD NAME CMD...: a server in a pod, in the background, for the whole run
	local pod=$1 name=$2
	shift 2
	# Not through in_pod: $! must be veilctl's own PID (a function would run in a subshell).
	"$VEILCTL" lab exec --name "$LAB" "$pod" -- "$@" >>"$OUT/$name.log" 2>&1 &
	SERVER_PIDS+=($!)
}

http_ok() { # POD URL: one GET from the pod is answered 200 (fortio curl prints the headers on stderr)
	in_pod "$1" -- timeout 5 "$FORTIO" curl -quiet -timeout 2s "$2" 2>&1 >/dev/null | grep -q '^HTTP/1.1 200'
}

# ---- the paths. path_up PATH PORT starts the path to the backend on PORT and sets CLIENT (the
# pod that dials), TARGET (what it dials, host:port) and PROCS (label:pid of the tunnel
# processes to measure).
tunnel() { # NODE LABEL CMD...
	local node=$1 label=$2
	shift 2
	# nsenter execs CMD, so $! is the tunnel process itself (not through in_node: a function
	# would run in a subshell).
	nsenter --net="/run/netns/veil-$LAB-$node" -- "$@" >>"$OUT/$label.log" 2>&1 &
	TUN_PIDS+=($!)
	PROCS+=("$label:$!")
}

stunnel_conf() { # FILE LINE...: a service with mutual TLS 1.3
	local file=$1
	shift
	{
		printf '%s\n' "foreground = yes" "pid =" "syslog = no" "[bench]" "debug = warning" "$@"
		printf '%s\n' "CAfile = $CERTS/ca.crt" "verifyChain = yes" "sslVersionMin = TLSv1.3" \
			"ciphersuites = TLS_AES_128_GCM_SHA256" "socket = l:TCP_NODELAY=1" "socket = r:TCP_NODELAY=1"
	} >"$file"
}

path_up() { # PATH PORT
	local path=$1 port=$2
	TUN_PIDS=() PROCS=()
	case $path in
	raw)
		CLIENT=plain/client TARGET=$PLAIN_SERVER_IP:$port
		;;
	gotls)
		CLIENT=plain/client TARGET=$GW1:$TUN_PLAIN_PORT
		tunnel node-2 gotls-server "$GOTLS" server -dir "$CERTS" -listen "$NODE2_IP:$TUN_TLS_PORT" \
			-backend "$PLAIN_SERVER_IP:$port"
		tunnel node-1 gotls-client "$GOTLS" client -dir "$CERTS" -listen "$TARGET" \
			-peer "$NODE2_IP:$TUN_TLS_PORT" -server-name "$SERVER_NAME"
		;;
	stunnel)
		CLIENT=plain/client TARGET=$GW1:$TUN_PLAIN_PORT
		stunnel_conf "$WORK/stunnel-server.conf" "accept = $NODE2_IP:$TUN_TLS_PORT" \
			"connect = $PLAIN_SERVER_IP:$port" "cert = $CERTS/server.crt" "key = $CERTS/server.key" \
			"requireCert = yes"
		# sessionResume = no: a full handshake per connection, as gotls does.
		stunnel_conf "$WORK/stunnel-client.conf" "client = yes" "accept = $TARGET" \
			"connect = $NODE2_IP:$TUN_TLS_PORT" "cert = $CERTS/client.crt" "key = $CERTS/client.key" \
			"checkHost = $SERVER_NAME" "sessionResume = no"
		tunnel node-2 stunnel-server "$STUNNEL" "$WORK/stunnel-server.conf"
		tunnel node-1 stunnel-client "$STUNNEL" "$WORK/stunnel-client.conf"
		;;
	veil) # the agents are up for the whole run; the client dials the server pod itself
		CLIENT=mesh/client TARGET=$MESH_SERVER_IP:$port
		PROCS=("agent-node-1:$AGENT1" "agent-node-2:$AGENT2")
		;;
	esac
	if ((${#TUN_PIDS[@]})); then
		wait_listen node node-2 "$TUN_TLS_PORT"
		wait_listen node node-1 "$TUN_PLAIN_PORT"
	fi
	local lp
	for lp in "${PROCS[@]}"; do
		alive "${lp##*:}" || die "$path: tunnel process ${lp%%:*} (pid ${lp##*:}) is not running, see $OUT/${lp%%:*}.log"
	done
}

path_down() {
	stop_pids TERM "${TUN_PIDS[@]}"
	TUN_PIDS=() PROCS=()
}

# ---- measurement
metric() { printf '%s\t%s\t%s\n' "$@" >>"$OUT/metrics.tsv"; }

ticks_of() { # PID: utime+stime in clock ticks over all its threads (0 when gone)
	local s f
	{ read -r s <"/proc/$1/stat"; } 2>/dev/null || { echo 0; return; }
	s=${s##*) }
	read -ra f <<<"$s"
	echo $((f[11] + f[12]))
}

tunnel_ticks() {
	local lp t=0
	for lp in "${PROCS[@]}"; do t=$((t + $(ticks_of "${lp##*:}"))); done
	echo "$t"
}

rss_of() { # PID: sets RSS_KB (VmRSS, 0 when gone), without forking
	local k v
	RSS_KB=0
	{ while read -r k v _; do
		if [[ $k == VmRSS: ]]; then RSS_KB=$v; break; fi
	done <"/proc/$1/status"; } 2>/dev/null
}

sampler() { # label:pid...: every 0.25 s, the peak RSS of each and of their sum into $WORK/rss
	trap 'exit 0' TERM # finish the write under way first
	local -A peak=()
	local lp sum sumpeak=0 up
	for lp in "$@"; do peak[${lp%%:*}]=0; done
	while :; do
		sum=0 up=0
		for lp in "$@"; do
			rss_of "${lp##*:}"
			sum=$((sum + RSS_KB))
			((RSS_KB > peak[${lp%%:*}])) && peak[${lp%%:*}]=$RSS_KB up=1
		done
		((sum > sumpeak)) && sumpeak=$sum up=1
		if ((up)); then
			{
				for lp in "${!peak[@]}"; do printf '%s %s\n' "$lp" "${peak[$lp]}"; done
				printf 'sum %s\n' "$sumpeak"
			} >"$WORK/rss"
		fi
		sleep 0.25
	done
}

declare -A RSS_PEAK=() # label (and "sum") -> peak kB over the path's runs

# measure PATH W LIMIT JSON STDOUT CMD...: runs CMD in $CLIENT (at most LIMIT seconds) and records
# the tunnel processes' CPU and peak RSS over it; JSON is the client's result file, in $OUT.
measure() {
	local path=$1 w=$2 limit=$3 json=$4 stdout=$5 c0 c1 t0 t1 rc us label kb
	shift 5
	: >"$WORK/rss"
	if ((${#PROCS[@]})); then
		sampler "${PROCS[@]}" &
		SAMPLER_PID=$!
	fi
	c0=$(tunnel_ticks)
	t0=${EPOCHREALTIME/./}
	timeout -s INT -k 5 "$limit" "$VEILCTL" lab exec --name "$LAB" "$CLIENT" -- "$@" \
		>"$stdout" 2>"$OUT/$path-$w.log" &
	CLIENT_PID=$!
	wait "$CLIENT_PID"
	rc=$?
	CLIENT_PID=
	t1=${EPOCHREALTIME/./}
	c1=$(tunnel_ticks)
	stop_pids TERM $SAMPLER_PID
	SAMPLER_PID=
	local at1k=''
	while read -r label kb; do
		((kb > ${RSS_PEAK[$label]:-0})) && RSS_PEAK[$label]=$kb
		[ "$w" = ka ] && [ "$label" != sum ] && at1k+="${at1k:+, }$label $((kb / 1024)) MB"
	done <"$WORK/rss"
	[ -n "$at1k" ] && metric "$path" note "peak RSS at 1000 qps (before any bulk transfer): $at1k"
	us=$((t1 - t0))
	local lp ticks=$((c1 - c0))
	for lp in "${PROCS[@]}"; do
		if ! alive "${lp##*:}"; then # its CPU time went with it
			log "warning: $path: ${lp%%:*} died during $w"
			metric "$path" note "$w: ${lp%%:*} died during the run"
			ticks=NA
		fi
	done
	metric "$path" "${w}_json" "$json"
	metric "$path" "${w}_ticks" "$ticks"
	metric "$path" "${w}_wall" "$(printf '%d.%06d' $((us / 1000000)) $((us % 1000000)))"
	metric "$path" "${w}_rc" "$rc"
	if ((rc == 124 || rc == 137)); then
		log "warning: $path/$w: the client was stopped after ${limit}s"
		metric "$path" note "$w: the client did not finish within ${limit}s and was stopped"
	elif ((rc != 0)); then
		log "warning: $path/$w: the client exited $rc: $(tail -n 3 "$OUT/$path-$w.log" 2>/dev/null | tr '\n' ' ')"
		metric "$path" note "$w: the client exited $rc"
	fi
	return 0
}

fortio_load() { # PATH W SECS FLAGS...: 1 KiB POSTs to the echo server for SECS seconds
	local path=$1 w=$2 secs=$3
	shift 3
	measure "$path" "$w" $((secs + 20)) "$path-fortio-$w.json" "$OUT/$path-$w.out" "$FORTIO" load -quiet \
		-allow-initial-errors -r 0.00001 -timeout "$FORTIO_TIMEOUT" -payload-size 1024 -t "${secs}s" \
		-json "$OUT/$path-fortio-$w.json" "$@" "http://$TARGET/echo"
}

syn_retrans() { # POD: the pod's count of retransmitted SYNs (TcpExt TCPSynRetrans), or empty
	in_pod "$1" -- cat /proc/net/netstat 2>/dev/null | awk '
		$1 == "TcpExt:" && !h { for (i = 2; i <= NF; i++) if ($i == "TCPSynRetrans") c = i; h = 1; next }
		$1 == "TcpExt:" && c { print $c }'
}

mtls_opened() { # the node-2 agent's count of mutual_tls connections it accepted for mesh/server
	in_node node-2 timeout 5 "$FORTIO" curl -quiet "http://127.0.0.1:15020/metrics" 2>/dev/null |
		awk '/^istio_tcp_connections_opened_total\{/ && /reporter="destination"/ &&
			/connection_security_policy="mutual_tls"/ && /destination_workload="server"/ &&
			/destination_workload_namespace="mesh"/ { n += $NF } END { printf "%d\n", n }'
}

run_path() {
	local path=$1 server=plain/server
	[ "$path" = veil ] && server=mesh/server
	RSS_PEAK=()

	log "== $path: fortio 1 KiB, 1000 qps x 8 keepalive ${KA_SECS}s; 200 qps x 4 keepalive off ${NC_SECS}s"
	path_up "$path" "$FORTIO_PORT"
	local before=''
	case $path in
	gotls | stunnel)
		local check
		check=$(in_node node-1 timeout 15 "$GOTLS" probe -dir "$CERTS" -peer "$NODE2_IP:$TUN_TLS_PORT" \
			-server-name "$SERVER_NAME" 2>&1) || die "$path: TLS check of the tunnel failed: $check"
		log "$path: TLS check: $check"
		;;
	veil)
		local i # the first connection waits for both pods' certificates
		for i in {1..30}; do
			http_ok "$CLIENT" "http://$TARGET/" && break
			((i < 30)) || die "veil: mesh/client cannot reach mesh/server through the mesh in 30 s"
			sleep 1
		done
		before=$(mtls_opened)
		;;
	esac
	fortio_load "$path" ka "$KA_SECS" -qps 1000 -c 8
	local syn0 syn1
	syn0=$(syn_retrans "$CLIENT")
	fortio_load "$path" nc "$NC_SECS" -qps 200 -c 4 -keepalive=false
	syn1=$(syn_retrans "$CLIENT")
	[ -n "$syn0" ] && [ -n "$syn1" ] && metric "$path" nc_syn_retrans $((syn1 - syn0))
	if [ "$path" = veil ]; then
		local after n
		for n in node-1 node-2; do
			in_node "$n" timeout 5 "$FORTIO" curl -quiet "http://127.0.0.1:15020/metrics" >"$OUT/veil-agent-$n.metrics" 2>/dev/null
		done
		after=$(mtls_opened)
		metric veil note "node-2's agent accepted $((after - before)) mutual_tls connections for mesh/server during the fortio runs"
	fi
	path_down

	# iperf3 last: the memory bulk transfer takes is not counted in the 1000 qps figures.
	log "== $path: iperf3, one stream, ${IPERF_SECS}s"
	"$VEILCTL" lab exec --name "$LAB" "$server" -- iperf3 -s -1 -p "$IPERF_PORT" >>"$OUT/iperf3-server.log" 2>&1 &
	IPERF_PID=$!
	wait_listen pod "$server" "$IPERF_PORT"
	path_up "$path" "$IPERF_PORT"
	local lp procs=''
	for lp in "${PROCS[@]}"; do procs+="$lp "; done
	metric "$path" procs "$procs"
	[ -n "$procs" ] && log "$path: tunnel processes (label:pid) $procs"
	local prof=()
	if [ "$path" = veil ] && [ -n "${BENCH_PROFILE_DIR:-}" ]; then
		# CPU profiles of both agents over the iperf3 run (their admin endpoint, pprof).
		mkdir -p "$BENCH_PROFILE_DIR"
		local n
		for n in node-1 node-2; do
			in_node "$n" curl -s -o "$BENCH_PROFILE_DIR/agent-$n.pprof" \
				"http://127.0.0.1:15000/debug/pprof/profile?seconds=$((IPERF_SECS > 3 ? IPERF_SECS - 2 : 1))" &
			prof+=($!)
		done
	fi
	measure "$path" iperf $((IPERF_SECS + 20)) "$path-iperf.json" "$OUT/$path-iperf.json" \
		iperf3 -c "${TARGET%:*}" -p "${TARGET##*:}" -t "$IPERF_SECS" -J --connect-timeout 5000
	[ ${#prof[@]} -eq 0 ] || wait "${prof[@]}" || true
	path_down
	stop_pids INT $IPERF_PID
	IPERF_PID=

	local label
	for label in "${!RSS_PEAK[@]}"; do
		if [ "$label" = sum ]; then metric "$path" rss_sum_kb "${RSS_PEAK[$label]}"; else metric "$path" "rss_kb:$label" "${RSS_PEAK[$label]}"; fi
	done
}

main() {
	case ${1:-} in
	-h | --help) sed -n '2,12p' "$0"; exit 0 ;;
	--cleanup) [ "$(id -u)" = 0 ] || die "needs root"; exec "$VEILCTL" lab down --name "$LAB" ;;
	"") ;;
	*) die "unknown argument $1 (try --help)" ;;
	esac
	[ "$(id -u)" = 0 ] || die "needs root (network namespaces, eBPF): sudo make bench-path"
	local p t
	for p in $PATHS; do
		case $p in raw | gotls | stunnel | veil) ;; *) die "BENCH_PATHS: unknown path $p (raw gotls stunnel veil)" ;; esac
	done
	for t in IPERF_SECS KA_SECS NC_SECS; do
		[[ ${!t} =~ ^[1-9][0-9]*$ ]] || die "BENCH_$t must be a whole number of seconds, got '${!t}'"
	done
	for t in iperf3 ip ss nsenter timeout go; do
		command -v "$t" >/dev/null || die "$t not found: run ./scripts/deps.sh bench (make bench-path does)"
	done
	STUNNEL=$(command -v stunnel4 || command -v stunnel) || die "stunnel not found: run ./scripts/deps.sh bench"
	for t in veilctl veil-agent veil-controller; do
		[ -x "$BIN/$t" ] || die "$BIN/$t not found: run make build"
	done
	lab_exists && die "lab $LAB exists (an earlier run killed with -9?): run '$0 --cleanup' (veilctl lab down --name $LAB)"

	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	WORK=$(mktemp -d -t veil-bench.XXXXXX) || die "mktemp"
	OUT=${BENCH_OUT:-$WORK/out}
	mkdir -p "$OUT" || die "cannot create $OUT"
	: >"$OUT/metrics.tsv"
	log "paths: $PATHS; iperf3 ${IPERF_SECS}s, fortio keepalive ${KA_SECS}s, keepalive off ${NC_SECS}s"

	log "building gotls, fortio and benchreport (bench/tools)"
	go -C "$ROOT/bench/tools" build -o "$WORK/bin/" ./gotls ./benchreport fortio.org/fortio ||
		die "go build in bench/tools failed"
	GOTLS=$WORK/bin/gotls FORTIO=$WORK/bin/fortio
	metric - clk_tck "$(getconf CLK_TCK)"

	log "lab $LAB up ($SPEC)"
	LAB_UP=1
	"$VEILCTL" lab up -f "$SPEC" --name "$LAB" >"$OUT/lab-up.log" 2>&1 ||
		die "veilctl lab up failed: $(tail -n 20 "$OUT/lab-up.log")"
	local status
	status=$("$VEILCTL" lab status --name "$LAB") || die "veilctl lab status failed"
	pod_ip() { awk -v p="$1" '$1 == "pod" && $2 == p { print $3 }' <<<"$status"; }
	NODE2_IP=$(awk '$1 == "node" && $2 == "node-2" { print $3 }' <<<"$status")
	PLAIN_SERVER_IP=$(pod_ip plain/server) MESH_SERVER_IP=$(pod_ip mesh/server)
	GW1=$(in_pod plain/client -- ip -4 route show default | awk '{ for (i = 1; i < NF; i++) if ($i == "via") print $(i + 1) }')
	[ -n "$NODE2_IP" ] && [ -n "$PLAIN_SERVER_IP" ] && [ -n "$MESH_SERVER_IP" ] && [ -n "$GW1" ] ||
		die "could not read the lab's addresses from veilctl lab status: $status"
	AGENT1=$(<"/run/veil-lab/$LAB/pids/agent-node-1.pid") AGENT2=$(<"/run/veil-lab/$LAB/pids/agent-node-2.pid") ||
		die "no agent pid files in /run/veil-lab/$LAB/pids"
	for p in $AGENT1 $AGENT2; do
		[ "$(cat "/proc/$p/comm" 2>/dev/null)" = veil-agent ] || die "pid $p is not a running veil-agent"
	done
	log "lab up: node-2 $NODE2_IP, plain/server $PLAIN_SERVER_IP, mesh/server $MESH_SERVER_IP, node-1 gateway $GW1"

	CERTS=$WORK/certs
	"$GOTLS" certs -dir "$CERTS" -server-name "$SERVER_NAME" -server-ip "$NODE2_IP" || die "gotls certs failed"
	local srv
	for srv in plain/server mesh/server; do
		start_backend "$srv" "fortio-${srv%/*}" "$FORTIO" server -http-port ":$FORTIO_PORT" -grpc-port disabled \
			-redirect-port disabled -tcp-port disabled -udp-port disabled -ui-path "" -echo-debug-path "" \
			-loglevel Warning
		wait_listen pod "$srv" "$FORTIO_PORT"
	done
	http_ok plain/client "http://$PLAIN_SERVER_IP:$FORTIO_PORT/" || die "plain/client cannot reach plain/server"

	{
		echo "kernel $(uname -r); $(nproc) x$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
		echo "$(go version | cut -d' ' -f3); $(iperf3 --version | head -1 | cut -d' ' -f1-2); $("$STUNNEL" -version 2>&1 | grep -m1 '^stunnel' | cut -d' ' -f1-2); $(openssl version 2>/dev/null | cut -d' ' -f1-2); fortio $("$FORTIO" version 2>&1 | head -1)"
		echo "iperf3 ${IPERF_SECS}s; fortio keepalive ${KA_SECS}s, keepalive off ${NC_SECS}s, timeout $FORTIO_TIMEOUT"
	} >"$WORK/meta"
	for p in $PATHS; do run_path "$p"; done

	echo
	cat "$WORK/meta"
	echo
	"$WORK/bin/benchreport" "$OUT" || die "benchreport failed"
	[ -n "${BENCH_OUT:-}" ] && log "raw results in $OUT"
	return 0
}

main "$@"
