#!/usr/bin/env bash
# Serves a trained model with the inference image the way SageMaker hosting does, on http://localhost:PORT.
#
#   scripts/local-serve.sh MODEL [IMAGE] [PORT]   MODEL: a model directory (ML_DIR/model) or a model.tar.gz
#                                                 IMAGE defaults to semseg-serve, PORT to 8080
# Then:
#   curl -s localhost:8080/ping
#   curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @photo.jpg localhost:8080/invocations -o mask.png
# Ctrl-C (or docker stop) ends it; in-flight requests finish first.
set -euo pipefail
model=${1:?usage: local-serve.sh MODEL_DIR_OR_TAR_GZ [IMAGE] [PORT]}
image=${2:-semseg-serve}
port=${3:-8080}
if [ -f "$model" ]; then
    # A tarball: mount its directory; semseg extracts model.tar.gz itself (into a temporary directory if read-only).
    [ "$(basename "$model")" = model.tar.gz ] || { echo "local-serve: $model: expected a directory or model.tar.gz" >&2; exit 2; }
    model=$(dirname "$model")
fi
[ -d "$model" ] || { echo "local-serve: $model is not a directory" >&2; exit 2; }
model=$(cd "$model" && pwd)
echo "local-serve: $image serving $model on http://localhost:$port" >&2
tty=()
[ -t 0 ] && tty=(-it) # Ctrl-C reaches semseg (PID 1 handles SIGINT like SIGTERM)
exec docker run --rm "${tty[@]}" -p "$port:8080" -v "$model:/opt/ml/model:ro" "$image" serve
