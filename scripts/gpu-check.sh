#!/usr/bin/env bash
# The one script to run on a lent GPU machine (issue 13), from the checkout's root, after scripts/build-cuda.sh has
# filled .gpucarry/ (semseg-cuda.xz and the PyTorch peer scripts) and that folder was carried along:
#
#   run: command="OUT=$OUT bash scripts/gpu-check.sh", carry=[".gpucarry"], timeout_s=570
#
# Every step has its own time limit and the script goes on after a failure; steps that no longer fit in BUDGET_S
# are skipped, so summary.json is always written; logs and summary land in $OUT. They run in the order of what
# matters most: selfcheck, train, peer training, parity, serve, quality, peer inference.
# Steps (set STEPS to a subset to rerun some): env, selfcheck, parity, serve, train, quality, peer, summary.
#   env       nvidia-smi, library paths, ldd of the binary (a missing library is named, not guessed); NVIDIA's
#             libraries are opened at run time, so a missing one is named by selfcheck's error instead
#   selfcheck `semseg device-check`: conv and BatchNorm forward/backward on the GPU against the CPU, each precision
#   parity    DeepLabV3-ResNet-50 (torchvision weights, random init) on the GPU vs torchvision, fp32 / auto / bf16;
#             the first predict runs with an empty CUDA JIT cache (cold start)
#   serve     a fresh server (empty JIT cache): seconds to the first healthy /ping, then 30 JPEG invocations at c=1
#             and one of a size not seen before
#   train     `semseg train` DeepLabV3-ResNet-50: crop 512 batch 8 in auto (TF32), fp32 and bf16; crop 240 batch 16
#             (the built-in's defaults) in auto; images/s of the last epoch, peak GPU memory, mean utilisation
#   quality   the CI learning recipe (ResNet-18 FCN on 96x72 synthetic images, 30 epochs) in each precision: mIOU
#   peer      PyTorch on the same GPU: training at the same shapes (strict fp32, TF32, bf16 channels-last; TF32 at
#             crop 240 batch 16) and 512x512 inference
#
# Trying it without a GPU (plumbing only): GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 SEMSEG_BIN=target/release/semseg
#   PEER=../shared/bench/peer PYTHON=/path/to/venv/python scripts/gpu-check.sh
set -u
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(pwd)
CARRY=${CARRY:-$ROOT/.gpucarry}
PEER=$(cd "${PEER:-$CARRY/peer}" 2>/dev/null && pwd || echo "${PEER:-$CARRY/peer}")
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
STEPS=${STEPS:-env selfcheck timing parity serve train quality peer summary}
# TRAIN_ONLY="name ...": run only these of the train step's jobs (auto512, auto512_phases, ...).
TRAIN_ONLY=${TRAIN_ONLY:-}
# Seconds the whole script may take: steps that would not fit are skipped, so the summary is always written before
# the caller's timeout (run it with timeout_s a little above this).
BUDGET_S=${BUDGET_S:-540}
DEADLINE=$(( $(date +%s) + BUDGET_S ))
W=$(mktemp -d /tmp/gpu-check.XXXXXX)
PORT=${PORT:-8089}

if [ "$QUICK" = 1 ]; then
  PSIZE=64; CROP=64; BATCH=2; DCROP=64; DBATCH=4; NTRAIN=8; DNTRAIN=8; EPOCHS=2; QEPOCHS=3; T_TRAIN=300
else
  # Two epochs: the first pays cuDNN's algorithm choices and the allocator's growth, the second is the figure.
  PSIZE=512; CROP=512; BATCH=8; DCROP=240; DBATCH=16; NTRAIN=64; DNTRAIN=128; EPOCHS=2; QEPOCHS=30; T_TRAIN=70
fi

