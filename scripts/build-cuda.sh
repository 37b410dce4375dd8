#!/usr/bin/env bash
# Builds the CUDA binary (`--features cuda`) on a machine without a GPU, and packs it with the PyTorch peer scripts
# into a git-ignored folder that travels to a GPU machine beside the checkout (scripts/gpu-check.sh runs from there).
#
#   scripts/build-cuda.sh                 # toolchain in /tmp/cuda13 (installed on first use), binary in .gpucarry/
#   CUDA_COMPUTE_CAP=90 CUDA_SASS_ARCHS=90 scripts/build-cuda.sh   # H100/H200 only, PTX for 9.0
#
# By default the kernels are built as Dockerfile.train's CUDA 13 build builds them (CUDA_COMPUTE_CAP=75), with machine
# code for 7.5 and 9.0 (CUDA_SASS_ARCHS="75 90"): on the lent H100/H200 that is the image's path, machine code
# assembled from the PTX for 8.0 that carries the bf16 kernels (vendor/candle-kernels/PATCHED.md), so the GPU check
# measures what users run, bf16 included.
#
# The toolchain is CUDA 13.0 from NVIDIA's PyPI wheels (nvcc 13.0.88: PTX from a newer nvcc does not load on driver
# 580) and cuDNN 9. Nothing links against the driver's libcuda.so.1 or the CUDA libraries (they are opened at run
# time; the CUDA runtime is linked statically), so the binary also runs here, on the CPU, which is checked below.
# A cold build takes about 20 minutes on 2 cores (candle-kernels' nvcc work); later ones a few minutes.
# Environment: CUDA_TOOLCHAIN (default /tmp/cuda13), CARGO_TARGET_DIR (default target-cuda), CARRY (default .gpucarry),
# PEER (the peer scripts to copy, default ../shared/bench/peer; skipped when absent).
set -euo pipefail
cd "$(dirname "$0")/.."
toolchain=${CUDA_TOOLCHAIN:-/tmp/cuda13}
carry=${CARRY:-.gpucarry}
peer=${PEER:-../shared/bench/peer}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}

install_toolchain() {
  local dir=$1
  mkdir -p "$dir"
  python3 -m pip install -q --target "$dir/wheels" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-nvrtc==13.0.88" \
    "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35"
  local root=$dir/wheels/nvidia/cu13
  python3 -m pip download -q --no-deps "nvidia-cudnn-cu13==9.21.1.3" -d "$dir/cudnn-wheel"
  (cd "$dir" && unzip -q -o cudnn-wheel/nvidia_cudnn_cu13-*.whl 'nvidia/cudnn/include/*' 'nvidia/cudnn/lib/libcudnn.so.9' \
    && ln -sf libcudnn.so.9 nvidia/cudnn/lib/libcudnn.so)
  cat > "$dir/env.sh" <<ENV
export CUDA_HOME=$root CUDA_PATH=$root CUDA_ROOT=$root
export PATH=$root/bin:\$PATH
export LIBRARY_PATH=$root/lib:$dir/nvidia/cudnn/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export CPATH=$dir/nvidia/cudnn/include\${CPATH:+:\$CPATH}
export CUDNN_LIB=$dir/nvidia/cudnn
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
ENV
}

[ -f "$toolchain/env.sh" ] || install_toolchain "$toolchain"
# env.sh sets CUDA_COMPUTE_CAP=90 where it is unset (../shared/gpu's recipe): choose before it does.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-75}
export CUDA_SASS_ARCHS=${CUDA_SASS_ARCHS:-75 90}
# shellcheck disable=SC1091
source "$toolchain/env.sh"
# cuDNN's library must be on the link path too (the setup script of ../shared/gpu leaves it out).
export LIBRARY_PATH=$toolchain/nvidia/cudnn/lib:${LIBRARY_PATH:-}
nvcc --version | tail -n 2
echo "building for compute capability $CUDA_COMPUTE_CAP (machine code for ${CUDA_SASS_ARCHS:-$CUDA_COMPUTE_CAP}) into $CARGO_TARGET_DIR"
cargo build --release --locked --features cuda --bin semseg

# NVIDIA's libraries are opened when the GPU is first used (src/cuda_libraries.rs), so where no driver is installed,
# as on this build machine, the CUDA binary must still start and train on the CPU, saying why.
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
  smoke=$(mktemp -d)
  if env -u LD_LIBRARY_PATH "$CARGO_TARGET_DIR/release/semseg" demo --no-serve --epochs 1 --dir "$smoke/demo" \
      > "$smoke/log" 2>&1 && grep -q "no NVIDIA driver here" "$smoke/log" && grep -q 'compute device chosen device=cpu' "$smoke/log"; then
    echo "checked: without an NVIDIA driver the CUDA binary trains on the CPU"
    rm -rf "$smoke"
  else
    tail -n 20 "$smoke/log"
    echo "the CUDA binary did not train on the CPU without an NVIDIA driver (log: $smoke/log)" >&2
    exit 1
  fi
fi

mkdir -p "$carry"
echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CUDA_SASS_ARCHS=\"$CUDA_SASS_ARCHS\" $(nvcc --version | tail -n 1)" \
  > "$carry/build-info.txt"
strip -o "$carry/semseg-cuda" "$CARGO_TARGET_DIR/release/semseg"
xz -6 -T2 -f "$carry/semseg-cuda"
if [ -d "$peer" ]; then
  mkdir -p "$carry/peer"
  cp "$peer"/{seg_models.py,torch_train.py,torch_infer.py,export_reference.py} "$carry/peer/"
fi
ls -l "$carry" "$carry"/peer 2>/dev/null
echo "ready: run scripts/gpu-check.sh on the GPU machine (carry $carry)"
