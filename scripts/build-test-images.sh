#!/usr/bin/env bash
# Builds, offline, the images that tests/containers.rs runs: the Dockerfiles as users build them, with the stand-in
# base images of scripts/make-offline-bases.sh passed as build arguments.
#
#   semseg-serve:ci      Dockerfile.serve
#   semseg-build:ci      Dockerfile.serve's build stage (the compiled crates): the train image's build base here, so
#                        the crates are compiled once and Dockerfile.train's own steps all still run
#   semseg-train:ci-cpu  Dockerfile.train without CUDA or weights (FEATURES= PRETRAINED=)
#
# .ci/run starts this in the background as soon as it starts, so that Docker's compile shares the cores with cargo's
# compile of the tests instead of following it; the container tests run it again, which waits for that run (flock)
# and then finds every layer in Docker's build cache. Needs what make-offline-bases.sh needs.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${SEMSEG_OFFLINE_WORK:-/var/tmp/semseg-offline}
started=$SECONDS
scripts/make-offline-bases.sh >/dev/null
exec 8>"$WORK/images.lock"
flock 8

build() { # build DOCKERFILE TAG [docker build options]
    local dockerfile=$1 tag=$2
    shift 2
    docker build -f "$dockerfile" -t "$tag" "$@" .
    echo "== build-test-images: $tag from $dockerfile:" \
        "$(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')," \
        "$((SECONDS - started)) s since the start" >&2
}
serve_bases=(--build-arg BUILDER_IMAGE=semseg-offline/build:bookworm --build-arg RUNTIME_IMAGE=semseg-offline/cc:bookworm)
build Dockerfile.serve semseg-serve:ci "${serve_bases[@]}"
build Dockerfile.serve semseg-build:ci --target build "${serve_bases[@]}"
build Dockerfile.train semseg-train:ci-cpu --build-arg BUILDER_IMAGE=semseg-build:ci \
    --build-arg RUNTIME_IMAGE=semseg-offline/runtime:bookworm --build-arg FEATURES= --build-arg PRETRAINED=