log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
has() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# fits SECONDS WHAT: whether SECONDS more fit before the deadline (logs the skip when not).
fits() {
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -ge "$1" ] && return 0
  log "skipped (${left}s left, needs $1 s): $2"
  return 1
}
# cap SECONDS: SECONDS, or what is left before the deadline when that is less (at least 1).
cap() { local left=$(( DEADLINE - $(date +%s) - 5 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

if [ -n "${SEMSEG_BIN:-}" ]; then
  BIN=$(realpath "$SEMSEG_BIN")
else
  BIN=$W/semseg
  xz -dc "$CARRY/semseg-cuda.xz" > "$BIN" && chmod +x "$BIN" || { log "no binary in $CARRY"; exit 1; }
fi
# The CUDA 13 libraries of the machine's PyTorch (pip wheels), for a binary built by scripts/build-cuda.sh.
SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
for d in nvidia/cu13/lib nvidia/cudnn/lib nvidia/cublas/lib nvidia/cuda_runtime/lib nvidia/curand/lib; do
  [ -d "$SP/$d" ] && LD_LIBRARY_PATH=$SP/$d:${LD_LIBRARY_PATH:-}
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
export SEMSEG_DEVICE=$DEVICE
# Kernels JIT-compiled from PTX are cached here; the cold-start steps point CUDA_CACHE_PATH at an empty folder.
export CUDA_CACHE_PATH=$W/nv-cache

# Samples GPU memory and utilisation every 250 ms into $1 until stop_smi.
start_smi() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 250 > "$1" 2>/dev/null &
    SMI=$!
  else
    : > "$1"; SMI=
  fi
}
stop_smi() { [ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null; wait "$SMI" 2>/dev/null; SMI=; }

if has env; then
  log "env: GPU, libraries"
  { command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } \
    | tee "$OUT/gpu.txt"
  nproc >> "$OUT/gpu.txt"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > "$OUT/env.txt"
  ldd "$BIN" > "$OUT/ldd.txt" 2>&1
  grep -i "not found" "$OUT/ldd.txt" && log "MISSING LIBRARIES (see ldd.txt)"
  "$BIN" --version | tee -a "$OUT/env.txt"
  # What scripts/build-cuda.sh built the binary for (CUDA_COMPUTE_CAP, CUDA_SASS_ARCHS).
  [ -f "$CARRY/build-info.txt" ] && cp "$CARRY/build-info.txt" "$OUT/build-info.txt"
fi

# The torchvision reference runs on the CPU while the GPU steps go on.
REFPID=
if has parity || has serve; then
  log "reference: torchvision deeplabv3_resnet50 at ${PSIZE}x${PSIZE} (CPU, in the background), imported"
  ( (cd "$PEER" && timeout 240 "$PY" export_reference.py --model deeplabv3_resnet50 --size "$PSIZE" "$PSIZE" \
      --out "$W/ref") > "$OUT/export.log" 2>&1 || echo "export_reference failed" >> "$OUT/export.log"
    timeout 60 "$BIN" import --torchvision "$W/ref/weights.safetensors" --algorithm deeplab \
      --backbone resnet-50 --num-classes 21 --out "$W/model" > "$OUT/import.log" 2>&1 \
      || echo "import failed" >> "$OUT/import.log" ) &
  REFPID=$!
fi

if has selfcheck && fits 30 selfcheck; then
  log "selfcheck: conv and BatchNorm on $DEVICE vs the CPU (first CUDA use: PTX JIT into an empty cache)"
  timeout "$(cap 150)" "$BIN" device-check --device "$DEVICE" --out "$OUT/device_check.json" \
    > "$OUT/device_check.log" 2>&1
  echo "device-check exit $?" >> "$OUT/steps.log"
  grep -E '"pass": false|ERROR|error' "$OUT/device_check.log" | head -n 20
fi

if has timing && fits 60 timing; then
  log "timing: each op of a training step alone (batch $BATCH)"
  timeout "$(cap 120)" "$BIN" device-check --device "$DEVICE" --timing "$BATCH" --out "$OUT/op_timing.json" \
    > "$OUT/op_timing.log" 2>&1
  echo "timing exit $?" >> "$OUT/steps.log"
fi

# train_run NAME PRECISION CROP BATCH IMAGES [VAR=VALUE...]: a real `semseg train` job on a generated dataset,
# sampled by nvidia-smi, with extra environment for the binary.
train_run() {
  local name=$1 precision=$2 crop=$3 batch=$4 images=$5 ml=$W/train_$1
  shift 5
  if [ -n "$TRAIN_ONLY" ]; then case " $TRAIN_ONLY " in *" $name "*) ;; *) return 0 ;; esac; fi
  fits 25 "train $name" || return 0
  mkdir -p "$ml/input/config"
  cp -r "$W/train_data" "$ml/input/data"
  cat > "$ml/input/config/hyperparameters.json" <<J
{"num_classes": "21", "num_training_samples": "$images", "backbone": "resnet-50", "algorithm": "deeplab",
 "use_pretrained_model": "False", "crop_size": "$crop", "base_size": "520", "epochs": "$EPOCHS",
 "mini_batch_size": "$batch", "validation_mini_batch_size": "1", "learning_rate": "0.01", "seed": "1",
 "precision": "$precision"}
J
  log "train $name: deeplab resnet-50, precision $precision, crop $crop, batch $batch, $images images x $EPOCHS epochs $*"
  start_smi "$OUT/smi_train_$name.csv"
  /usr/bin/time -v timeout "$(cap "$T_TRAIN")" env "$@" "$BIN" --ml-root "$ml" train > "$OUT/train_$name.log" 2>&1
  echo "train $name exit $?" >> "$OUT/steps.log"
  stop_smi
  grep -h "train:throughput\|gpu_memory\|step phases" "$OUT/train_$name.log" | tail -n 3
  grep -h "ERROR\|rror:" "$OUT/train_$name.log" | tail -n 3
}

if has train; then
  timeout 120 "$BIN" synth --out "$W/train_data" --seed 3 --train-count "$DNTRAIN" --validation-count 2 \
    --width 640 --height 512 --num-classes 21 > "$OUT/synth.log" 2>&1 || log "synth failed"
  train_run auto512 auto "$CROP" "$BATCH" "$NTRAIN"
  # Where the step's time goes (each phase synchronised), and cuDNN's heuristics instead of timed algorithms.
  train_run auto512_phases auto "$CROP" "$BATCH" "$NTRAIN" SEMSEG_PROFILE_STEPS=1
  train_run auto512_heuristics auto "$CROP" "$BATCH" "$NTRAIN" SEMSEG_CUDNN_BENCHMARK=0
fi

# peer_train NAME CROP BATCH ARGS...: PyTorch's training step on the same device.
tdev=$DEVICE; [ "$tdev" = cpu ] || tdev=cuda
peer_train() {
  local name=$1 crop=$2 batch=$3; shift 3
  fits 25 "torch train $name" || return 0
  log "peer: torch train $name (crop $crop, batch $batch, $*)"
  start_smi "$OUT/smi_torch_$name.csv"
  (cd "$PEER" && timeout "$(cap 70)" "$PY" torch_train.py --device "$tdev" --models deeplabv3_resnet50 \
    --batch "$batch" --size "$crop" --warmup 3 --steps 10 "$@") > "$OUT/torch_train_$name.jsonl" \
    2> "$OUT/torch_train_$name.err"
  stop_smi
  tail -n 1 "$OUT/torch_train_$name.jsonl"
}

has peer && peer_train tf32_512 "$CROP" "$BATCH"
if has train; then
  train_run fp32_512 fp32 "$CROP" "$BATCH" "$NTRAIN"
  train_run bf16_512 bf16 "$CROP" "$BATCH" "$NTRAIN"
  train_run auto240 auto "$DCROP" "$DBATCH" "$DNTRAIN"
fi
if has peer; then
  peer_train strict32_512 "$CROP" "$BATCH" --no-tf32
  peer_train bf16cl_512 "$CROP" "$BATCH" --amp bf16 --channels-last
  peer_train tf32_240 "$DCROP" "$DBATCH"
fi

if [ -n "$REFPID" ]; then
  wait "$REFPID"
  tail -n 2 "$OUT/export.log" "$OUT/import.log"
fi

if has parity; then
  for p in fp32 auto bf16; do
    fits 20 "parity $p" || continue
    cache=$W/nv-cache; [ "$p" = fp32 ] && cache=$W/nv-cache-cold-predict
    log "parity: predict --precision $p (JIT cache $(basename "$cache"))"
    start=$(date +%s%N)
    CUDA_CACHE_PATH=$cache timeout "$(cap 90)" "$BIN" predict --precision "$p" --model "$W/model" \
      "$W/ref/input.png" --out "$W/pred_$p" --probabilities > "$OUT/predict_$p.log" 2>&1 || log "predict $p failed"
    echo "$p $(( ($(date +%s%N) - start) / 1000000 ))" >> "$OUT/predict_wall_ms.txt"
    "$PY" - "$W/ref/logits.npy" "$W/pred_$p/input.npy" "$p" >> "$OUT/parity.jsonl" 2>> "$OUT/parity.err" <<'PY'
import json, sys
import numpy as np
ref_logits, got_path, precision = sys.argv[1], sys.argv[2], sys.argv[3]
logits = np.load(ref_logits)[0].astype(np.float64)
e = np.exp(logits - logits.max(0)); ref = e / e.sum(0)
got = np.load(got_path).astype(np.float64)
print(json.dumps(dict(precision=precision, shape=list(got.shape),
  rel_l2=float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), max_abs=float(np.abs(got - ref).max()),
  argmax_agree=float((got.argmax(0) == ref.argmax(0)).mean()))))
