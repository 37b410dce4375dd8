#!/usr/bin/env bash
# Memory-safety check of the CPU kernels' unsafe code (src/model/ops: SIMD micro-kernels, Winograd transforms,
# unzeroed output buffers), which the ordinary tests only check by their results. Three passes:
#   1. the library's unit tests built with AddressSanitizer (and debug assertions), leak detection on;
#   2. the three ResNet-50 networks' inference (fp32 and bf16) at 512² and at odd sizes, their training steps with
#      the auxiliary head, and `semseg demo --no-serve`, all built with AddressSanitizer;
#   3. the kernels' unit tests (model::ops) under valgrind's memcheck, which also flags reads of uninitialised
#      memory. valgrind's CPU has no AVX-512, so this pass runs the AVX2 kernels, which a CPU with AVX-512 never
#      takes otherwise; passes 1 and 2 run whatever the machine has. MEMCHECK_TESTS picks other unit tests (a test
#      name filter; "" runs all of them, which takes well over an hour: the training tests crawl under valgrind).
# Needs the nightly toolchain (`-Zsanitizer`) and valgrind; not part of CI (a cold sanitizer build takes about 30
# minutes on 2 cores). Exits non-zero at the first finding. Run it after changing unsafe code in src/model/ops.
#
#   scripts/check-memory-safety.sh            # all three passes
#   PASSES="1 3" scripts/check-memory-safety.sh
set -euo pipefail
cd "$(dirname "$0")/.."
passes=${PASSES:-1 2 3}
target=x86_64-unknown-linux-gnu
asan_dir=${ASAN_TARGET_DIR:-target-asan}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1}

asan_cargo() {
  RUSTFLAGS="-Zsanitizer=address -Cdebug-assertions=on -Cforce-frame-pointers=yes" \
    cargo +nightly "$@" --release --locked --target "$target" --target-dir "$asan_dir"
}

# The test binary a `cargo test --no-run` built, from its JSON messages.
test_binary() {
  "$@" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
paths = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]]
print(paths[-1])'
}

for pass in $passes; do
  case $pass in
    1)
      echo "== pass 1: unit tests with AddressSanitizer"
      asan_cargo test --lib --no-run
      binary=$(test_binary asan_cargo test --lib)
      "$binary" --test-threads=2 -q
      ;;
    2)
      echo "== pass 2: whole networks with AddressSanitizer"
      asan_cargo build --bin semseg --example bench_infer --example bench_train
      bin=$asan_dir/$target/release
      for precision in fp32 bf16; do
        for size in "512 512" "97 131"; do
          # shellcheck disable=SC2086
          "$bin/examples/bench_infer" --size $size --warmup 0 --runs 2 --models fcn,deeplab,psp --precision "$precision"
        done
      done
      "$bin/examples/bench_infer" --size 200 72 --warmup 0 --runs 1 --models fcn,deeplab,psp --backbone resnet-18
      "$bin/examples/bench_train" --size 256 256 --batch 2 --steps 2 --aux --models fcn,deeplab,psp
      "$bin/examples/bench_train" --size 72 104 --batch 3 --steps 2 --aux --models fcn,deeplab,psp
      demo=$(mktemp -d /tmp/semseg-asan-demo.XXXXXX)
      "$bin/semseg" demo --dir "$demo/ml" --no-serve --epochs 2
      rm -rf "$demo"
      ;;
    3)
      filter=${MEMCHECK_TESTS-model::ops}
      echo "== pass 3: unit tests '${filter:-all}' under valgrind memcheck (AVX2 paths)"
      cargo test --release --locked --lib --no-run
      binary=$(test_binary cargo test --release --locked --lib)
      # shellcheck disable=SC2086 # an empty filter runs every test
      valgrind --error-exitcode=99 --quiet "$binary" $filter --test-threads=1 -q
      ;;
    *)
      echo "unknown pass '$pass' (1, 2 or 3)" >&2
      exit 2
      ;;
  esac
done
echo "== memory-safety check passed: passes $passes"
