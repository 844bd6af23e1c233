#!/usr/bin/env bash
# Builds the CUDA server on any x86-64 Linux machine, GPU or not.
#
#   scripts/cuda/build.sh [check|release]     (default: release)
#
# release: `cargo build --release --features cudnn` into $RESNET_SERVE_CUDA_TARGET (outside
#          the checkout, so a fresh clone reuses the compiled kernels), then a stripped copy
#          of the server, the load client and examples/server_overhead packed in
#          target/cuda-dist/resnet-serve-cuda.tar.xz
#          (what benches/gpu/run.sh unpacks on a GPU machine).
# check:   compiles and links the CUDA build of every target (what CI runs), no dist copy.
# The first build costs ~25 min on 2 cores, most of it nvcc on Candle's kernels.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-release}
# The driver stub is generated from cudarc's sources, which a CPU-only build never fetched.
cargo fetch --locked >/dev/null
scripts/cuda/toolkit.sh
# shellcheck source=scripts/cuda/env.sh
. scripts/cuda/env.sh
case "$mode" in
  check)
    cargo build --locked --features cudnn --bins --target-dir "$RESNET_SERVE_CUDA_TARGET"
    ;;
  release)
    cargo build --locked --release --features cudnn --bin resnet-serve --target-dir "$RESNET_SERVE_CUDA_TARGET"
    cargo build --locked --release -p resnet-client --target-dir "$RESNET_SERVE_CUDA_TARGET"
    # The serving path's ceiling with a fixed-cost model (no device needed).
    cargo build --locked --release --features cudnn --example server_overhead --target-dir "$RESNET_SERVE_CUDA_TARGET"
    # One xz archive of the stripped binaries: Candle's PTX is text and packs ~5x, which
    # keeps the tree that travels to a GPU machine small.
    dist=target/cuda-dist
    stage=$(mktemp -d)
    mkdir -p "$dist"
    for b in resnet-serve resnet-client examples/server_overhead; do
      strip -o "$stage/$(basename "$b")" "$RESNET_SERVE_CUDA_TARGET/release/$b"
    done
    tar -cJf "$dist/resnet-serve-cuda.tar.xz" -C "$stage" resnet-serve resnet-client server_overhead
    rm -rf "$stage"
    ls -la "$dist"
    ;;
  *) echo "usage: $0 [check|release]" >&2; exit 2 ;;
esac