PY
    tail -n 1 "$OUT/parity.jsonl"
  done
fi

if has parity && has peer && fits 30 "torch parity"; then
  log "parity of PyTorch itself on $tdev (fp32, TF32, bf16 autocast) against the same CPU reference"
  (cd "$PEER" && timeout "$(cap 60)" "$PY" - "$W/ref" "$tdev" >> "$OUT/parity_torch.jsonl" 2> "$OUT/parity_torch.err" <<'PY'
import json, sys
import numpy as np, torch
from PIL import Image
from safetensors.torch import load_file
from seg_models import build
ref, dev = sys.argv[1], sys.argv[2]
meta = json.load(open(f"{ref}/meta.json"))
m = build(meta["model"], seed=0).eval()
m.load_state_dict(load_file(f"{ref}/weights.safetensors"), strict=False)
m = m.to(dev)
px = torch.from_numpy(np.array(Image.open(f"{ref}/input.png").convert("RGB")))
x = (px.permute(2, 0, 1).float() / 255.0 - torch.tensor(meta["mean"])[:, None, None]) / torch.tensor(meta["std"])[:, None, None]
logits = np.load(f"{ref}/logits.npy")[0].astype(np.float64)
e = np.exp(logits - logits.max(0)); want = e / e.sum(0)
for name, tf32, amp in [("fp32", False, None), ("tf32", True, None), ("bf16", True, torch.bfloat16)]:
    if dev != "cuda" and name != "fp32":
        continue
    if dev == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    with torch.no_grad(), torch.autocast(dev, dtype=amp or torch.float32, enabled=amp is not None):
        got = torch.softmax(m(x[None].to(dev))["out"].float(), 1)[0].double().cpu().numpy()
    print(json.dumps(dict(peer="torch", precision=name, rel_l2=float(np.linalg.norm(got - want) / np.linalg.norm(want)),
        max_abs=float(np.abs(got - want).max()), argmax_agree=float((got.argmax(0) == want.argmax(0)).mean()))))
PY
  ); cat "$OUT/parity_torch.jsonl"
