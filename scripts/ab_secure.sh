#!/usr/bin/env bash
# What TLS, a bearer token and OTLP tracing cost end to end (issue #20): one server
# binary, several configurations ("sides"), rounds alternating on the same machine:
#   plain:  plaintext gRPC, no token, tracing off;
#   tls:    TLS (a P-256 certificate of a CA made here), nothing else;
#   token:  plaintext, a bearer token required (--auth-token-file);
#   trace:  plaintext, every call traced (OTEL_TRACES_SAMPLER=always_on) and exported
#           over OTLP/gRPC to a real receiver (examples/otlp_sink.rs) on loopback;
#   secure: all three at once.
# resnet18 (seeded weights), batch sizes 1-8, CONCURRENCY (8) clients for DURATION (15) s
# after 3 s of warm-up, JPEG in (and synthetic tensors), as scripts/ab_serve.sh measures builds. The
# order of the sides turns by one each round, so that no side always runs first.
#
#   scripts/ab_secure.sh               # ROUNDS=3, every side, binaries from target/release
#   BIN=/some/dir scripts/ab_secure.sh
#   SIDES="plain secure" INPUTS=jpeg ROUNDS=6 DURATION=20 scripts/ab_secure.sh
#   CONCURRENCY=16 INPUTS=tensor SIDES="plain tls" scripts/ab_secure.sh
#
# With 8 clients and batch sizes 1-8, a closed loop can settle into two groups of ~4 that
# take turns (each group's batch closes while the other's images are being computed),
# which runs smaller batches with padding; whether and when it does varies from run to
# run, in plaintext too, and a few ms more per request in arrival (TLS on 600 KB tensors)
# makes it likelier. 16 clients keep batches of 8 full and measure the CPU alone.
#
# Prints one line per round, side and input: images/s (the client's), and the server
# process's CPU (utime + stime from /proc/PID/*/stat) per request answered over the
# whole client run, warm-up included (requests from the server's requests_total): all
# of it, and that of the threads that are not the model's (see cpu_ticks); and the
# client's (it shares the machine: its TLS work slows the server down too). The CPU is
# what a side costs whatever else runs on the machine; images/s is not. Then medians,
# each side's ratio to plain in the same round, what the side adds to plain's non-model
# CPU as a share of plain's whole CPU per request, and the spans the receiver got.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SIDES=${SIDES:-plain tls token trace secure}
INPUTS=${INPUTS:-jpeg tensor}
DURATION=${DURATION:-15}
CONCURRENCY=${CONCURRENCY:-8}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
work=$(mktemp -d /tmp/ab_secure.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
read -r -a sides <<< "$SIDES"
for side in "${sides[@]}"; do
  case $side in plain|tls|token|trace|secure) ;; *) echo "unknown side: $side" >&2; exit 2 ;; esac
done

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

