#!/usr/bin/env bash
# Builds the zoo with its `cuda` feature on a machine with neither a CUDA installation nor a
# GPU (CI's and ours), so that the binary can be carried to a GPU machine.
#
#   kernels/cuda/build.sh                                  # cargo build --release --features cuda -p zoo
#   kernels/cuda/build.sh test --release --features cuda -p zoo-kernels --no-run
#
# - The CUDA 13.0 toolkit comes from PyPI wheels, installed in target/cuda-venv (pinned to
#   13.0: cudarc 0.19 refuses newer toolkits, and the GPU machines' driver is CUDA 13.0).
# - target/cuda-root arranges it as a CUDA_PATH: bin (nvcc), include, nvvm, and lib64 with the
#   libraries under their unversioned names too. There is no libcuda without a driver: a stub
#   (SONAME libcuda.so.1) that defines every driver function cudarc binds serves the link; at
#   run time the GPU machine's driver is loaded instead (here, the stub: no device).
# - candle compiles its kernels with nvcc for one architecture: CUDA_COMPUTE_CAP (default 90,
#   the H200). The zoo's own kernels (kernels/cuda/*.cu) are compiled by NVRTC at run time for
#   the GPU at hand.
# - The build goes to target/cuda, apart from the default build. About 15 minutes on 2 cores
#   the first time (candle's kernels).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/cuda-venv
root=$PWD/target/cuda-root

if ! "$venv/bin/python" -c "import nvidia" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
        "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
        "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*"
fi
cu13=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')

mkdir -p "$root/lib64/stubs"
for dir in bin include nvvm; do
    ln -sfn "$cu13/$dir" "$root/$dir"
done
for lib in "$cu13"/lib/lib*.so.*; do
    name=$(basename "$lib")
    ln -sf "$lib" "$root/lib64/$name"
    ln -sf "$lib" "$root/lib64/${name%%.so.*}.so"
done

# The driver stub: every cu* function of cudarc's driver bindings, each returning
# CUDA_ERROR_NO_DEVICE (100), so that a program run here reports that there is no GPU.
stub=$root/lib64/stubs/libcuda.so
if [ ! -f "$stub" ]; then
    cargo fetch --quiet
    bindings=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d \
        -name 'cudarc-0.19.*' | sort -V | tail -1)/src/driver/sys/mod.rs
    grep -oP '^\s+fn \Kcu\w+(?=\()' "$bindings" | sort -u |
        sed 's/.*/int &(void) { return 100; }/' > "$root/lib64/stubs/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$root/lib64/stubs/libcuda.c"
    ln -sf libcuda.so "$root/lib64/stubs/libcuda.so.1"
fi

export CUDA_PATH=$root CUDA_ROOT=$root CUDA_TOOLKIT_ROOT_DIR=$root
export PATH=$root/bin:$PATH
export LD_LIBRARY_PATH=$root/lib64:$root/lib64/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LIBRARY_PATH=$root/lib64:$root/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
nvcc --version | tail -2
if [ $# -eq 0 ]; then
    set -- build --release --features cuda -p zoo
fi
exec cargo "$@"