fi

if has serve && fits 40 serve; then
  log "serve: cold start to the first healthy /ping (empty JIT cache), then 30 invocations at c=1"
  mkdir -p "$W/ml" && cp -r "$W/model" "$W/ml/model"
  "$PY" -c "from PIL import Image; Image.open('$W/ref/input.png').convert('RGB').save('$W/in.jpg', quality=90)"
  start=$(date +%s%N)
  CUDA_CACHE_PATH=$W/nv-cache-cold-serve RUST_LOG=info,semseg::serve::timing=debug SAGEMAKER_BIND_TO_PORT=$PORT \
    SEMSEG_ML_ROOT=$W/ml timeout "$(cap 120)" "$BIN" serve > "$OUT/serve.log" 2>&1 &
  SPID=$!
  ready=
  for _ in $(seq 1200); do
    if curl -sf "localhost:$PORT/ping" > /dev/null 2>&1; then ready=$(( ($(date +%s%N) - start) / 1000000 )); break; fi
    kill -0 $SPID 2>/dev/null || break
    sleep 0.1
  done
  echo "${ready:-never}" > "$OUT/serve_ready_ms.txt"
  log "serve: healthy after ${ready:-never} ms"
  curl -s -m 30 -o "$W/mask.png" -w "%{http_code} %{content_type} %{time_total}\n" -H 'Content-Type: image/jpeg' \
    -H 'Accept: image/png' --data-binary @"$W/in.jpg" "localhost:$PORT/invocations" | tee "$OUT/serve_first.txt"
  for _ in $(seq 30); do
    curl -s -m 30 -o /dev/null -w "%{http_code} %{time_total}\n" -H 'Content-Type: image/jpeg' \
      -H 'Accept: image/png' --data-binary @"$W/in.jpg" "localhost:$PORT/invocations"
  done > "$OUT/serve_times.txt"
  # An image of a size the server has not seen: what a new size costs (cuDNN's heuristics, no timing, in serve).
  "$PY" -c "from PIL import Image; Image.open('$W/ref/input.png').convert('RGB').resize((480, 352)).save('$W/new_size.jpg', quality=90)"
  curl -s -m 30 -o /dev/null -w "%{http_code} %{time_total}\n" -H 'Content-Type: image/jpeg' \
    -H 'Accept: image/png' --data-binary @"$W/new_size.jpg" "localhost:$PORT/invocations" > "$OUT/serve_new_size.txt"
  kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null
