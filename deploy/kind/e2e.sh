#!/usr/bin/env bash
# e2e.sh: veil on a kind cluster, end to end. It creates a cluster (kind.yaml: a control
# plane and two workers), loads the images `make images` builds, installs the Helm chart,
# deploys the lab's Bookinfo shape (bookinfo.yaml), runs the scenarios of `make demo`
# (lab/demo.go, with the policies of lab/demo/) as curl probes through `kubectl exec`,
# and deletes the cluster, whatever happened (KEEP=1 keeps it).
#
#   deploy/kind/e2e.sh            from the repository's root or anywhere
#
# Needs: Linux >= 5.7 on the host (kind's nodes share its kernel), Docker, kind, kubectl,
# helm, Go and make; network access to pull busybox and curlimages/curl. The Vagrantfile
# (deploy/vagrant) provisions a VM with all of them. Exits non-zero if a probe does not
# get the expected result.
#
# Environment: CLUSTER (default veil-e2e), TAG (image tag, default e2e), KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-veil-e2e}
TAG=${TAG:-e2e}
KEEP=${KEEP:-0}

for tool in docker kind kubectl helm go make; do
	command -v "$tool" >/dev/null || { echo "e2e: $tool not found" >&2; exit 1; }
done

# The agent runs on the host's kernel.
kernel=$(uname -r)
IFS=.- read -r kmajor kminor _ <<<"$kernel"
if (( kmajor < 5 || (kmajor == 5 && kminor < 7) )); then
	echo "e2e: kernel $kernel: the agent needs Linux >= 5.7 (bpf_sk_assign, listeners in a SOCKMAP)" >&2
	exit 1
elif (( kmajor < 6 || (kmajor == 6 && kminor < 6) )); then
	echo "e2e: kernel $kernel: the agent will attach with clsact filters (TCX needs >= 6.6)"
fi

cleanup() {
	local rc=$?
	if [ "$KEEP" = 1 ]; then
		echo "e2e: KEEP=1: cluster $CLUSTER kept (kind delete cluster --name $CLUSTER)"
	else
		kind delete cluster --name "$CLUSTER" || true
	fi
	exit "$rc"
}
trap cleanup EXIT

kind create cluster --name "$CLUSTER" --config deploy/kind/kind.yaml --wait 180s
mapfile -t nodes < <(kind get nodes --name "$CLUSTER" | sort)
workers=()
for node in "${nodes[@]}"; do
	# A bpffs of the node's own: kind's nodes are containers on one kernel, and the agents'
	# pins (/sys/fs/bpf/veil) must not meet on one bpffs.
	docker exec "$node" sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf bpffs /sys/fs/bpf'
	case $node in *worker*) workers+=("$node") ;; esac
done
[ "${#workers[@]}" -eq 2 ] || { echo "e2e: want 2 workers, have: ${workers[*]}" >&2; exit 1; }
# node-1 and node-2 of the lab.
kubectl label node "${workers[0]}" veil.dev/e2e-node=node-1
kubectl label node "${workers[1]}" veil.dev/e2e-node=node-2
node2=${workers[1]}

TAG=$TAG make images
for archive in bin/images/*.tar; do
	kind load image-archive "$archive" --name "$CLUSTER"
done

helm install veil deploy/helm/veil --namespace veil-system --create-namespace \
	--set images.agent.tag="$TAG" --set images.controller.tag="$TAG" --wait --timeout 5m
kubectl -n veil-system get pods -o wide

kubectl apply -f deploy/kind/bookinfo.yaml
kubectl wait --for=condition=Ready pod --all -n bookinfo --timeout 300s
kubectl wait --for=condition=Ready pod --all -n legacy --timeout 300s
kubectl get pods -n bookinfo -o wide
kubectl get pods -n legacy -o wide

# agent_get NODE PORT PATH: an agent's admin (15000) or metrics (15020) endpoint, on the
# node's loopback (host network).
agent_get() { docker exec "$1" curl -sf "http://127.0.0.1:$2$3"; }

# wait_objects present|absent KEY...: until every agent's config holds (or lacks) each
# policy ("Kind ns/name"), as the lab's WaitObjects.
wait_objects() {
	local want=$1 node key dump ok deadline
	shift
	[ $# -gt 0 ] || return 0
	for node in "${nodes[@]}"; do
		deadline=$((SECONDS + 30))
		while :; do
			ok=1
			dump=$(agent_get "$node" 15000 /config_dump) || ok=0
			for key in "$@"; do
				if grep -qF "\"$key\"" <<<"$dump"; then
					[ "$want" = present ] || ok=0
				else
					[ "$want" = absent ] || ok=0
				fi
			done
			[ "$ok" = 1 ] && break
			if (( SECONDS > deadline )); then
				echo "e2e: $node's agent did not pick up the change ($want: $*)" >&2
				return 1
			fi
			sleep 0.2
		done
	done
}

# target pod:port | svc/name -> address (pods and Services of bookinfo).
target() {
	case $1 in
	svc/*) echo "$(kubectl get svc -n bookinfo "${1#svc/}" -o jsonpath='{.spec.clusterIP}'):9080" ;;
	*) echo "$(kubectl get pod -n bookinfo "${1%:*}" -o jsonpath='{.status.podIP}'):${1#*:}" ;;
	esac
}

mismatches=0
# probe FROM(ns/pod) TO WANT WHY: GET / from the pod's client container; the result is
# the HTTP status, or reset (curl 52 empty reply, 55 send failure, 56 receive failure) or
# timeout (28), as lab.Request reports them.
probe() {
	local from=$1 to=$2 want=$3 why=$4 addr code rc got mark=ok
	addr=$(target "$to")
	rc=0
	code=$(kubectl exec -n "${from%%/*}" "${from#*/}" -c client -- \
		curl -sS -o /dev/null -w '%{http_code}' --max-time 5 "http://$addr/" 2>/dev/null) || rc=$?
	case $rc in
	0) got=$code ;;
	52 | 55 | 56) got=reset ;;
	28) got=timeout ;;
	*) got="error(curl exit $rc)" ;;
	esac
	if [ "$got" != "$want" ]; then
		mark=MISMATCH
		mismatches=$((mismatches + 1))
	fi
	printf '    %-22s -> %-30s expected %-6s observed %-6s %-8s %s\n' "$from" "$to ($addr)" "$want" "$got" "$mark" "$why"
}

