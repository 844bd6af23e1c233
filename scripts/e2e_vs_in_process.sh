#!/usr/bin/env bash
# The server end to end against our own in-process forward pass, one build, rounds
# alternating: `resnet-client load` with 8 clients for 15 s after 3 s of warm-up (JPEG:
# tests/fixtures/images/rocket.jpg, 640x427; and seeded float tensors), then
# `resnet-serve bench forward` at batch 8 (issue #21's "server >= 0.9x in process b8").
#
#   MODEL=resnet50 ROUNDS=2 TARGET=target/release scripts/e2e_vs_in_process.sh
#
# Needs `cargo build --release --bin resnet-serve --example synthetic_checkpoint` and
# `cargo build --release -p resnet-client` in $TARGET's tree.
set -u
cd "$(dirname "$0")/.."
MODEL=${MODEL:-resnet50}
ROUNDS=${ROUNDS:-2}
T=${TARGET:-target/release}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$T/examples/synthetic_checkpoint" "${MODEL}_swsl" "$work/model.safetensors" >/dev/null
for round in $(seq 1 "$ROUNDS"); do
  port=$((50400 + round)); mport=$((port + 1000))
  "$T/resnet-serve" --model "${MODEL}_swsl=$work/model.safetensors" --listen 127.0.0.1:$port \
    --metrics-listen 127.0.0.1:$mport --batch-sizes 1,2,4,8 >"$work/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 200); do grep -q ' ready' "$work/server.log" && break; sleep 0.3; done
  for input in jpeg tensor; do
    if [ $input = jpeg ]; then src="--input tests/fixtures/images/rocket.jpg"; else src="--synthetic"; fi
    # shellcheck disable=SC2086
    ips=$("$T/resnet-client" load --endpoint http://127.0.0.1:$port --concurrency 8 --duration 15 \
      --warmup 3 $src --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(round(d["images_per_s"],2))')
    echo "round=$round input=$input server_images_per_s=$ips"
  done
  kill $pid; wait $pid 2>/dev/null
  fw=$("$T/resnet-serve" bench forward --model "$MODEL" --batch 8 --seconds 10 2>/dev/null | tail -1 \
    | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_s"],2))')
  echo "round=$round in_process_b8_images_per_s=$fw"
done