fi

if has quality && fits 40 quality; then
  timeout 60 "$BIN" synth --out "$W/quality_data" --seed 5 --train-count 24 --validation-count 8 --width 96 \
    --height 72 > /dev/null 2>&1
  log "quality: the CI recipe in auto, fp32 and bf16 (three jobs side by side; each is tiny)"
  qt=$(cap 150)
  for p in auto fp32 bf16; do
    ml=$W/quality_$p
    mkdir -p "$ml/input/config" && cp -r "$W/quality_data" "$ml/input/data"
    cat > "$ml/input/config/hyperparameters.json" <<J
{"num_classes": "4", "num_training_samples": "24", "backbone": "resnet-18", "algorithm": "fcn",
 "use_pretrained_model": "False", "crop_size": "64", "base_size": "96", "epochs": "$QEPOCHS",
 "mini_batch_size": "4", "validation_mini_batch_size": "1", "learning_rate": "0.05", "output_stride": "8",
 "seed": "1", "precision": "$p"}
J
    ( timeout "$qt" "$BIN" --ml-root "$ml" train > "$OUT/quality_$p.log" 2>&1
      echo "quality $p exit $?" >> "$OUT/steps.log" ) &
  done
  wait
  for p in auto fp32 bf16; do
    echo "$p $(grep -o "validation:mIOU=[0-9.]*" "$OUT/quality_$p.log" | sort -t= -k2 -n | tail -n 1)"
  done
fi

