#!/usr/bin/env bash
# The accelerator checks of one lent device session, in one call (device time is scarce: 15 min a
# session, a machine's start included). XLA:GPU compiles this model's step in 16-63 s a program (H100
# and H200, 2026-11-26, 4-8 at once on 16 host cores), so each step below compiles few programs:
#   1. versions and a smoke run (`xsvggt demo`: the shipped model end to end);
#   2. the upstream parity tests on the accelerator (tests/test_parity.py, CPU tolerances; on the H200
#      19 of 20 passed and the 20th, KTVT, is now checked frame by frame: see KTVT_NEAR_TIE_FRAME);
#   3. frames/s of the pool step, medium 112x154, B = 1 and 8, float32 and bfloat16;
#   4. the many-scene benchmark (20 scenes, continuous vs one at a time, slots batched);
#   5. medium at the published frame size 392x518, B = 1 and 8, float32 and bfloat16.
# On the H200 (2026-11-26) the steps took 33 / 125 / 87 / 82 / 112 s: about 440 s of the 590 s of limits.
# Results of that run: benchmarks/results/*_gpu_h200_* and benchmarks/README.md ("On a GPU").
# Run from the repository root with OUT set (a folder the results go to). It expects:
#   .whl/  wheels the device image lacks (plyfile), installed into /tmp/site;
#   .ref/  a copy of ../shared/reference without weights.safetensors (the tests look for
#          <repo>/../shared/reference; the working tree that travels is capped at 64 MiB):
#          cp -r ../shared/reference .ref && rm .ref/tiny/weights.safetensors
#   Both are listed in .git/info/exclude (never committed) and named in the call's `carry`.
# Each step has its own time limit (590 s in all: call the tool with timeout_s 600), so one that
# overruns loses only its own numbers.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
: "${OUT:?set OUT to the results folder}"
step() { echo "== $(date -u +%T) $*"; }

step setup
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/plyfile-*.whl \
  || exit 1
export PYTHONPATH="$PWD:/tmp/site"
if [ -d .ref ] && [ ! -e ../shared/reference ]; then mkdir -p ../shared && ln -s "$PWD/.ref" ../shared/reference; fi
nvidia-smi -L
python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|chex|optax|orbax|numpy) ' || true

step smoke: xsvggt demo
# A flax from the image that breaks our Linen modules is replaced by the pinned one, once.
if ! timeout 90 python3 -m xsvggt_jax.app.cli demo --out /tmp/demo --overwrite >"$OUT/demo.log" 2>&1; then
  tail -5 "$OUT/demo.log"
  step "demo failed with the image's flax; trying flax 0.12.8"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/flax-*.whl || exit 1
  timeout 90 python3 -m xsvggt_jax.app.cli demo --out /tmp/demo --overwrite >"$OUT/demo.log" 2>&1 \
    || { tail -30 "$OUT/demo.log"; exit 1; }
fi
grep -v "^WARNING" "$OUT/demo.log" | tail -12

step parity tests on the accelerator
# -v and tee: each test's name and result reach $OUT/parity.log as it ends, even if the limit cuts the run
# (the first lent session lost which test failed to a `| tail` that the time limit killed)
timeout "${PARITY_S:-150}" python3 -m pytest -v -p no:cacheprovider -p no:benchmark -n 4 --dist load \
  tests/test_parity.py 2>&1 | grep -E 'PASSED|FAILED|ERROR|^E  |passed|failed' | tee "$OUT/parity.log" | tail -30

step batch: medium 112x154, float32 and bfloat16
timeout "${BATCH_S:-110}" python3 -m benchmarks.batch --configs medium --batches 1,8 --devices 1 \
  --dtypes float32,bfloat16 --compile-workers 4 --steps 20 --out-dir "$OUT" --name batch_gpu_medium 2>&1 | grep -v '^WARNING'

step many: 20 scenes, slots batched
timeout "${MANY_S:-100}" python3 -m benchmarks.many --scenes 20 --runs continuous,one-at-a-time --slot-compute batched \
  --out-dir "$OUT" --name many_gpu 2>&1 | grep -E '^\||Traceback|Error' | tail -12

step batch: medium at 392x518
timeout "${LARGE_S:-140}" python3 -m benchmarks.batch --configs medium --batches 1,8 --devices 1 --height 392 --width 518 \
  --dtypes float32,bfloat16 --compile-workers 4 --steps 10 --out-dir "$OUT" --name batch_gpu_392x518 2>&1 | grep -v '^WARNING'
step done
