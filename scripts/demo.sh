#!/usr/bin/env bash
# The README's first command: build semseg, generate a small synthetic dataset in a SageMaker ml-root under
# ./demo-ml, and run the training job's input checks on it.
#
# What it does grows with the project: today it generates the data and validates the job exactly as `train` does
# before its first step (training and serving land with their issues; see README "Status").
set -euo pipefail
cd "$(dirname "$0")/.."
ML_ROOT="${ML_ROOT:-$PWD/demo-ml}"

cargo build --release --locked
BIN=target/release/semseg

rm -rf "$ML_ROOT"
"$BIN" synth --out "$ML_ROOT/input/data" --seed 7
mkdir -p "$ML_ROOT/input/config"
train_count=$(find "$ML_ROOT/input/data/train" -name '*.jpg' | wc -l)
cat > "$ML_ROOT/input/config/hyperparameters.json" <<JSON
{"num_classes": "4", "num_training_samples": "$train_count", "backbone": "resnet-18",
 "use_pretrained_model": "False", "crop_size": "128", "base_size": "160", "epochs": "10", "mini_batch_size": "8"}
JSON
"$BIN" --ml-root "$ML_ROOT" check
echo
echo "The training job in $ML_ROOT is valid: $train_count training images."
echo "Try breaking it (e.g. delete an annotation in $ML_ROOT/input/data/train_annotation) and run:"
echo "  $BIN --ml-root $ML_ROOT check; cat $ML_ROOT/output/failure"