if has peer && fits 30 "torch inference"; then
  log "peer: PyTorch inference ${PSIZE}x${PSIZE} batch 1"
  (cd "$PEER" && timeout "$(cap 90)" "$PY" - "$tdev" "$PSIZE" > "$OUT/torch_infer.json" 2> "$OUT/torch_infer.err" <<'PY'
import json, sys, time
import torch
from seg_models import build
dev, size = sys.argv[1], int(sys.argv[2])
cuda = dev == "cuda"
torch.backends.cudnn.benchmark = True
m = build("deeplabv3_resnet50", seed=0).eval().to(dev)
x = torch.randn(1, 3, size, size, device=dev)
sync = torch.cuda.synchronize if cuda else (lambda: None)
res = {}
for name, tf32, amp in [("fp32", False, None), ("tf32", True, None), ("bf16", True, torch.bfloat16)]:
    if not cuda and name != "fp32":
        continue  # TF32 and bf16 autocast are GPU measures
    if cuda:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    with torch.no_grad(), torch.autocast(dev, dtype=amp or torch.float32, enabled=amp is not None):
        for _ in range(5):
            m(x)
        sync(); ts = []
        for _ in range(20):
            sync(); t = time.perf_counter(); m(x)["out"].argmax(1).cpu(); ts.append(time.perf_counter() - t)
    ts.sort(); res[name] = dict(median_ms=1000 * ts[10], min_ms=1000 * ts[0])
print(json.dumps(res))
PY
  ); cat "$OUT/torch_infer.json"
fi

if has summary; then
  log "summary"
  "$PY" - "$OUT" > "$OUT/summary.json" 2> "$OUT/summary.err" <<'PY'
import glob, json, os, re, statistics, sys
out = sys.argv[1]
def read(name, default=None):
    try:
        return open(os.path.join(out, name)).read()
    except OSError:
        return default
def smi_peak_gib(name):
    rows = [l.split(",")[0].strip() for l in (read(name, "") or "").splitlines() if "," in l]
    mem = [float(m) for m in rows if m.replace(".", "").isdigit()]
    return max(mem) / 1024 if mem else None
def jsonl(name):
    text = read(name, "") or ""
    rows = [json.loads(l) for l in text.splitlines() if l.strip().startswith("{")]
    return rows[-1] if rows else None
s = {"gpu": (read("gpu.txt", "") or "").strip().splitlines()[-1:] or None,
     "missing_libraries": [l.strip() for l in (read("ldd.txt", "") or "").splitlines() if "not found" in l]
                          # NVIDIA's libraries, opened at run time: `--device cuda` names those it cannot load.
                          + [l.strip() for l in (read("device_check.log", "") or "").splitlines()
                             if "cannot open CUDA device" in l]}
try:
    s["device_check"] = json.loads(read("device_check.json", "null"))
except Exception as e:
    s["device_check"] = f"unreadable: {e}"
s["steps"] = (read("steps.log", "") or "").splitlines()
# Candle's modules load from fat binaries with machine code for the build's CUDA_SASS_ARCHS; a module whose fat
# binary the driver refused says so on stderr and JIT-compiles its PTX instead.
s["fatbin_fallbacks"] = sum((open(f).read().count("fat binary did not load"))
                            for f in glob.glob(os.path.join(out, "*.log")))
# A run asked for bf16 whose GPU lacked the bf16 kernels logs why and runs TF32: its figures are not bf16's.
s["precision_fallbacks"] = sorted({m for f in glob.glob(os.path.join(out, "*.log"))
                                   for m in re.findall(r"precision=bf16 cannot run here[^\n]*", open(f).read())})
s["build"] = (read("build-info.txt", "") or "").strip() or None
s["kernel_load_s"] = {os.path.basename(f): re.findall(r"GPU kernels loaded.*?seconds=([0-9.]+)", open(f).read())
                      for f in sorted(glob.glob(os.path.join(out, "*.log")))
                      if "GPU kernels loaded" in open(f).read()}
try:
    s["op_timing"] = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                      for r in json.loads(read("op_timing.json", "null"))["timings"]]
except Exception as e:
    s["op_timing"] = f"unreadable: {e}"
