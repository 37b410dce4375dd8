#!/usr/bin/env bash
# Compiles the CUDA binary with Dockerfile.train's default build arguments (CUDA 12.4.1, CUDA_COMPUTE_CAP=70,
# machine code for 70 75 80 86 89 90) on a machine with no GPU and no image registry: the nvidia/cuda base images
# cannot be pulled here, so the same CUDA release comes from Debian trixie's nvidia-cuda-toolkit (12.4.131) in a
# debootstrapped chroot, and cuDNN 9.1.0 (what nvidia/cuda:12.4.1-cudnn-devel ships) from NVIDIA's PyPI wheel.
# Then clippy (-D warnings), the NVRTC tests of semseg's own kernels, compiled by CUDA 12.4's NVRTC, and the test that
# reads Candle's fat binaries for the bf16 kernels in the machine code for 80 and later (PTX built for 70 has none);
# then that the binary needs no NVIDIA library to start and, with no GPU, trains on the CPU.
#
#   sudo scripts/check-cuda12-build.sh            # chroot in /tmp/semseg-cuda12 (kept: later runs take minutes)
#
# Needs root (debootstrap, chroot, bind mounts), debootstrap, python3 -m pip, and this machine's Rust toolchain
# (bind-mounted into the chroot). A cold run downloads about 2 GB and compiles for about 20 minutes on 2 cores.
# What it does not check: the Dockerfile's own steps (rustup, the runtime image) and anything that needs a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
root=${CHROOT:-/tmp/semseg-cuda12}
mirror=${MIRROR:-http://deb.debian.org/debian}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
# Dockerfile.train's defaults.
compute_cap=$(sed -n 's/^ARG .*\bCUDA_COMPUTE_CAP=\([0-9]\+\).*/\1/p' Dockerfile.train)
sass_archs=$(sed -n 's/^ARG .*\bCUDA_SASS_ARCHS="\([^"]*\)".*/\1/p' Dockerfile.train)
cuda_version=$(sed -n 's/^ARG CUDA_VERSION=//p' Dockerfile.train)
echo "Dockerfile.train defaults: CUDA $cuda_version, CUDA_COMPUTE_CAP=$compute_cap, CUDA_SASS_ARCHS=\"$sass_archs\""

if [ ! -x "$root/usr/bin/nvcc" ]; then
  [ -d "$root/usr" ] || debootstrap --variant=minbase --components=main,contrib,non-free trixie "$root" "$mirror"
  echo "deb $mirror trixie main contrib non-free" > "$root/etc/apt/sources.list"
  rm -f "$root"/etc/apt/sources.list.d/*
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  chroot "$root" bash -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends nvidia-cuda-toolkit nvidia-cuda-dev gcc g++ libc6-dev pkg-config ca-certificates"
fi
toolkit=$(chroot "$root" nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
case "$cuda_version" in
  "$toolkit"*) ;;
  *) echo "warning: the chroot's CUDA $toolkit is not the Dockerfile's $cuda_version" >&2 ;;
esac
if [ ! -f "$root/opt/cudnn/include/cudnn.h" ]; then
  wheels=$(mktemp -d)
  python3 -m pip download -q --no-deps "nvidia-cudnn-cu12==9.1.0.70" -d "$wheels"
  (cd "$wheels" && unzip -q -o nvidia_cudnn_cu12-*.whl 'nvidia/cudnn/include/*' 'nvidia/cudnn/lib/libcudnn.so.9')
  mkdir -p "$root/opt/cudnn"
  cp -r "$wheels/nvidia/cudnn/include" "$wheels/nvidia/cudnn/lib" "$root/opt/cudnn/"
  ln -sf libcudnn.so.9 "$root/opt/cudnn/lib/libcudnn.so"
  rm -rf "$wheels"
fi

mounts=()
bind() {
  mkdir -p "$root$2"
  mount --bind "$1" "$root$2"
  mounts=("$root$2" "${mounts[@]}")
}
cleanup() { for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
bind "$repo" /work/main
bind "$cargo_home" /root/.cargo
bind "$rustup_home" /root/.rustup
bind /dev /dev
mkdir -p "$root/proc" && mount -t proc proc "$root/proc" && mounts=("$root/proc" "${mounts[@]}")

cat > "$root/build.sh" <<EOF
#!/bin/bash
set -uo pipefail
export PATH=/root/.cargo/bin:\$PATH HOME=/root
export CUDA_COMPUTE_CAP=$compute_cap CUDA_SASS_ARCHS="$sass_archs"
export CPATH=/opt/cudnn/include LIBRARY_PATH=/opt/cudnn/lib LD_LIBRARY_PATH=/opt/cudnn/lib CUDNN_LIB=/opt/cudnn
export CARGO_TARGET_DIR=/build/target CARGO_PROFILE_RELEASE_STRIP=symbols
cd /work/main
cargo build --release --locked --features cuda --bin semseg || exit 1
cargo clippy --release --locked --features cuda --lib --tests -- -D warnings || exit 2
cargo test --release --locked --features cuda --lib -- nvrtc candle_kernels_have_bf16 cuda_libraries \
  a_cuda_build_without_the_driver || exit 3
ls -l /build/target/release/semseg
# NVIDIA's libraries are opened at run time and the CUDA runtime is linked statically: the binary must not need any
# of them to start, and with no GPU here (the chroot has Debian's driver library, not a GPU) it trains on the CPU.
if readelf -d /build/target/release/semseg | grep NEEDED | grep -E 'lib(cuda|cudart|cublas|cublasLt|curand|nvrtc|cudnn)[.]'; then
  echo "the binary links NVIDIA libraries at start-up"; exit 4
fi
rm -rf /tmp/smoke && mkdir -p /tmp/smoke
/build/target/release/semseg demo --no-serve --epochs 1 --dir /tmp/smoke/demo > /tmp/smoke/log 2>&1 \
  && grep -q 'compute device chosen device=cpu' /tmp/smoke/log || { tail -n 20 /tmp/smoke/log; exit 5; }
grep -E 'WARN.*(no usable GPU|NVIDIA driver)' /tmp/smoke/log | head -n 1
EOF
chmod +x "$root/build.sh"
chroot "$root" /build.sh
echo "ok: the CUDA $toolkit build with Dockerfile.train's defaults compiles, is clippy-clean, NVRTC compiles the kernels, the machine code for 80+ has the bf16 kernels, and without a GPU the binary starts and trains on the CPU"
