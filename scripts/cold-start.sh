#!/usr/bin/env bash
# Cold start of the inference container: from `docker run` to the first 200 on /ping, with the model mounted at
# /opt/ml/model as SageMaker hosting does.
#
#   scripts/cold-start.sh IMAGE MODEL_DIR [RUNS]        (RUNS default 5)
#
# A ResNet-50 DeepLabV3 artifact for it: torchvision's deeplabv3_resnet50(weights=None, weights_backbone=None,
# num_classes=21) saved with torch.save, then `semseg import --torchvision FILE.pth --algorithm deeplab
# --backbone resnet-50 --num-classes 21 --out MODEL_DIR`. Prints one line per run and the median.
set -euo pipefail
image=${1:?usage: cold-start.sh IMAGE MODEL_DIR [RUNS]}
model=$(cd "${2:?usage: cold-start.sh IMAGE MODEL_DIR [RUNS]}" && pwd)
runs=${3:-5}
name=semseg-cold-start-$$
trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
now() { date +%s.%N; }
times=()
for run in $(seq 1 "$runs"); do
    start=$(now)
    docker run -d --name "$name" -p 127.0.0.1::8080 -v "$model:/opt/ml/model:ro" "$image" serve >/dev/null
    address=$(docker port "$name" 8080/tcp | head -n 1)
    until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$address/ping" || true)" = 200 ]; do
        if [ "$(docker inspect -f '{{.State.Running}}' "$name")" != true ]; then
            docker logs "$name" >&2
            echo "cold-start: the container exited before /ping answered 200" >&2
            exit 1
        fi
        awk -v s="$start" -v n="$(now)" 'BEGIN { exit !(n - s > 240) }' && { echo "cold-start: no 200 within 240 s" >&2; exit 1; }
        sleep 0.02
    done
    took=$(awk -v s="$start" -v n="$(now)" 'BEGIN { printf "%.2f", n - s }')
    times+=("$took")
    echo "run $run: ${took} s to the first 200 on /ping"
    docker rm -f "$name" >/dev/null
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
echo "cold start ($image, $(du -sh "$model" | cut -f1) model): median ${median} s over $runs runs"
