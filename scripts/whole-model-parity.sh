#!/usr/bin/env bash
# Whole-model parity with PyTorch for deeplabv3_resnet50, fcn_resnet50 and pspnet_resnet50.
#
# For each model, ../shared/bench/peer/export_reference.py exports a seeded torchvision model (randomised BatchNorm
# statistics), a random input PNG and its logits; the whole_model_parity example loads the weights by name, runs the
# unfolded eval network and the BatchNorm-folded inference model, and prints the relative L2 error of the logits
# (bound 1e-4; exit status 1 above it).
#
# Needs a Python with torch, torchvision, safetensors, numpy and pillow (PyPI; see ../shared/bench/peer/README.md):
#   python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch torchvision safetensors numpy pillow
# Usage: PYTHON=/tmp/torchvenv/bin/python PEER=../shared/bench/peer SIZE="256 320" scripts/whole-model-parity.sh
#   PROFILE=--release (default, the build users run; PROFILE= for the dev profile)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/tmp/torchvenv/bin/python}
PEER=${PEER:-../shared/bench/peer}
SIZE=${SIZE:-"256 320"}
OUT=${OUT:-$(mktemp -d /tmp/semseg-parity.XXXXXX)}
mkdir -p "$OUT"
MODELS=${MODELS:-"deeplabv3_resnet50 fcn_resnet50 pspnet_resnet50"}
PROFILE=${PROFILE---release}

[ -f "$PEER/export_reference.py" ] || { echo "no $PEER/export_reference.py: set PEER" >&2; exit 2; }
# shellcheck disable=SC2086
cargo build --quiet --locked $PROFILE --example whole_model_parity
status=0
for m in $MODELS; do
  # shellcheck disable=SC2086
  (cd "$PEER" && "$PYTHON" export_reference.py --model "$m" --size $SIZE --out "$OUT/$m") >/dev/null
  # shellcheck disable=SC2086
  cargo run --quiet --locked $PROFILE --example whole_model_parity -- "$OUT/$m" || status=1
done
exit $status
