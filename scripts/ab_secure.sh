#!/usr/bin/env bash
# What TLS, a bearer token and OTLP tracing cost end to end (issue #20): one server
# binary, two configurations, rounds alternating on the same machine:
#   plain:  plaintext gRPC, no token, tracing off;
#   secure: TLS (a P-256 certificate of a CA made here), a bearer token required, every
#           call traced (OTEL_TRACES_SAMPLER=always_on) and exported over OTLP/gRPC to a
#           real receiver (examples/otlp_sink.rs) on loopback.
# resnet18 (seeded weights), batch sizes 1-8, 8 clients for 15 s after 3 s of warm-up,
# JPEG in (and synthetic tensors), as scripts/ab_serve.sh measures builds.
#
#   scripts/ab_secure.sh               # ROUNDS=3, binaries from target/release
#   BIN=/some/dir scripts/ab_secure.sh
#   INPUTS=jpeg ROUNDS=5 scripts/ab_secure.sh   # JPEG only (the issue's figure)
#
# Prints one line per round, side and input (images/s) and the spans the receiver got.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
work=$(mktemp -d /tmp/ab_secure.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

"$BIN/examples/synthetic_checkpoint" resnet18_swsl "$work/r18.safetensors" >/dev/null

# A CA and a server certificate for "localhost" (P-256, as cert-manager issues by default).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=ab-ca -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
  -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$work/ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 2 -extfile "$work/ext" -out "$work/server.pem" 2>/dev/null
token=ab-secure-$(date +%s)
echo "$token infer" > "$work/tokens"

"$BIN/examples/otlp_sink" 127.0.0.1:54317 > "$work/sink.out" 2> "$work/sink.err" &
sink=$!

port=50400
for round in $(seq 1 "$ROUNDS"); do
  for side in plain secure; do
    port=$((port + 1)); mport=$((port + 1000))
    args=(--model "resnet18_swsl=$work/r18.safetensors" --listen "127.0.0.1:$port"
          --metrics-listen "127.0.0.1:$mport" --batch-sizes 1,2,4,8)
    client=("$BIN/resnet-client")
    if [ "$side" = secure ]; then
      args+=(--tls-cert "$work/server.pem" --tls-key "$work/server.key"
             --auth-token-file "$work/tokens")
      client+=(--endpoint "https://localhost:$port" --tls-ca "$work/ca.pem" --token "$token")
      OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:54317 OTEL_TRACES_SAMPLER=always_on \
        OTEL_SERVICE_NAME=ab-secure "$BIN/resnet-serve" "${args[@]}" > "$work/server-$side.log" 2>&1 &
    else
      client+=(--endpoint "http://127.0.0.1:$port")
      env -u OTEL_EXPORTER_OTLP_ENDPOINT -u OTEL_EXPORTER_OTLP_TRACES_ENDPOINT \
        "$BIN/resnet-serve" "${args[@]}" > "$work/server-$side.log" 2>&1 &
    fi
    pid=$!
    for _ in $(seq 1 200); do
      curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null 2>&1 && break
      sleep 0.2
    done
    for input in ${INPUTS:-jpeg tensor}; do
      if [ "$input" = jpeg ]; then src=(--input tests/fixtures/images/rocket.jpg); else src=(--synthetic); fi
      ips=$("${client[@]}" load --concurrency 8 --duration 15 --warmup 3 "${src[@]}" --json 2>"$work/client.err" \
        | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(round(d["images_per_s"],2), d.get("errors", ""))') \
        || { echo "client failed:"; tail -5 "$work/client.err"; exit 1; }
      echo "round=$round side=$side input=$input images_per_s=$ips"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
kill "$sink"; wait "$sink" 2>/dev/null || true
echo "otlp receiver: $(cat "$work/sink.out")"
