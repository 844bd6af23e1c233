#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit from PyPI wheels into one folder that Candle's build
# scripts accept as CUDA_HOME, on a machine with no GPU and no system CUDA.
#
#   scripts/cuda/toolkit.sh [DIR]      (default: ${RESNET_SERVE_CUDA_HOME:-$HOME/.cache/resnet-serve/cuda-13.0})
#
# Prints nothing but errors; `scripts/cuda/env.sh` sources the environment afterwards.
# Why 13.0 exactly: the lent GPU machines run driver 580 (CUDA 13.0). Candle ships its
# kernels as PTX that the driver JIT-compiles, and PTX from a newer nvcc does not load on an
# older driver; nvvm must match nvcc or ptxas rejects the PTX version.
# Linking needs libcuda.so, which only a driver provides: we build a stub exporting every
# `cu*` symbol cudarc binds (each returns CUDA_ERROR_NO_DEVICE); at run time the real driver's
# libcuda.so.1 is found instead, because the stub lives only in lib/stubs/.
set -euo pipefail
dir=${1:-${RESNET_SERVE_CUDA_HOME:-$HOME/.cache/resnet-serve/cuda-13.0}}
python=${PYTHON:-python3}
stamp="$dir/.complete-v1"
[ -f "$stamp" ] && exit 0

mkdir -p "$dir"
site="$dir/site"
# No pip cache: the wheels (1.6 GB) would otherwise be stored twice on a small CI disk.
"$python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps --target "$site" \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
  nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cudnn-cu13==9.13.0.50

cu="$site/nvidia/cu13"
for d in bin include nvvm; do ln -sfn "$cu/$d" "$dir/$d"; done
mkdir -p "$dir/lib/stubs"
# Unversioned names for the linker, pointing at the versioned wheel files.
link_lib() { # NAME GLOB-DIR
  local name=$1 src
  src=$(ls "$2"/"$name".so.* 2>/dev/null | sort | head -n 1)
  [ -n "$src" ] || { echo "toolkit: $name not found under $2" >&2; exit 1; }
  ln -sfn "$src" "$dir/lib/$name.so"
}
for n in libcudart libcublas libcublasLt libcurand libnvrtc; do link_lib "$n" "$cu/lib"; done
link_lib libcudnn "$site/nvidia/cudnn/lib"
ln -sfn "$dir/lib" "$dir/lib64"

# libcuda stub: one function per driver symbol that cudarc's bindings declare.
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort | tail -n 1)
[ -n "$cudarc" ] || { echo "toolkit: cudarc sources not found; run 'cargo fetch' first" >&2; exit 1; }
stub_c="$dir/lib/stubs/cuda_stub.c"
grep -hoE '^\s+fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" \
  | sed -E 's/\s*fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
  | awk '{ printf "int %s(void) { return 100; }\n", $1 }' >"$stub_c"
[ -s "$stub_c" ] || { echo "toolkit: no driver symbols found in $cudarc" >&2; exit 1; }
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/lib/stubs/libcuda.so" "$stub_c"
ln -sfn libcuda.so "$dir/lib/stubs/libcuda.so.1"
touch "$stamp"
