#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 300), one at a time, after seeding each corpus
# with the golden vectors. CI runs `fuzz/run.sh 20`; run longer by hand. Needs cargo-fuzz
# (`cargo install --locked cargo-fuzz`) and a C++ compiler (libFuzzer is built from source).
# A crash stops the run with its input in fuzz/artifacts/TARGET/ (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-300}"
vectors=../conformance/vectors
mkdir -p corpus/pb_decode corpus/json_decode corpus/frame_decode
cp "$vectors"/*.pb "$vectors"/kepeer/*.pb corpus/pb_decode/
cp "$vectors"/*.json "$vectors"/kepeer/*.json corpus/json_decode/
for f in "$vectors"/*.frame "$vectors"/kepeer/*.frame; do
    # First byte: the chunk size the target feeds the decoder with (see frame_decode.rs).
    { printf '\x05'; cat "$f"; } > "corpus/frame_decode/$(basename "$f")"
done
for target in frame_decode pb_decode json_decode; do
    echo "--- $target: ${seconds}s"
    # The stable toolchain with nightly options unlocked (-Zsanitizer), as README.md says.
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$seconds"
done