s["parity"] = [json.loads(l) for l in (read("parity.jsonl", "") or "").splitlines() if l.strip()]
s["predict_wall_ms"] = dict(l.split() for l in (read("predict_wall_ms.txt", "") or "").splitlines() if l.strip())
for p in ("fp32", "auto", "bf16"):
    ms = [float(m) for m in re.findall(r"ms=([0-9.]+)", read(f"predict_{p}.log", "") or "")]
    if ms:
        s.setdefault("predict_ms", {})[p] = ms
s["parity_torch"] = [json.loads(l) for l in (read("parity_torch.jsonl", "") or "").splitlines() if l.strip()]
s["serve_ready_ms"] = (read("serve_ready_ms.txt", "") or "").strip() or None
times = sorted(float(l.split()[1]) * 1e3 for l in (read("serve_times.txt", "") or "").splitlines()
               if l.startswith("200 "))
if times:
    s["serve_c1_ms"] = dict(n=len(times), p50=times[len(times) // 2], min=times[0], max=times[-1])
new_size = (read("serve_new_size.txt", "") or "").split()
if len(new_size) == 2 and new_size[0] == "200":
    s["serve_new_size_ms"] = float(new_size[1]) * 1e3
model_ms = sorted(float(m) for m in re.findall(r"model_ms=([0-9.]+)", read("serve.log", "") or ""))
if model_ms:
    s["serve_model_ms_p50"] = model_ms[len(model_ms) // 2]
s["train"] = {}
for log in sorted(glob.glob(os.path.join(out, "train_*.log"))):
    name = os.path.basename(log)[6:-4]
    text = open(log).read()
    thr = re.findall(r"train:throughput=([0-9.]+)", text)
    smi = [l.split(",") for l in (read(f"smi_train_{name}.csv", "") or "").splitlines() if "," in l]
    util = [float(u) for _, u in smi if u.strip().replace(".", "").isdigit()]
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    s["train"][name] = dict(images_per_s_by_epoch=[float(t) for t in thr],
        smi_peak_gib=smi_peak_gib(f"smi_train_{name}.csv"),
        logged_gpu_memory_max_gib=[float(g) for g in re.findall(r"gpu_memory_max_gib=\"?([0-9.]+)", text)],
        mean_gpu_util=statistics.mean(util) if util else None,
        logged_gpu_utilisation_percent=[float(u) for u in re.findall(r"gpu_utilisation_percent=\"?([0-9.]+)", text)],
        tensors_max_gib=[float(g) for g in re.findall(r"tensors_max_gib=\"?([0-9.]+)", text)],
        compute_dtype=(re.findall(r"compute_dtype=(\w+)", text) or [None])[0],
        step_memory_bound_gib=next((float(g) for g in re.findall(r"at_least_gib=\"?([0-9.]+)", text)), None),
        step_phases_ms=(re.findall(r"step phases, ms per step: ([^\n]*)", text) or [None])[-1],
        host_peak_rss_gib=int(rss.group(1)) / 2**20 if rss else None,
        error=(re.findall(r"(?:ERROR|error).*", text) or [None])[-1])
s["quality_miou"] = {}
for p in ("auto", "fp32", "bf16"):
    m = re.findall(r"validation:mIOU=([0-9.]+)", read(f"quality_{p}.log", "") or "")
    s["quality_miou"][p] = max(map(float, m)) if m else None
s["torch_train"] = {}
for f in sorted(glob.glob(os.path.join(out, "torch_train_*.jsonl"))):
    name = os.path.basename(f)[12:-6]
    s["torch_train"][name] = dict(result=jsonl(os.path.basename(f)), smi_peak_gib=smi_peak_gib(f"smi_torch_{name}.csv"))
try:
    s["torch_infer"] = json.loads(read("torch_infer.json", "null"))
except Exception:
    s["torch_infer"] = None
print(json.dumps(s, indent=1))
PY
  cat "$OUT/summary.json"
fi
log "done"
rm -rf "$W"
