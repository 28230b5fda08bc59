#!/usr/bin/env bash
# A private containerd for edged's tests, benches and the README, started as root without systemd.
#
#   scripts/containerd.sh start DIR   config, CNI bridge conflist, containerd in the background
#                                     (root, state, socket DIR/containerd.sock, log DIR/containerd.log,
#                                     pid DIR/containerd.pid); the local images imported; prints the
#                                     socket path once it answers
#   scripts/containerd.sh stop DIR    stops containerd and its shims, unmounts and removes DIR
#   scripts/containerd.sh image OUT NAME ENTRYPOINT_JSON
#                                     writes an OCI image archive: a static busybox (Debian's
#                                     busybox-static) as one layer, tagged NAME
#
# Needs Debian's containerd, runc, containernetworking-plugins and busybox-static (.ci/run installs
# them). No registry is reachable here: the images edged uses are built here and imported:
#   causeway.local/busybox:1  entrypoint sh (workloads give their command)
#   causeway.local/pause:1    the pod sandbox's process (sleeps until killed)
# restrict_oom_score_adj: a sandbox without CAP_SYS_RESOURCE cannot lower OOM scores.
set -euo pipefail

busybox=${BUSYBOX:-/bin/busybox}
cni_bin=${CNI_BIN:-/usr/lib/cni}

image() {
    local out=$1 name=$2 entrypoint=$3 work
    work=$(mktemp -d)
    mkdir -p "$work/rootfs/bin" "$work/rootfs/tmp" "$work/rootfs/etc" "$work/rootfs/proc" \
        "$work/rootfs/sys" "$work/rootfs/dev" "$work/layout/blobs/sha256"
    cp "$busybox" "$work/rootfs/bin/busybox"
    # The applets workloads and tests use (linking all 400 takes seconds on a loaded machine).
    for app in sh ash cat echo env false grep hostname httpd id kill ls mkdir nc printf ps \
        rm seq sleep sync test touch true wc wget yes; do
        ln -s busybox "$work/rootfs/bin/$app"
    done
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/rootfs" \
        -cf "$work/layer.tar" .
    local layer lsize
    layer=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
    lsize=$(stat -c %s "$work/layer.tar")
    mv "$work/layer.tar" "$work/layout/blobs/sha256/$layer"
    blob() {
        local d
        d=$(printf '%s' "$1" | sha256sum | cut -d' ' -f1)
        printf '%s' "$1" >"$work/layout/blobs/sha256/$d"
        echo "$d ${#1}"
    }
    local config manifest cd cs md ms
    config='{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Entrypoint":'$entrypoint'},"rootfs":{"type":"layers","diff_ids":["sha256:'$layer'"]}}'
    read -r cd cs < <(blob "$config")
    manifest='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'$cd'","size":'$cs'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:'$layer'","size":'$lsize'}]}'
    read -r md ms < <(blob "$manifest")
    printf '{"imageLayoutVersion":"1.0.0"}' >"$work/layout/oci-layout"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
        "$md" "$ms" "$name" "${name##*:}" >"$work/layout/index.json"
    tar -C "$work/layout" -cf "$out" .
    rm -rf "$work"
}

start() {
    local dir=$1
    for tool in containerd runc ctr "$busybox" "$cni_bin/bridge"; do
        command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install containerd runc containernetworking-plugins busybox-static)" >&2; exit 2; }
    done
    mkdir -p "$dir/root" "$dir/state" "$dir/cni" "$dir/cni-cache"
    dir=$(cd "$dir" && pwd)
    # The bridge's subnet is one the machine does not route elsewhere; pods reach only each other
    # and the node.
    cat >"$dir/cni/10-causeway.conflist" <<CNI
{"cniVersion": "0.4.0", "name": "causeway", "plugins": [
  {"type": "bridge", "bridge": "cw0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.${CNI_SUBNET:-77}.0/24"}]],
            "dataDir": "$dir/cni-cache/ipam"}},
  {"type": "loopback"}]}
CNI
    cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "causeway.local/pause:1"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$cni_bin"
    conf_dir = "$dir/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
TOML
    containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
    echo $! >"$dir/containerd.pid"
    for _ in $(seq 1 200); do
        if ctr -a "$dir/containerd.sock" version >/dev/null 2>&1; then break; fi
        if ! kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null; then
            echo "containerd exited; its log:" >&2; tail -20 "$dir/containerd.log" >&2; exit 1
        fi
        sleep 0.1
    done
    ctr -a "$dir/containerd.sock" version >/dev/null
    image "$dir/busybox.tar" causeway.local/busybox:1 '["sh"]'
    image "$dir/pause.tar" causeway.local/pause:1 '["sleep","2147483647"]'
    ctr -a "$dir/containerd.sock" -n k8s.io images import "$dir/busybox.tar" >/dev/null
    ctr -a "$dir/containerd.sock" -n k8s.io images import "$dir/pause.tar" >/dev/null
    rm -f "$dir/busybox.tar" "$dir/pause.tar"
    echo "$dir/containerd.sock"
}

stop() {
    local dir=$1
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd)
    local sock="$dir/containerd.sock"
    if [ -S "$sock" ]; then
        # Every task of every namespace killed, so no shim outlives its containerd.
        for ns in $(ctr -a "$sock" namespaces ls -q 2>/dev/null); do
            for task in $(ctr -a "$sock" -n "$ns" tasks ls -q 2>/dev/null); do
                ctr -a "$sock" -n "$ns" tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
            done
        done
    fi
    if [ -f "$dir/containerd.pid" ]; then
        local pid
        pid=$(cat "$dir/containerd.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    # Shims started for this directory (their command line names its state dir).
    for pid in $(pgrep -f "containerd-shim.*-address $sock" 2>/dev/null || true); do
        kill -9 "$pid" 2>/dev/null || true
    done
    # Mounts left under the directory (rootfs, shm, netns), deepest first.
    awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$dir"
}

case ${1:-} in
    start) start "$2" ;;
    stop) stop "$2" ;;
    image) image "$2" "$3" "$4" ;;
    *) echo "usage: $0 start DIR | stop DIR | image OUT NAME ENTRYPOINT_JSON" >&2; exit 2 ;;
esac
