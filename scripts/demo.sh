#!/usr/bin/env bash
# The README's first command: build semseg and run `semseg demo` (synthetic dataset in ./demo-ml → train a small
# ResNet-18 FCN on the CPU → its mask of one validation image beside the image, in
# demo-ml/output/data/mask-side-by-side.png → serve it on port 8080 and print a curl line; Ctrl-C stops it).
# Arguments go to `semseg demo` (see `semseg demo --help`: --epochs N, --port P, --dir DIR, --no-serve). Runs in the
# repository root.
# PORT and ML_ROOT, which the script honoured before it was a subcommand, still work.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked
# Wherever cargo put it (CARGO_TARGET_DIR and .cargo/config.toml may move the target directory).
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
exec "$TARGET_DIR/release/semseg" demo ${PORT:+--port "$PORT"} ${ML_ROOT:+--dir "$ML_ROOT"} "$@"
