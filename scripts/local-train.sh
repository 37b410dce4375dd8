#!/usr/bin/env bash
# Runs a training job in the training image the way SageMaker does: the job's directory mounted at /opt/ml.
#
#   scripts/local-train.sh ML_DIR [IMAGE]        IMAGE defaults to semseg-train (scripts/build-and-push.sh builds it)
#
# ML_DIR holds input/config/hyperparameters.json and input/data/<channel>/ (train, validation, train_annotation,
# validation_annotation, optionally label_map, model, pretrained); `semseg synth --out ML_DIR/input/data` makes one.
# Afterwards ML_DIR/model holds the artifact, ML_DIR/output/data the reports, and ML_DIR/output/failure the reason
# when the job failed (the exit status is the job's). GPUs are passed through when nvidia-smi finds one.
set -euo pipefail
ml=${1:?usage: local-train.sh ML_DIR [IMAGE]}
image=${2:-semseg-train}
[ -f "$ml/input/config/hyperparameters.json" ] || { echo "local-train: $ml/input/config/hyperparameters.json is missing" >&2; exit 2; }
ml=$(cd "$ml" && pwd)
gpus=()
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpus=(--gpus all); fi
# SageMaker gives a stopping job SIGTERM and 120 s before SIGKILL; docker stop -t 120 does the same here.
exec docker run --rm "${gpus[@]}" --shm-size 1g -v "$ml:/opt/ml" "$image" train
