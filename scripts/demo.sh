#!/usr/bin/env bash
# The README's first command: build semseg, generate a small synthetic dataset in a SageMaker ml-root under
# ./demo-ml, train a small FCN (ResNet-18) on the CPU for a minute or two, then serve it on port 8080 (PORT=...
# overrides) and print a curl command that turns a JPEG into a mask PNG. Ctrl-C stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
ML_ROOT="${ML_ROOT:-$PWD/demo-ml}"
PORT="${PORT:-8080}"

cargo build --release --locked
# Wherever cargo put it (CARGO_TARGET_DIR and .cargo/config.toml may move the target directory).
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN=$TARGET_DIR/release/semseg

rm -rf "$ML_ROOT"
"$BIN" synth --out "$ML_ROOT/input/data" --seed 7 --train-count 24 --validation-count 8 --width 64 --height 48
mkdir -p "$ML_ROOT/input/config"
cat > "$ML_ROOT/input/config/hyperparameters.json" <<JSON
{"num_classes": "4", "num_training_samples": "24", "backbone": "resnet-18", "algorithm": "fcn",
 "use_pretrained_model": "False", "crop_size": "48", "base_size": "64", "epochs": "12", "mini_batch_size": "4",
 "validation_mini_batch_size": "1", "learning_rate": "0.02", "output_stride": "8"}
JSON
"$BIN" --ml-root "$ML_ROOT" train

image=$(ls "$ML_ROOT"/input/data/validation/*.jpg | head -n 1)
cat <<MSG

Trained: $ML_ROOT/model (metrics per epoch in $ML_ROOT/output/data/history.json).
Serving it on port $PORT. In another terminal:

  curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @$image \\
       http://localhost:$PORT/invocations -o mask.png

mask.png is a palette PNG whose pixel values are class indices. Ctrl-C stops the server.
MSG
SAGEMAKER_BIND_TO_PORT="$PORT" exec "$BIN" --ml-root "$ML_ROOT" serve
