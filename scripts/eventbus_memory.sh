#!/usr/bin/env bash
# Measures edgecore's resident memory with and without eventbus's embedded broker: idle, and with
# 100 MQTT clients connected (mosquitto_sub, each subscribed to one topic). Runs a real cloudcore
# and edgecore on loopback from the already-built binaries (PROFILE=debug|release, default debug)
# and prints VmRSS and VmHWM from /proc. Needs mosquitto-clients. Not a test: a measurement.
#   scripts/eventbus_memory.sh [clients]
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-100}
profile=${PROFILE:-debug}
bin=target/$profile
for b in causeway cloudcore edgecore; do
    [ -x "$bin/$b" ] || { echo "build $bin/$b first (cargo build -p causeway-cli -p causeway-cloudcore -p causeway-edgecore)" >&2; exit 1; }
done
command -v mosquitto_sub >/dev/null || { echo "needs mosquitto_sub (apt-get install mosquitto-clients)" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ws=$(port); quic=$(port); https=$(port); api=$(port); mqtt=$(port)
"$bin/causeway" certs init --dir "$work/pki" --advertise-address 127.0.0.1 --dns localhost >/dev/null
"$bin/causeway" certs node --dir "$work/pki" --node-id edge-mem >/dev/null
cat > "$work/cloudcore.yaml" <<EOC
cloudhub:
  websocket: { enable: true, address: 127.0.0.1, port: $ws }
  quic: { enable: true, address: 127.0.0.1, port: $quic }
  https: { enable: true, address: 127.0.0.1, port: $https }
  api: { enable: true, address: 127.0.0.1, port: $api }
  tls: { cert-dir: $work/pki }
  queue: { path: $work/cloudcore.db }
EOC
"$bin/cloudcore" --config "$work/cloudcore.yaml" 2>"$work/cloud.log" & pids+=($!)

rss() { awk '/^VmRSS|^VmHWM/ {printf "%s %s kB  ", $1, $2}' "/proc/$1/status"; echo; }

run() { # $1 = eventbus enable (true/false)
    local dir=$work/edge-$1
    mkdir -p "$dir"
    cat > "$dir/edgecore.yaml" <<EOC
edgehub:
  controller: { protocol: websocket, heartbeat: 5, node-id: edge-mem }
  websocket: { server: "127.0.0.1:$ws" }
  tls: { ca-file: $work/pki/ca.crt, cert-file: $work/pki/nodes/edge-mem.crt, key-file: $work/pki/nodes/edge-mem.key }
  http-server: "https://127.0.0.1:$https"
  outbox: { path: $dir/outbox.db }
modules:
  metamanager: { path: $dir/meta.db }
  local-api: { listen: "127.0.0.1:0" }
  eventbus: { enable: $1, mode: internal, internal: { listen: "127.0.0.1:$mqtt" }, path: $dir/eventbus.db }
EOC
    "$bin/edgecore" --config "$dir/edgecore.yaml" 2>"$dir/edge.log" &
    local edge=$!
    until grep -q "edge connected\|connected to the cloud" "$dir/edge.log" 2>/dev/null; do sleep 0.2; done
    sleep 3
    printf 'eventbus %-5s idle:              ' "$1"; rss "$edge"
    if [ "$1" = true ]; then
        local subs=()
        for i in $(seq 1 "$clients"); do
            mosquitto_sub -h 127.0.0.1 -p "$mqtt" -i "mem-$i" -t "default/user/t$i" >/dev/null 2>&1 &
            subs+=($!)
        done
        sleep 3
        printf 'eventbus %-5s %3s MQTT clients:  ' "$1" "$clients"; rss "$edge"
        kill "${subs[@]}" 2>/dev/null || true
        wait "${subs[@]}" 2>/dev/null || true
    fi
    kill -TERM "$edge"; wait "$edge" || true
}
run false
run true