# The server's CPU so far (utime + stime, clock ticks): all of it (the process's, which
# keeps the time of threads that ended), and that of its threads other than the
# model's (worker-*, compute-*, which live as long as the model): the network, TLS, h2,
# tracing and JPEG decoding (tokio's threads) and the OTLP exporter's. The model's share
# varies by several percent from run to run with what else runs on the machine; the
# rest is where TLS, tokens and tracing cost anything.
cpu_ticks() {
  local all model
  all=$(awk '{ print $14 + $15 }' "/proc/$1/stat")
  model=$(for t in /proc/"$1"/task/*; do
            case $(cat "$t/comm" 2>/dev/null) in worker-*|compute-*) awk '{ print $14 + $15 }' "$t/stat" ;; esac
          done | awk '{ n += $1 } END { print n + 0 }')
  echo "$all $((all - model))"
}
# Requests it has answered so far, every model, RPC and code.
answered() {
  curl -sf "http://127.0.0.1:$1/metrics" | awk '/^resnet_serve_requests_total/ { n += $NF } END { print n + 0 }'
}
hz=$(getconf CLK_TCK)

echo "machine: $(nproc) CPUs, $(uptime)"
port=50400
for round in $(seq 1 "$ROUNDS"); do
  n=${#sides[@]}
  for i in $(seq 0 $((n - 1))); do
    side=${sides[$(((i + round - 1) % n))]}
    port=$((port + 1)); mport=$((port + 1000))
    args=(--model "resnet18_swsl=$work/r18.safetensors" --listen "127.0.0.1:$port"
          --metrics-listen "127.0.0.1:$mport" --batch-sizes 1,2,4,8)
    client=("$BIN/resnet-client")
    env=(env -u OTEL_EXPORTER_OTLP_ENDPOINT -u OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
    case $side in tls|secure)
      args+=(--tls-cert "$work/server.pem" --tls-key "$work/server.key")
      client+=(--endpoint "https://localhost:$port" --tls-ca "$work/ca.pem") ;;
    *) client+=(--endpoint "http://127.0.0.1:$port") ;;
    esac
    case $side in token|secure)
      args+=(--auth-token-file "$work/tokens"); client+=(--token "$token") ;;
    esac
    case $side in trace|secure)
      env=(env OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:54317 OTEL_TRACES_SAMPLER=always_on
           OTEL_SERVICE_NAME=ab-secure) ;;
    esac
    "${env[@]}" "$BIN/resnet-serve" "${args[@]}" > "$work/server-$side.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 200); do
      curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null 2>&1 && break
      sleep 0.2
    done
    for input in $INPUTS; do
      if [ "$input" = jpeg ]; then src=(--input tests/fixtures/images/rocket.jpg); else src=(--synthetic); fi
      read -r cpu0 rest0 < <(cpu_ticks "$pid"); req0=$(answered "$mport")
      ips=$(/usr/bin/time -f '%U %S' -o "$work/client.time" "${client[@]}" load --concurrency "$CONCURRENCY" --duration "$DURATION" --warmup 3 "${src[@]}" --json 2>"$work/client.err" \
        | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(round(d["images_per_s"],2), d.get("errors", ""))') \
        || { echo "client failed:"; tail -5 "$work/client.err"; exit 1; }
      read -r cpu1 rest1 < <(cpu_ticks "$pid"); req1=$(answered "$mport")
      cpu_ms=$(python3 -c "print(round(1000 * ($cpu1 - $cpu0) / $hz / max(1, $req1 - $req0), 3))")
      rest_ms=$(python3 -c "print(round(1000 * ($rest1 - $rest0) / $hz / max(1, $req1 - $req0), 3))")
      client_ms=$(python3 -c "u, s = open('$work/client.time').read().split()[-2:]; print(round(1000 * (float(u) + float(s)) / max(1, $req1 - $req0), 3))")
      echo "round=$round side=$side input=$input images_per_s=$ips server_cpu_ms_per_request=$cpu_ms server_non_model_cpu_ms_per_request=$rest_ms client_cpu_ms_per_request=$client_ms requests=$((req1 - req0)) load=$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$work/rounds"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
kill "$sink"; wait "$sink" 2>/dev/null || true
echo "otlp receiver: $(cat "$work/sink.out")"

python3 - "$work/rounds" <<'PY'
import re, statistics as st, sys
rows = {}
for line in open(sys.argv[1]):
    m = dict(re.findall(r"(\w+)=(\S+)", line))
    if "images_per_s" in m:
        rows[(int(m["round"]), m["side"], m["input"])] = (
            float(m["images_per_s"]), float(m["server_cpu_ms_per_request"]),
            float(m["server_non_model_cpu_ms_per_request"]), float(m["client_cpu_ms_per_request"]))
sides = list(dict.fromkeys(k[1] for k in rows))
med = lambda xs: st.median(xs) if xs else float("nan")
for inp in dict.fromkeys(k[2] for k in rows):
    print(f"{inp}: side, img/s median, paired img/s ratio to plain (median; per round), server CPU ms/request "
          "median and paired ratio, non-model CPU ms/request median, added non-model CPU / plain's CPU "
          "(median), client CPU ms/request median")
    for side in sides:
        rs = sorted(r for (r, s, i) in rows if s == side and i == inp)
        col = lambda k: [rows[(r, side, inp)][k] for r in rs]
        pr = [r for r in rs if (r, "plain", inp) in rows]
        ratio = lambda k: [rows[(r, side, inp)][k] / rows[(r, "plain", inp)][k] for r in pr]
        added = [(rows[(r, side, inp)][2] - rows[(r, "plain", inp)][2]) / rows[(r, "plain", inp)][1] for r in pr]
        print(f"  {side:7} {med(col(0)):7.2f}  {med(ratio(0)):.3f} ({', '.join(f'{p:.2f}' for p in ratio(0))})"
              f"  {med(col(1)):7.3f} {med(ratio(1)):.3f}  {med(col(2)):7.3f}  {100 * med(added):+.2f}%"
              f"  {med(col(3)):6.3f}")
PY