# scenario TITLE FILE|- KEY...: apply the policy file, wait for the agents, (the probes
# follow as calls), then end_scenario deletes it.
scenario() {
	title=$1 file=$2
	shift 2
	keys=("$@")
	echo
	echo "[$title]"
	if [ "$file" != - ]; then
		kubectl apply -f "lab/demo/$file" >/dev/null
		wait_objects present "${keys[@]}"
	fi
}
end_scenario() {
	if [ "$file" != - ]; then
		kubectl delete -f "lab/demo/$file" >/dev/null
		wait_objects absent "${keys[@]}"
	fi
}

scenario "1. mesh-to-mesh HTTP works, over mTLS with both identities" -
probe bookinfo/productpage svc/reviews 200 "HBONE between node-1 and node-2"
probe bookinfo/reviews ratings:9080 200 "same node, still through the destination's policy"
if agent_get "$node2" 15020 /metrics | grep '^istio_tcp_connections_opened_total{' | grep 'reporter="destination"' |
	grep 'connection_security_policy="mutual_tls"' | grep -q 'source_principal="spiffe://cluster.local/ns/bookinfo/sa/productpage"'; then
	echo "    node-2's agent counted productpage's connection as mutual_tls"
else
	echo "    MISMATCH: node-2's agent counted no mutual_tls connection from productpage"
	mismatches=$((mismatches + 1))
fi
end_scenario

scenario "2. STRICT mTLS in bookinfo" peer-auth-namespace-strict.yaml "PeerAuthentication bookinfo/default"
probe legacy/sleep reviews:9080 reset "plaintext from outside the mesh"
probe bookinfo/productpage reviews:9080 200 "mTLS"
end_scenario

scenario "3. workload PERMISSIVE with port-level STRICT/DISABLE" peer-auth-ratings-port-level.yaml "PeerAuthentication bookinfo/ratings-permissive"
probe legacy/sleep ratings:9080 reset "port 9080 is STRICT"
probe legacy/sleep ratings:8080 200 "port 8080 is DISABLE, which ambient treats as PERMISSIVE"
probe bookinfo/productpage ratings:9080 200 "mTLS"
end_scenario

zero_trust=("AuthorizationPolicy bookinfo/deny-all" "AuthorizationPolicy bookinfo/allow-frontend-to-reviews" "AuthorizationPolicy bookinfo/allow-reviews-to-ratings")
scenario "4. zero trust at L4: deny-all, then allow frontend -> reviews and reviews -> ratings" zero-trust-l4.yaml "${zero_trust[@]}"
probe bookinfo/frontend reviews:9080 200 "allowed by principal"
probe bookinfo/reviews ratings:9080 200 "allowed by principal"
probe bookinfo/frontend ratings:9080 reset "no ALLOW policy matched"
probe bookinfo/productpage reviews:9080 reset "no ALLOW policy matched"
end_scenario

scenario "5. the documentation's zero-trust.yaml, whose allows need HTTP (methods: GET)" zero-trust.yaml "${zero_trust[@]}"
probe bookinfo/frontend reviews:9080 reset "at L4 the GET-only ALLOW rule is dropped: fails closed, as ztunnel"
end_scenario

scenario "6. DENY from namespace legacy" authz-deny-external.yaml "AuthorizationPolicy bookinfo/deny-external"
probe legacy/meshed-sleep reviews:9080 reset "in the mesh: its mTLS identity names namespace legacy"
probe legacy/sleep reviews:9080 200 "plaintext has no identity, so namespaces cannot match"
end_scenario

echo
if [ "$mismatches" -gt 0 ]; then
	echo "e2e: $mismatches probe(s) did not get the expected result"
	kubectl -n veil-system logs -l app=veil-agent --tail 50 --prefix || true
	exit 1
fi
echo "e2e: every probe got the expected result"
