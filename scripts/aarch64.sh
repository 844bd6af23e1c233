#!/usr/bin/env bash
# The ARM (aarch64) build on an x86-64 Linux machine: there are no NEON kernels of our own,
# so on ARM every convolution runs on the portable `gemm` path, and this keeps it honest.
#
#   scripts/aarch64.sh [check|parity]     (default: check)
#
# check:  `cargo check` of every target of the workspace for aarch64-unknown-linux-gnu
#         (what CI runs; ~1-4 min on 2 cores).
# parity: builds tests/parity.rs for aarch64 and runs it under qemu-user against the
#         PyTorch fixtures, every architecture at 1e-4 (~6 min to build, ~5 min to run).
#
# Installs what it needs: Rust's aarch64 standard library (rustup), Debian's aarch64 gcc and
# C library (ring and the JPEG decoder compile C), and for parity qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-check}
target=aarch64-unknown-linux-gnu
packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
[ "$mode" = parity ] && packages+=(qemu-user)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
case "$mode" in
  check)
    cargo check --locked --workspace --all-targets --target "$target"
    ;;
  parity)
    # One test at a time: each already uses every core the emulator has.
    cargo test --locked --target "$target" --test parity -- --test-threads 1 --nocapture
    ;;
  *)
    echo "usage: $0 [check|parity]" >&2
    exit 2
    ;;
esac
