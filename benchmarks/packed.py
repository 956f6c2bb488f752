"""Packed attention (`--attention packed`) vs the dequantizing path: one global layer and the whole step.

    python -m benchmarks.packed --out $OUT/packed.jsonl                                   # GPU, published size
    python -m benchmarks.packed --config micro --height 28 --width 28 --budget 24 --group 4 \\
        --frames 4 --out /tmp/packed.jsonl                                                # CPU dry run

Cache: quantize once (`--quant-once`), xstream, budget `--budget`, pool 16, KCVT `--bits`-bit codes in
groups of `--group` (the published size: 16 heads x 64, 1041 tokens a frame at 392x518, a layer holding
max(2048, 2 x 1041) = 2082 tokens).

Layer (random K/V encoded into a full layer, the compute dtype of `--dtype`): a frame's queries attend
to the layer, as the step does it,
  dequantize  decode the stored codes to float K/V, then `attend` (the default path);
  packed      `packed_attend.attend` (the Pallas kernel on a GPU, the JAX function elsewhere);
  packed-jax  the JAX function, forced,
each alone ("attention") and with the cache update of the call ("layer": append, quantize, prune; the
xstream score decodes K either way). Per row: ms per call (median of `--repeats`, synchronised), XLA's
"bytes accessed" of the compiled program (a Pallas kernel is opaque to it), and `bytes_model`: the
bytes the attention must move, codes + group parameters of the keys (`packed.bytes_read`), plus for
dequantize the float K/V written and read back (4 x keys x heads x dims x dtype bytes).
Step: `step` with random weights (`init_params(cfg, PRNGKey(0))`), attention packed, then auto: compile
seconds and ms/frame (median over the frames after the first two, when the cache is full and pruned).

Output: JSON Lines (`--out`, each row written as it is measured), one object per (part, path): part
"layer"|"attention"|"step", path, ms, bytes_accessed, bytes_model, compile_s, and a first "meta" row
(device, settings). A step run that would start after `--time-limit` is skipped ("skipped" row).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.attention import options
from xsvggt_jax.attention.dispatch import attend, packed_kernel
from xsvggt_jax.attention.packed import bytes_read
from xsvggt_jax.cache import kivi, packed_attend
from xsvggt_jax.cache.core import CacheConfig, LayerCache, LayerKV, init_cache
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.model import init_params
from xsvggt_jax.stream import step as step_mod

log = logging.getLogger("benchmarks.packed")


def _timed(fn: Callable, args: tuple, repeats: int) -> tuple[float, float, float | None]:
    """(compile s, median ms per call, XLA bytes accessed) of jit(fn)(*args)."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    accessed = (cost or {}).get("bytes accessed")
    jax.block_until_ready(compiled(*args))
    ms = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        ms.append(1e3 * (time.perf_counter() - t))
    return compile_s, statistics.median(ms), None if accessed is None else float(accessed)


