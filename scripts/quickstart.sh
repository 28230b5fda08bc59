#!/usr/bin/env bash
# Quick start: a cloudcore and an edgecore talking over QUIC (or PROTOCOL=websocket) on loopback, with
# freshly generated certificates; one message goes from the cloud API to the edge (ACKed by the edge)
# and one from the edge to the cloud (read back from the cloud API's stream); a configmap applied in
# the cloud is read at the edge, and read again once cloudcore is stopped. Then both stop.
#
# Environment: PROTOCOL=quic|websocket (default quic), PORT_BASE (default 20000: WebSocket, QUIC,
# bootstrap, API, edge-local on PORT_BASE..PORT_BASE+4), WORKDIR (default: a new temporary directory),
# PROFILE=debug|release (default debug: the fastest build from scratch).
set -euo pipefail

cd "$(dirname "$0")/.."
protocol=${PROTOCOL:-quic}
base=${PORT_BASE:-20000}
profile=${PROFILE:-debug}
work=${WORKDIR:-$(mktemp -d -t causeway-quickstart.XXXXXX)}
mkdir -p "$work"
node=edge-1
ws_port=$base quic_port=$((base + 1)) https_port=$((base + 2)) api_port=$((base + 3))
local_port=$((base + 4))

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

say "building (cargo build, $profile)"
if [ "$profile" = release ]; then flags=(--release); else flags=(); fi
cargo build "${flags[@]}" -p causeway-cloudcore -p causeway-edgecore -p causeway-cli
bin=target/$profile
causeway=$bin/causeway

say "certificates in $work/pki"
"$causeway" certs init --dir "$work/pki" --advertise-address 127.0.0.1 --dns localhost
"$causeway" certs node --dir "$work/pki" --node-id "$node"

cat > "$work/cloudcore.yaml" <<EOF
cloudhub:
  websocket: { enable: true, address: 127.0.0.1, port: $ws_port }
  quic: { enable: true, address: 127.0.0.1, port: $quic_port }
  https: { enable: true, address: 127.0.0.1, port: $https_port }
  api: { enable: true, address: 127.0.0.1, port: $api_port }
  tls:
    cert-dir: $work/pki
  queue:
    path: $work/cloudcore.db
EOF

cat > "$work/edgecore.yaml" <<EOF
edgehub:
  controller: { protocol: $protocol, heartbeat: 5, node-id: $node }
  websocket: { server: "127.0.0.1:$ws_port" }
  quic: { server: "127.0.0.1:$quic_port" }
  tls:
    ca-file: $work/pki/ca.crt
    cert-file: $work/pki/nodes/$node.crt
    key-file: $work/pki/nodes/$node.key
  http-server: "https://127.0.0.1:$https_port"
  outbox: { path: $work/outbox.db }
modules:
  metamanager: { path: $work/meta.db }
  local-api: { listen: "127.0.0.1:$local_port" }
EOF

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# Waits up to $2 seconds for the command in $1 to succeed.
wait_for() {
    local what=$1 tries=$(($2 * 10))
    until eval "$what" >/dev/null 2>&1; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || fail "timed out waiting for: $what"
        sleep 0.1
    done
}

export CAUSEWAY_API="http://127.0.0.1:$api_port"

say "starting cloudcore (logs: $work/cloudcore.log)"
"$bin/cloudcore" --config "$work/cloudcore.yaml" 2> "$work/cloudcore.log" &
pids+=($!)
wait_for "curl -sf $CAUSEWAY_API/healthz" 30

say "starting edgecore over $protocol (logs: $work/edgecore.log)"
"$bin/edgecore" --config "$work/edgecore.yaml" 2> "$work/edgecore.log" &
pids+=($!)
wait_for "curl -sf $CAUSEWAY_API/v1/nodes/$node | grep -q '\"connected\":true'" 30
"$causeway" nodes --api "$CAUSEWAY_API"

say "cloud -> edge: causeway send ... --wait-ack"
"$causeway" send "$node" --api "$CAUSEWAY_API" --group resource --resource default/configmap/demo \
    --op update --content '{"greeting":"hello from the cloud"}' --wait-ack
say "the edge application reads it from the edge's local endpoint"
curl -sf "http://127.0.0.1:$local_port/v1/messages" && echo

say "edge -> cloud: an edge application posts a message; the cloud API streams it"
# --from-start replays the cloud's retained log, so the order of these two steps does not matter.
"$causeway" tail --api "$CAUSEWAY_API" --node "$node" --from-start --count 1 --timeout 20s \
    > "$work/tail.out" &
tail_pid=$!
curl -sf -X POST "http://127.0.0.1:$local_port/v1/upstream" -H 'content-type: application/json' \
    -d '{"group":"resource","resource":"default/event/demo","operation":"insert","content":{"greeting":"hello from the edge"}}'
echo
wait "$tail_pid" || fail "the edge's message did not reach the cloud stream"
cat "$work/tail.out"

say "the resource path: a configmap applied in the cloud, read at the edge, read again without the cloud"
cat > "$work/settings.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata: { namespace: default, name: settings }
data: { mode: edge }
EOF
"$causeway" apply --api "$CAUSEWAY_API" -f "$work/settings.yaml"
"$causeway" get --api "$CAUSEWAY_API" nodes     # the node object, Ready while connected
# The edge lacks it (no pod there references it), so metamanager asks the cloud and stores it.
curl -sf "http://127.0.0.1:$local_port/api/v1/namespaces/default/configmaps/settings" && echo
kill -TERM "${pids[0]}" && wait "${pids[0]}" || true
say "cloudcore stopped; the edge still serves the configmap"
curl -sf "http://127.0.0.1:$local_port/api/v1/namespaces/default/configmaps/settings" && echo \
    || fail "the edge did not serve the configmap without the cloud"

say "done: stopping both daemons (working files in $work)"
