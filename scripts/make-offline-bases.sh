#!/usr/bin/env bash
# Makes local stand-ins for the public base images that Dockerfile.train and Dockerfile.serve name by default, for
# machines whose Docker engine cannot pull (this project's CI). Nothing here is needed where `docker pull` works.
#
#   semseg-offline/build:bookworm    stands in for rust:1.95-slim-bookworm and, for a CPU build, the CUDA devel base:
#                                    Debian bookworm (debootstrap, minbase) + gcc + libc6-dev + this machine's Rust
#                                    toolchain + the crates of Cargo.lock (from this machine's cargo registry),
#                                    with CARGO_NET_OFFLINE=true so the build never reaches for the network.
#   semseg-offline/runtime:bookworm  stands in for the CUDA runtime base in a CPU build of the train image:
#                                    Debian bookworm minbase.
#   semseg-offline/cc:bookworm       stands in for gcr.io/distroless/cc-debian12: only libc6, libgcc-s1, the CA bundle
#                                    and /etc/passwd (what distroless/cc holds that semseg uses), so the serve image's
#                                    size measured here is close to the real one.
#
# Needs root (debootstrap, chroot), debootstrap and dpkg-deb (Debian packages), docker, cargo. Images that exist are
# kept; FORCE=1 rebuilds them. Prints the --build-arg flags to use.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=${SEMSEG_OFFLINE_WORK:-/var/tmp/semseg-offline}
BUILD_IMAGE=semseg-offline/build:$SUITE
RUNTIME_IMAGE=semseg-offline/runtime:$SUITE
CC_IMAGE=semseg-offline/cc:$SUITE

log() { echo "== make-offline-bases: $*" >&2; }
have_image() { [ "${FORCE:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
import_dir() { # import_dir DIR IMAGE [--change ...]
    local dir=$1 image=$2
    shift 2
    tar --numeric-owner --one-file-system -C "$dir" -c . | docker import "$@" - "$image" >/dev/null
    log "imported $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
}

for tool in docker debootstrap dpkg-deb chroot cargo rustc flock; do
    command -v "$tool" >/dev/null || { echo "make-offline-bases: '$tool' is missing (apt-get install debootstrap)" >&2; exit 1; }
done
mkdir -p "$WORK"
# One run at a time (.ci/run starts one in the background while cargo compiles; the tests then call it again and
# wait here until the images exist).
exec 9>"$WORK/lock"
flock 9

minbase=$WORK/minbase
if ! have_image "$RUNTIME_IMAGE" || ! have_image "$BUILD_IMAGE"; then
    if [ ! -x "$minbase/bin/sh" ] || [ "${FORCE:-0}" = 1 ]; then
        rm -rf "$minbase"
        log "debootstrap $SUITE minbase from $MIRROR"
        debootstrap --variant=minbase "$SUITE" "$minbase" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
            { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
        chroot "$minbase" apt-get clean
    fi
fi

if ! have_image "$RUNTIME_IMAGE"; then
    import_dir "$minbase" "$RUNTIME_IMAGE" --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
fi

if ! have_image "$BUILD_IMAGE"; then
    build=$WORK/build-root
    rm -rf "$build"
    cp -a "$minbase" "$build"
    log "installing gcc and libc6-dev into the build root"
    cp /etc/resolv.conf "$build/etc/resolv.conf"
    chroot "$build" apt-get update -qq >"$WORK/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive chroot "$build" apt-get install -y -qq --no-install-recommends \
        gcc libc6-dev ca-certificates >>"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log" >&2; exit 1; }
    chroot "$build" apt-get clean
    rm -rf "$build"/var/lib/apt/lists/*

    # This machine's toolchain (no documentation), where rustup would have put one.
    sysroot=$(rustc --print sysroot)
    mkdir -p "$build/usr/local/rust"
    cp -a "$sysroot/bin" "$sysroot/lib" "$build/usr/local/rust/"
    [ -d "$sysroot/libexec" ] && cp -a "$sysroot/libexec" "$build/usr/local/rust/"

    # Every crate Cargo.lock names, from this machine's registry (cargo fetch fills what a host build skipped).
    cargo fetch --locked >/dev/null 2>&1 || cargo fetch --locked
    cargo_home=${CARGO_HOME:-$HOME/.cargo}
    mkdir -p "$build/usr/local/cargo/registry"
    cp -a "$cargo_home/registry/index" "$cargo_home/registry/cache" "$build/usr/local/cargo/registry/"

    import_dir "$build" "$BUILD_IMAGE" \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'ENV CARGO_NET_OFFLINE=true'
fi

if ! have_image "$CC_IMAGE"; then
    cc=$WORK/cc-root
    debs=$WORK/debs
    rm -rf "$cc" "$debs"
    mkdir -p "$cc" "$debs"
    log "assembling a distroless/cc-like root from Debian packages"
    (cd "$debs" && apt-get download libc6 libgcc-s1 >/dev/null 2>&1) || { echo "apt-get download failed" >&2; exit 1; }
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$cc"; done
    rm -rf "$cc/usr/share/doc" "$cc/usr/share/lintian" "$cc/usr/share/locale"
    mkdir -p "$cc/etc/ssl/certs" "$cc/tmp" "$cc/root"
    chmod 1777 "$cc/tmp"
    cp /etc/ssl/certs/ca-certificates.crt "$cc/etc/ssl/certs/"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' >"$cc/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$cc/etc/group"
    import_dir "$cc" "$CC_IMAGE" --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt'
fi

cat <<ARGS
Dockerfile.serve: --build-arg BUILDER_IMAGE=$BUILD_IMAGE --build-arg RUNTIME_IMAGE=$CC_IMAGE
Dockerfile.train: --build-arg BUILDER_IMAGE=$BUILD_IMAGE --build-arg RUNTIME_IMAGE=$RUNTIME_IMAGE --build-arg FEATURES= --build-arg PRETRAINED=
ARGS
