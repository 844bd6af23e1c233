#!/usr/bin/env bash
# The GPU check, sized for one `device` call (at most 8 minutes): run it on the GPU
# machine from the repository root, with target/cuda-dist carried there (made by
# `scripts/cuda/build.sh`):
#
#   benches/gpu/run.sh            # writes results.json, log.txt, server.log, ldd.txt to $OUT
#
# The GPU machine has the NVIDIA driver and PyTorch with its nvidia-* pip libraries but no
# Rust toolchain: the stripped release binaries travel as one xz archive, and the CUDA
# libraries they link (cudart, cuBLAS, cuRAND, cuDNN) come from PyTorch's site-packages.
# Extra arguments go to gpu_bench.py (e.g. --steps parity).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/resnet-serve-gpu}
mkdir -p "$OUT"
archive=target/cuda-dist/resnet-serve-cuda.tar.xz
[ -f "$archive" ] || { echo "missing $archive: run scripts/cuda/build.sh and carry target/cuda-dist" >&2; exit 2; }
bin=$(mktemp -d)
tar -xJf "$archive" -C "$bin"

site=$(python3 -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parent.parent)')
dirs=""
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudnn.so.9 libnvrtc.so.13; do
  found=$(find "$site/nvidia" -name "$lib" 2>/dev/null | head -n 1)
  if [ -n "$found" ]; then
    d=$(dirname "$found")
    case ":$dirs:" in *":$d:"*) ;; *) dirs="$dirs:$d" ;; esac
  else
    echo "warning: $lib not found under $site/nvidia" >&2
  fi
done
export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{ echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; ldd "$bin/resnet-serve"; } >"$OUT/ldd.txt" 2>&1
if grep -q "not found" "$OUT/ldd.txt"; then
  echo "unresolved libraries:" >&2
  grep "not found" "$OUT/ldd.txt" >&2
fi
PYTHONUNBUFFERED=1 python3 benches/gpu/gpu_bench.py --bin "$bin/resnet-serve" \
  --client "$bin/resnet-client" --overhead "$bin/server_overhead" --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
