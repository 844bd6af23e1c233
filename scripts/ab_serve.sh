#!/usr/bin/env bash
# A/B of two resnet-serve builds (e.g. before and after a change): resnet18 (seeded
# weights), 8 clients for 15 s after 3 s of warm-up, JPEG and tensor inputs; rounds alternate.
#
#   SERVER_DIR=/tmp/ab scripts/ab_serve.sh     ($SERVER_DIR/before/resnet-serve and
#                                               $SERVER_DIR/after/resnet-serve)
# Prints one line per round, side and input (images/s), and the in-process forward pass
# (`resnet-serve bench forward`, resnet18, batch 8) of each build per round.
set -u
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
mkdir -p /tmp/ab
CKPT=/tmp/ab/r18.safetensors
[ -f $CKPT ] || cargo run --release --example synthetic_checkpoint -- resnet18_swsl $CKPT
CLIENT=${CLIENT:-/tmp/ab/after/resnet-client}
port=50300
for round in $(seq 1 $ROUNDS); do
  for side in before after; do
    port=$((port+1)); mport=$((port+1000))
    ${SERVER_DIR:-/tmp/ab}/$side/resnet-serve --model resnet18_swsl=$CKPT --listen 127.0.0.1:$port \
      --metrics-listen 127.0.0.1:$mport --batch-sizes 1,2,4,8 >/tmp/ab/server-$side.log 2>&1 &
    pid=$!
    for i in $(seq 1 100); do grep -q '"ready"\|ready$\| ready' /tmp/ab/server-$side.log && break; sleep 0.3; done
    for input in jpeg tensor; do
      if [ $input = jpeg ]; then src="--input tests/fixtures/images/rocket.jpg"; else src="--synthetic"; fi
      ips=$($CLIENT load --endpoint http://127.0.0.1:$port --concurrency 8 --duration 15 --warmup 3 $src --json 2>/dev/null \
        | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(round(d["images_per_s"],2))')
      echo "round=$round side=$side input=$input images_per_s=$ips"
    done
    kill $pid; wait $pid 2>/dev/null
  done
  for side in before after; do
    fw=$(${SERVER_DIR:-/tmp/ab}/$side/resnet-serve bench forward --model resnet18 --batch 8 --seconds 8 2>/dev/null | tail -3 | tr '\n' ' ')
    echo "round=$round side=$side in_process: $fw"
  done
done
