#!/usr/bin/env bash
# What TLS, a bearer token and OTLP tracing cost end to end (issue #20): one server
# binary, several configurations ("sides"), rounds alternating on the same machine:
#   plain:  plaintext gRPC, no token, tracing off;
#   tls:    TLS (a P-256 certificate of a CA made here), nothing else;
#   token:  plaintext, a bearer token required (--auth-token-file);
#   trace:  plaintext, every call traced (OTEL_TRACES_SAMPLER=always_on) and exported
#           over OTLP/gRPC to a real receiver (examples/otlp_sink.rs) on loopback;
#   secure: all three at once.
# resnet18 (seeded weights), batch sizes 1-8, 8 clients for DURATION s after 3 s of
# warm-up, JPEG in (and synthetic tensors), as scripts/ab_serve.sh measures builds. The
# order of the sides turns by one each round, so that no side always runs first.
#
#   scripts/ab_secure.sh               # ROUNDS=3, every side, binaries from target/release
#   BIN=/some/dir scripts/ab_secure.sh
#   SIDES="plain secure" INPUTS=jpeg ROUNDS=6 DURATION=20 scripts/ab_secure.sh
#
# Prints one line per round, side and input: images/s (the client's), and the server
# process's CPU (utime + stime from /proc/PID/stat) per request answered over the whole
# client run, warm-up included (requests from the server's requests_total). The CPU is
# what a side costs the server whatever else runs on the machine; images/s is not. Then
# medians, each side's ratio to plain in the same round, and the spans the receiver got.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SIDES=${SIDES:-plain tls token trace secure}
INPUTS=${INPUTS:-jpeg tensor}
DURATION=${DURATION:-15}
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

# The server's CPU seconds so far (utime + stime, clock ticks).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
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
      cpu0=$(cpu_ticks "$pid"); req0=$(answered "$mport")
      ips=$("${client[@]}" load --concurrency 8 --duration "$DURATION" --warmup 3 "${src[@]}" --json 2>"$work/client.err" \
        | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(round(d["images_per_s"],2), d.get("errors", ""))') \
        || { echo "client failed:"; tail -5 "$work/client.err"; exit 1; }
      cpu1=$(cpu_ticks "$pid"); req1=$(answered "$mport")
      cpu_ms=$(python3 -c "print(round(1000 * ($cpu1 - $cpu0) / $hz / max(1, $req1 - $req0), 3))")
      echo "round=$round side=$side input=$input images_per_s=$ips server_cpu_ms_per_request=$cpu_ms requests=$((req1 - req0)) load=$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$work/rounds"
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
        rows[(int(m["round"]), m["side"], m["input"])] = (float(m["images_per_s"]), float(m["server_cpu_ms_per_request"]))
sides = list(dict.fromkeys(k[1] for k in rows))
for inp in dict.fromkeys(k[2] for k in rows):
    print(f"{inp}: side  img/s median  paired ratio to plain (median; per round)  server CPU ms/request median  ratio")
    for side in sides:
        rs = sorted(r for (r, s, i) in rows if s == side and i == inp)
        ips = [rows[(r, side, inp)][0] for r in rs]
        cpu = [rows[(r, side, inp)][1] for r in rs]
        paired = [rows[(r, side, inp)][0] / rows[(r, "plain", inp)][0] for r in rs if (r, "plain", inp) in rows]
        cpair = [rows[(r, side, inp)][1] / rows[(r, "plain", inp)][1] for r in rs if (r, "plain", inp) in rows]
        print(f"  {side:7} {st.median(ips):8.2f}  {st.median(paired) if paired else float('nan'):.3f} "
              f"({', '.join(f'{p:.2f}' for p in paired)})  {st.median(cpu):8.3f}  "
              f"{st.median(cpair) if cpair else float('nan'):.3f} ({', '.join(f'{p:.3f}' for p in cpair)})")
PY
