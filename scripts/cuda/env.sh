# Sourced, not run: the environment for building resnet-serve with CUDA against the
# toolkit that scripts/cuda/toolkit.sh assembles. Changing any of these recompiles Candle's
# kernels (~20 min on 2 cores), so they are fixed here rather than left to the caller.
export CUDA_HOME=${RESNET_SERVE_CUDA_HOME:-$HOME/.cache/resnet-serve/cuda-13.0}
export CUDA_PATH=$CUDA_HOME
export PATH=$CUDA_HOME/bin:$PATH
# Hopper (H100/H200). Candle's PTX is JIT-compiled by the driver, so newer chips load it too.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export NVCC_CCBIN=${NVCC_CCBIN:-gcc}
export LIBRARY_PATH=$CUDA_HOME/lib:$CUDA_HOME/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export RESNET_SERVE_CUDA_TARGET=${RESNET_SERVE_CUDA_TARGET:-$HOME/.cache/resnet-serve/target-cuda}