def layer_rows(cfg: ModelConfig, cc: CacheConfig, hw, repeats: int, emit: Callable[[dict], None]) -> None:
    """The layer and attention rows (module docstring)."""
    h, d = cfg.num_heads, cfg.head_dim
    n = cfg.tokens_per_frame(*hw)
    dtype = cfg.trunk_jnp_dtype
    empty = init_cache(cfg, cc, 1, hw).global_kv[0]     # a fresh cache's first global layer, then filled
    slots = empty.k.slots
    kc, vc = cc.codecs()
    rng = np.random.default_rng(0)
    fill = lambda p, codec: p.replace(**_fields(codec.encode(jnp.asarray(rng.standard_normal((1, h, slots, d)),
                                                                          jnp.float32))))
    window = lambda w: None if w is None else jnp.asarray(rng.standard_normal(w.shape), w.dtype)
    kv = LayerKV(fill(empty.k, kc), fill(empty.v, vc), k_win=window(empty.k_win), v_win=window(empty.v_win))
    length = jnp.int32(slots // cc.group * cc.group - 1)   # full but for one token: a window in use
    q, k, v = (jnp.asarray(rng.standard_normal((1, h, n, d)), dtype) for _ in range(3))
    layer = LayerCache(kv, length, jax.random.PRNGKey(0), cc, cfg.num_special_tokens)

    def dequantize(layer, q, k, v):
        k_att, v_att, mask, nxt = layer.update(q, k, v)
        return attend(q, k_att, v_att, mask=mask), nxt

    def packed(layer, q, k, v):
        return layer.attend_packed(q, k, v)

    def attention_only(path):
        def run(layer, q, k, v):
            if path == "dequantize":
                k_att = kivi.view(layer.kv.k, layer.kv.k_win, k, layer.length, slots + n)
                v_att = kivi.view(layer.kv.v, layer.kv.v_win, v, layer.length, slots + n)
                return attend(q, k_att, v_att, mask=jnp.where(jnp.arange(slots + n) < layer.length + n, 0.0,
                                                               -jnp.inf))
            return packed_attend.attend(layer.kv, layer.length, q, k, v, cc)
        return run

    ops = [packed_attend.operand(kv.k), packed_attend.operand(kv.v)]
    codes_params = bytes_read(*ops, int(length))
    float_kv = 4 * int(length) * h * d * jnp.dtype(dtype).itemsize
    for path, kernel in (("dequantize", None), ("packed", None), ("packed-jax", "jax")):
        with options(packed_kernel=kernel):
            ran = "dequantize" if path == "dequantize" else packed_kernel(*ops)
            for part, fn in (("attention", attention_only("dequantize" if path == "dequantize" else "packed")),
                             ("layer", dequantize if path == "dequantize" else packed)):
                compile_s, ms, accessed = _timed(fn, (layer, q, k, v), repeats)
                emit({"part": part, "path": path, "kernel": ran, "ms": ms, "compile_s": compile_s,
                      "bytes_accessed": accessed, "bytes_model": codes_params + (float_kv if path == "dequantize" else 0),
                      "keys": int(length), "queries": n, "heads": h, "head_dim": d, "dtype": jnp.dtype(dtype).name})


def _fields(p) -> dict:
    return {"codes": p.codes, "scale": p.scale, "zero": p.zero}


def step_rows(cfg: ModelConfig, cc: CacheConfig, hw, frames: int, deadline: float,
              emit: Callable[[dict], None]) -> None:
    """ms/frame of the whole step, attention auto vs packed."""
    params = init_params(cfg, jax.random.PRNGKey(0))
    for attention in ("packed", "auto"):
        if time.monotonic() > deadline:
            emit({"part": "skipped", "path": attention, "reason": "--time-limit reached"})
            continue
        cache = init_cache(cfg, cc, 1, hw)
        frame = jnp.asarray(np.random.default_rng(0).random((1, *hw, 3)), jnp.float32)
        t = time.perf_counter()
        fn = jax.jit(lambda p, c, f, a=attention: step_mod.step(cfg, cc, p, c, f, attention=a),
                     donate_argnums=(1,)).lower(params, cache, frame).compile()
        compile_s = time.perf_counter() - t
        ms = []
        for i in range(frames):
            f = jnp.asarray(np.random.default_rng(i).random((1, *hw, 3)), jnp.float32)
            t = time.perf_counter()
            cache, out = fn(params, cache, f)
            jax.block_until_ready(out)
            ms.append(1e3 * (time.perf_counter() - t))
        emit({"part": "step", "path": attention, "ms": statistics.median(ms[2:] or ms), "ms_per_frame": ms,
              "compile_s": compile_s, "frames": frames})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.packed", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("published", "medium", "tiny", "micro"), default="published")
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--dtype", default="auto", help="model compute dtype (default auto)")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--frames", type=int, default=8, help="frames of the step runs (0: no step runs)")
    p.add_argument("--time-limit", type=float, default=150.0, help="no step run starts after this (seconds)")
    p.add_argument("--out", type=Path, required=True, help="JSON Lines")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    deadline = time.monotonic() + args.time_limit
    cfg = ModelConfig.preset(args.config).replace(dtype=args.dtype)
    cc = CacheConfig(prune="xstream", budget=args.budget, pool=16, quant="kcvt", bits=args.bits, group=args.group,
                     quant_head_dim=None if args.config != "published" else 64, quant_once=True)
    hw = (args.height, args.width)
    dev = jax.devices()[0]
    meta = {"part": "meta", "device": str(dev), "device_kind": dev.device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__, "config": args.config, "hw": list(hw), "cache": cc.__dict__.copy(),
            "dtype": args.dtype}
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("")

    def emit(row: dict) -> None:   # each row as it comes: a run cut short keeps what it measured
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        log.info("%s", {k: v for k, v in row.items() if k not in ("cache", "ms_per_frame")})

    emit(meta)
    layer_rows(cfg, cc, hw, args.repeats, emit)
    if args.frames:
        step_rows(cfg, cc, hw, args.frames, deadline, emit)
    return rows


if __name__ == "__main__":
    main()
