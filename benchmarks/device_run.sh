#!/usr/bin/env bash
# The accelerator check of one lent device session, in one call (device time is scarce: 15 min a
# session, a machine's start included): the paper's Figure 1 for the published model at 392x518,
# ours against upstream (benchmarks/published.py), within 9 minutes:
#   1. setup, versions and a smoke run (`xsvggt demo`: the shipped model end to end; it also swaps in
#      the pinned flax when the image's breaks our Linen modules);
#   2. benchmarks.published: ours none / xstream / xstream-int4 (budget 2048, pool 16, KCVT 4-bit
#      group 64) x bfloat16 / auto / float32 to frames 1, 50, 100, 200 (compressed: also 500, 1000),
#      and upstream StreamVGGT and XStreamVGGT under bf16 autocast, essentials first; programs are
#      compiled 4 at a time (XLA:GPU compiled this model's step in 16-63 s a program on H100/H200,
#      2026-11-26); whatever does not fit PUBLISHED_S is skipped or cut short, with the reason logged
#      in the JSON Lines' first ("meta") line;
#   3. benchmarks.packed (before 2, within PACKED_TIMEOUT_S, default 140 s; 2's share shrinks by as
#      much): `--attention packed` vs the dequantizing path at the published size, quantize-once
#      xstream-int4 (budget 2048, KCVT 4-bit group 64), dtype auto: one global layer's attention (ms,
#      bytes accessed, bytes the attention moves) and the whole step (compile s, ms/frame), the Pallas
#      kernel's first run on a GPU -> $OUT/packed_gpu.jsonl.
# The earlier checks (parity tests on the accelerator, benchmarks.batch, benchmarks.many) ran from
# this script's previous version (see its git history; results in benchmarks/results/*_gpu_h200_*).
# Run from the repository root with OUT set (a folder the results go to). It expects:
#   .whl/  wheels the device image lacks (plyfile), installed into /tmp/site;
#   .ref/  a copy of ../shared/reference without weights.safetensors (the tests look for
#          <repo>/../shared/reference; the working tree that travels is capped at 64 MiB):
#          cp -r ../shared/reference .ref && rm .ref/tiny/weights.safetensors
#   .upstream/  (optional) an upstream XStreamVGGT checkout, prune_and_quantize branch (its src/ holds
#          streamvggt; KV_PRUNE_MODE=none is StreamVGGT), without checkpoints; git-ignored. Absent, or
#          no torch in the image: the upstream part is skipped with a logged reason.
#   All three are git-ignored / in .git/info/exclude (never committed) and named in the call's `carry`.
# Call the tool with timeout_s 600; the whole script stays under 540 s.
# Dry run on CPU (tiny sizes, no GPU): OUT=/tmp/o PUBLISHED_ARGS="--config tiny --height 56 --width 70
#   --frames 3 --record 1,2 --record-long 3" PACKED_ARGS="--config micro --height 28 --width 28 --budget 24
#   --group 4 --frames 3 --repeats 3" SKIP_SETUP=1 bash benchmarks/device_run.sh
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
: "${OUT:?set OUT to the results folder}"
step() { echo "== $(date -u +%T) $*"; }

if [ -z "${SKIP_SETUP:-}" ]; then
  step setup
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/plyfile-*.whl \
    || exit 1
  export PYTHONPATH="$PWD:/tmp/site"
  if [ -d .ref ] && [ ! -e ../shared/reference ]; then mkdir -p ../shared && ln -s "$PWD/.ref" ../shared/reference; fi
  nvidia-smi -L
  python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|numpy|torch) ' || true

  step smoke: xsvggt demo
  if ! timeout 90 python3 -m xsvggt_jax.app.cli demo --out /tmp/demo --overwrite >"$OUT/demo.log" 2>&1; then
    tail -5 "$OUT/demo.log"
    step "demo failed with the image's flax; trying flax 0.12.8"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/flax-*.whl || exit 1
    timeout 90 python3 -m xsvggt_jax.app.cli demo --out /tmp/demo --overwrite >"$OUT/demo.log" 2>&1 \
      || { tail -30 "$OUT/demo.log"; exit 1; }
  fi
  grep -v "^WARNING" "$OUT/demo.log" | tail -4
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

step "packed attention vs dequantizing (quantize once, xstream-int4)"
timeout "${PACKED_TIMEOUT_S:-140}" python3 -m benchmarks.packed --time-limit "${PACKED_S:-75}" ${PACKED_ARGS:-} \
  --out "$OUT/packed_gpu.jsonl" 2>&1 | grep -vE '^WARNING: All log|^I0000|^W0000' | tail -12

step "published: ours vs upstream"
UP=()
if [ -d .upstream ]; then UP=(--upstream-src .upstream --upstream-python python3); else echo "no .upstream/: upstream skipped"; fi
# the benchmark stops starting work at --time-limit; the outer timeout is the backstop
timeout "${PUBLISHED_TIMEOUT_S:-280}" python3 -m benchmarks.published --time-limit "${PUBLISHED_S:-250}" \
  --compile-workers 4 "${UP[@]}" ${PUBLISHED_ARGS:-} --out "$OUT/published_gpu_vs_upstream.jsonl" -v 2>&1 \
  | grep -vE '^WARNING: All log|^I0000|^W0000' | tail -60
step done
