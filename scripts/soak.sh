#!/usr/bin/env bash
# The recorded soak run of RELIABILITY.md ("Soak"): release builds of the server and the
# client, resnet18 with the seeded synthetic weights, the capacity measured with a closed
# loop of 32 for 10 s, then ten times it for 60 s, then SIGTERM under that load (the load
# goes on until the server has exited). Loopback only.
#
#     scripts/soak.sh [OUT_DIR]          # default: target/soak
#
# Writes OUT_DIR/soak.json (the report), soak.txt (its summary), server.log, machine.txt.
# SOAK_GRPC_PORT / SOAK_METRICS_PORT (50071 / 9171), SOAK_SECONDS (60) and
# SOAK_OVERLOAD (10) change the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/soak}
grpc=${SOAK_GRPC_PORT:-50071}
metrics=${SOAK_METRICS_PORT:-9171}
seconds=${SOAK_SECONDS:-60}
overload=${SOAK_OVERLOAD:-10}
bin=${CARGO_TARGET_DIR:-target}/release
mkdir -p "$out"

cargo build --release --locked -p resnet-serve --bin resnet-serve --example synthetic_checkpoint
cargo build --release --locked -p resnet-client --bin resnet-client
"$bin/examples/synthetic_checkpoint" resnet18_swsl "$out/resnet18.safetensors"

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse HEAD 2>/dev/null || cat COMMIT 2>/dev/null || true
    grep -m1 'model name' /proc/cpuinfo
    echo "cores: $(nproc); AVX-512: $(grep -c -m1 avx512f /proc/cpuinfo)"
    uptime
} > "$out/machine.txt"

"$bin/resnet-serve" --listen "127.0.0.1:$grpc" --metrics-listen "127.0.0.1:$metrics" \
    --model "resnet18_swsl=$out/resnet18.safetensors" 2> "$out/server.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT

client=("$bin/resnet-client" --endpoint "http://127.0.0.1:$grpc")
for _ in $(seq 240); do
    if "${client[@]}" classify tests/fixtures/images/rocket.jpg > /dev/null 2>&1; then
        break
    fi
    sleep 0.5
done

"${client[@]}" soak --calibrate 10 --calibrate-concurrency 32 --overload "$overload" \
    --duration "$((seconds + 40))" --server-pid "$server" --sigterm-after "$seconds" \
    --metrics-url "http://127.0.0.1:$metrics/metrics" --json-out "$out/soak.json" \
    | tee "$out/soak.txt"
status=0
wait "$server" || status=$?
trap - EXIT
echo "server exit status: $status" | tee -a "$out/soak.txt"
uptime >> "$out/machine.txt"
