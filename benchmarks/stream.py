"""Streaming benchmark: per-frame latency, compile time, traces, FLOP floor and cache bytes per setting.

    python -m benchmarks.stream --config tiny --frames 20 --settings none,xstream,xstream-int4,sliding

Random weights (`init_params(cfg, PRNGKey(0))`) and deterministic random frames
(`np.random.default_rng(0)`, one [1, H, W, 3] float32 image drawn per frame, the same frames for
every setting). For each cache setting the step (`xsvggt_jax.stream.step.step`, jitted here with the cache
donated, as `make_step` does) is lowered and compiled explicitly (timed apart from execution), then
every frame is run once and timed device-synchronised (`jax.block_until_ready` on the new cache and
the outputs). Summary latencies are medians over frame windows (early: frames [5, 15), late: the last
10 frames; clipped for short runs, windows are half-open and reported).

FLOP floor: XLA's cost analysis of the compiled step divided by the matmul peak measured in the same
process (a jitted square matmul in the compute dtype and precision), counted on the step compiled with
attention unblocked (see `step_flops`; XLA counts a loop body once). Pruned caches have static
shapes, so the analysed step is the per-frame cost at the budget (masked slots counted). `none`
attends over its filled prefix in a loop whose trip count grows with the stream; XLA's cost analysis
counts a loop body once (one chunk), so for `none` the FLOPs are those of an early frame and no
floor ratio is reported.

Writes `<out-dir>/<name>.json` and `<out-dir>/<name>.png` (atomically) and prints a markdown table.
`--upstream-src` optionally times upstream PyTorch StreamVGGT (aggregator + camera head) in a
separate interpreter; see `benchmarks/upstream_stream.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax import attention
from xsvggt_jax.cache import quant
from xsvggt_jax.stream import step as step_mod
from xsvggt_jax.cache.core import CacheConfig, StreamCache, cache_report, init_cache
from xsvggt_jax.config import PRESETS, ModelConfig
from xsvggt_jax.io.fsutil import atomic_write, atomic_write_text
from xsvggt_jax.nn.model import init_params
from xsvggt_jax.stream.pipeline import filled_bytes
from xsvggt_jax.runtime import peak_rss_bytes

log = logging.getLogger(__name__)

SCHEMA = 1
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: the benchmarked cache settings -> their text (`CacheConfig.from_text`) at --budget and --bits
SETTINGS = {"none": "none", "xstream": "xstream:{budget}", "xstream-int4": "xstream-int{bits}:{budget}",
            "sliding": "sliding:{budget}"}
EARLY_WINDOW = (5, 15)
LATE_FRAMES = 10


CONFIGS = {name: PRESETS[name] for name in ("tiny", "medium", "published")}  # model presets benchmarked
DEFAULT_HW = {"tiny": (112, 154), "medium": (392, 518), "published": (392, 518)}


def cache_setting(name: str, budget: int, bits: int) -> CacheConfig:
    """A named cache setting of SETTINGS: `budget` tokens when pruned, `bits`-bit codes when quantized."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
    return CacheConfig.from_text(SETTINGS[name].format(budget=budget, bits=bits))


# ------------------------------------------------------------------------------------------ helpers
def device_peak_bytes() -> int | None:
    """Peak device memory in use so far (GPU/TPU), None where the backend does not report it."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def flops_of(compiled) -> float | None:
    """'flops' from XLA's cost analysis (a dict, or a list of dicts on some versions)."""
    try:
        ca = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001 - not every backend implements it
        log.warning("cost analysis unavailable: %s", e)
        return None
    if isinstance(ca, dict):
        ca = [ca]
    total = sum(float(d.get("flops", 0.0)) for d in (ca or []) if d)
    return total or None


def step_flops(fn: Callable, *args) -> float | None:
    """FLOPs of one step: XLA cost analysis of `fn` compiled with attention in one fusion
    (`attention.options(cpu_query_block=None)`: same math as the timed step, which may walk its
    queries in a `lax.map`). A separate compile; the timed function's trace count is untouched."""
    with attention.options(cpu_query_block=None):
        compiled = jax.jit(fn).lower(*args).compile()
    flops = flops_of(compiled)
    del compiled
    return flops


def median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if len(xs) else None


def windows(n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Half-open (early, late) frame windows for the summary medians, clipped for short runs: frame 0
    (it also pays for the first dispatch) is left out whenever another frame exists."""
    first = 1 if n > 1 else 0
    lo, hi = EARLY_WINDOW
    early = (lo, min(hi, n)) if n > lo else (first, n)
    late = (max(n - LATE_FRAMES, first), n)
    return early, late


def matmul_peak(n: int, dtype: str, precision, inner: int, repeats: int = 5) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] matmul chain (`inner` matmuls per call, median of `repeats`)."""
    ka, kb = jax.random.split(jax.random.PRNGKey(1))
    a = (jax.random.normal(ka, (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)

    @jax.jit
    def chain(a, b):
        return jax.lax.fori_loop(0, inner, lambda i, x: jnp.dot(a, x, precision=precision), b)

    jax.block_until_ready(chain(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(chain(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 * inner / statistics.median(times)


def frame_stream(frames: int, hw: tuple[int, int]):
    """Deterministic random frames [1, H, W, 3] float32 in [0, 1], drawn one at a time."""
    rng = np.random.default_rng(0)
    for _ in range(frames):
        yield rng.random((1, *hw, 3), dtype=np.float32)


# --------------------------------------------------------------------------------------- the runs
@functools.lru_cache(maxsize=1)
def random_params(cfg: ModelConfig) -> dict:
    """`init_params(cfg, PRNGKey(0))` on the default device (the last one is kept, so repeated
    `main` calls in one process, as the tests make, initialise once)."""
    params = init_params(cfg, jax.random.PRNGKey(0))
    return jax.block_until_ready(jax.device_put(params, jax.devices()[0]))


def agg_cam_step(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, cache: StreamCache,
                 frame: jax.Array) -> tuple[StreamCache, jax.Array]:
    """`xsvggt_jax.stream.step.step` without the DPT / track heads (`heads=False`): aggregator + camera head
    only, the part upstream's `Aggregator` + `CameraHead` comparison runs. Returns the cache and the
    pose [B, 9]."""
    cache, out = step_mod.step(cfg, cache_cfg, params, cache, frame, heads=False)
    return cache, out["camera_pose"]


def run_setting(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, hw: tuple[int, int], frames: int,
                queries: jax.Array | None, fn: Callable = step_mod.step, record_cache: bool = True) -> dict:
    """Compile `fn(cfg, cache_cfg, params, cache, frame)` once and stream `frames` frames through it."""
    traces = [0]

    def counted(params, cache, frame):
        traces[0] += 1
        return fn(cfg, cache_cfg, params, cache, frame)

    jitted = jax.jit(counted, donate_argnums=(1,))
    max_frames = frames if cache_cfg.prune == "none" else None
    example = jax.device_put(np.zeros((1, *hw, 3), np.float32))  # as the frames are put, so no recompile
    cache = step_mod.place_cache(init_cache(cfg, cache_cfg, 1, hw, max_frames=max_frames, query_points=queries),
                                 params, example)

    t0 = time.perf_counter()
    lowered = jitted.lower(params, cache, example)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    del lowered, compiled
    flops = step_flops(functools.partial(fn, cfg, cache_cfg), params, cache, example)

    latency, alloc, used = [], [], []
    for img in frame_stream(frames, hw):
        frame = jax.block_until_ready(jax.device_put(img))
        t = time.perf_counter()
        cache, out = jitted(params, cache, frame)
        jax.block_until_ready((cache, out))
        latency.append(time.perf_counter() - t)
        if record_cache:
            alloc.append(int(cache_report(cfg, cache_cfg, cache)["cache_bytes"]))
            used.append(filled_bytes(cache))
    res = {"lower_s": t1 - t0, "compile_s": t2 - t1, "traces": traces[0], "flops_per_step": flops,
           "latency_s": latency}
    if record_cache:
        res.update(cache_bytes=alloc, cache_bytes_used=used, cache_report=cache_report(cfg, cache_cfg, cache),
                   max_frames=max_frames)
    del cache, out, jitted
    gc.collect()
    return res


def summarize_latency(latency: Sequence[float]) -> dict:
    early, late = windows(len(latency))
    e, l = median(latency[slice(*early)]), median(latency[slice(*late)])
    first = 1 if len(latency) > 1 else 0
    return {"latency_median_s": median(latency[first:]), "early_window": list(early), "late_window": list(late),
            "latency_median_early_s": e, "latency_median_late_s": l,
            "latency_ratio_late_over_early": (l / e) if e and l is not None else None}


# -------------------------------------------------------------------------------------- upstream
UPSTREAM_ENV = {  # upstream reads these in Attention.__init__ (XStreamVGGT; quant: prune_and_quantize branch)
    "none": {"KV_PRUNE_MODE": "none", "KV_QUANT_MODE": ""},
    "xstream": {"KV_PRUNE_MODE": "XStreamVGGT", "KV_QUANT_MODE": ""},
    "xstream-int4": {"KV_PRUNE_MODE": "XStreamVGGT", "KV_QUANT_MODE": "KCVT"},
    "sliding": {"KV_PRUNE_MODE": "SlidingWindow", "KV_QUANT_MODE": ""},
}


def torch_python_ok(python: str) -> bool:
    try:
        r = subprocess.run([python, "-c", "import torch"], capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot run %s: %s", python, e)
        return False
    return r.returncode == 0


def run_upstream(args, cfg: ModelConfig, settings: list[str], hw, ours_params: dict) -> dict | None:
    """Time upstream Aggregator + CameraHead (one subprocess per setting, env set before import) and
    our aggregator + camera step on the same frames. None (with a warning) when torch is unavailable."""
    python = args.upstream_python or sys.executable
    if not torch_python_ok(python):
        log.warning("--upstream-src given but `import torch` fails for %s: skipping the upstream comparison "
                    "(pass --upstream-python with a torch interpreter)", python)
        return None
    runner = Path(__file__).resolve().parent / "upstream_stream.py"
    out = {"src": str(Path(args.upstream_src).resolve()), "python": python,
           "ran": "upstream: streamvggt Aggregator (DINOv2 patch embed) + CameraHead (4 iterations), "
                  "torch.no_grad, float32, CPU threads as torch defaults; "
                  "ours: benchmarks.stream.agg_cam_step = aggregator + camera head with the same cache "
                  f"setting (no DPT / track heads), jitted, {cfg.dtype}, same frames",
           "settings": {}, "ours_agg_cam": {}, "time_ratio_ours_over_upstream": {}}
    for name in settings:
        cache_cfg = cache_setting(name, args.budget, args.bits)
        env = dict(os.environ, **UPSTREAM_ENV[name], KV_CACHE_SIZE=str(args.budget),
                   KV_POOL_SIZE=str(cache_cfg.pool))
        with tempfile.TemporaryDirectory() as tmp:
            res_path = Path(tmp) / "upstream.json"
            cmd = [python, str(runner), "--src", str(args.upstream_src), "--spec", json.dumps(cfg.to_spec()),
                   "--height", str(hw[0]), "--width", str(hw[1]), "--frames", str(args.frames),
                   "--out", str(res_path)]
            log.info("upstream %s: %s", name, " ".join(cmd[:2]))
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0 or not res_path.exists():
                log.warning("upstream run %s failed (rc %s): %s", name, r.returncode, r.stderr[-2000:])
                continue
            up = json.loads(res_path.read_text())
        up["env"] = {k: env[k] for k in ("KV_PRUNE_MODE", "KV_QUANT_MODE", "KV_CACHE_SIZE", "KV_POOL_SIZE")}
        up.update(summarize_latency(up["latency_s"]))
        out["settings"][name] = up
        if name == "xstream-int4" and (not up.get("quant_supported") or args.bits != 4):
            log.warning("upstream xstream-int4: quantization %s (upstream fixes 4 bits, group 64)",
                        "not in this upstream tree" if not up.get("quant_supported") else f"bits {args.bits} != 4")
        ours = run_setting(cfg, cache_cfg, ours_params, hw, args.frames, None, fn=agg_cam_step, record_cache=False)
        ours.update(summarize_latency(ours["latency_s"]))
        out["ours_agg_cam"][name] = ours
        if ours["latency_median_s"] and up["latency_median_s"]:
            out["time_ratio_ours_over_upstream"][name] = ours["latency_median_s"] / up["latency_median_s"]
    return out


# ------------------------------------------------------------------------------------------ output
def plot(result: dict, path: Path) -> None:
    """Two panels: latency (ms) and cache (MB, solid: filled, dashed: allocated) vs frame index."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.subplots(1, 2)
    for i, (name, s) in enumerate(result["settings"].items()):
        color = f"C{i}"
        x = np.arange(len(s["latency_s"]))
        ax_t.plot(x, np.asarray(s["latency_s"]) * 1e3, color=color, label=name)
        ax_m.plot(x, np.asarray(s["cache_bytes_used"]) / 2 ** 20, color=color, label=f"{name} (filled)")
        ax_m.plot(x, np.asarray(s["cache_bytes"]) / 2 ** 20, color=color, ls="--", lw=0.8)
    ax_t.set(xlabel="frame", ylabel="latency (ms, log)", title="per-frame step latency (frame 0: first dispatch)",
             yscale="log")
    ax_m.set(xlabel="frame", ylabel="cache (MiB)", title="KV cache (dashed: allocated)")
    for ax in (ax_t, ax_m):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['config']} {result['frame_hw'][0]}x{result['frame_hw'][1]}, {result['dtype']}, "
                 f"{result['device']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="model size (default tiny)")
    p.add_argument("--height", type=int, help="frame height (default 392 for published/medium, 112 for tiny)")
    p.add_argument("--width", type=int, help="frame width (default 518 for published/medium, 154 for tiny)")
    p.add_argument("--frames", type=int, default=20, help="stream length (default 20)")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma list of cache settings from {', '.join(SETTINGS)} (default all)")
    p.add_argument("--budget", type=int, default=2048, help="tokens kept per layer by pruned settings (default 2048)")
    p.add_argument("--bits", type=int, default=4, choices=quant.PACK_BITS, help="code width of xstream-int4 (default 4)")
    p.add_argument("--queries", type=int, default=0,
                   help="query points per frame (> 0 also runs the track head each frame)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (default float32)")
    p.add_argument("--precision", choices=("default", "high", "highest"), default="highest",
                   help="matmul precision of the model and of the peak matmul (default highest)")
    p.add_argument("--matmul-size", type=int, help="side of the peak matmul (default 2048 on CPU, 4096 else)")
    p.add_argument("--name", help="output base name (default <config>_<H>x<W>_<frames>f)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="default benchmarks/results")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--upstream-src", type=Path,
                   help="upstream StreamVGGT checkout (its src/ is imported at run time) to time as well")
    p.add_argument("--upstream-python", help="interpreter with torch for --upstream-src (default: this one)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        log.setLevel(logging.INFO)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        cache_setting(s, args.budget, args.bits)  # validate early
    if args.frames < 1:
        raise SystemExit("--frames must be >= 1")
    dh, dw = DEFAULT_HW[args.config]
    hw = (args.height or dh, args.width or dw)
    cfg = CONFIGS[args.config].replace(dtype=args.dtype, precision=args.precision)
    cfg.tokens_per_frame(*hw)  # validates the frame size
    name = args.name or f"{args.config}_{hw[0]}x{hw[1]}_{args.frames}f"
    dev = jax.devices()[0]
    backend = jax.default_backend()

    n = args.matmul_size or (2048 if backend == "cpu" else 4096)
    inner = 1 if backend == "cpu" else 20
    peak = {"size": n, "matmuls_per_call": inner, "precision": args.precision,
            "float32_flops_per_s": matmul_peak(n, "float32", cfg.jax_precision, inner)}
    if args.dtype != "float32":
        peak[f"{args.dtype}_flops_per_s"] = matmul_peak(n, args.dtype, cfg.jax_precision, inner)
    peak["used_flops_per_s"] = peak[f"{args.dtype}_flops_per_s"]
    log.info("matmul peak %.3g FLOP/s (%s, n=%d)", peak["used_flops_per_s"], args.dtype, n)

    t0 = time.perf_counter()
    params = random_params(cfg)
    init_s = time.perf_counter() - t0
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    log.info("params: %d (%.1f s)", n_params, init_s)
    queries = None
    if args.queries:
        q = np.random.default_rng(1).random((1, args.queries, 2), dtype=np.float32) * np.array([hw[1], hw[0]], np.float32)
        queries = jnp.asarray(q)

    result: dict[str, Any] = {
        "schema": SCHEMA, "name": name, "config": args.config, "model": cfg.to_spec(), "params": n_params,
        "params_init_s": init_s, "frame_hw": list(hw), "tokens_per_frame": cfg.tokens_per_frame(*hw),
        "frames": args.frames, "dtype": args.dtype, "precision": args.precision, "queries": args.queries,
        "budget": args.budget, "bits": args.bits,
        "backend": backend, "device": getattr(dev, "device_kind", str(dev)), "device_count": jax.device_count(),
        "jax_version": jax.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "ran": "xsvggt_jax.stream.step.step per frame: aggregator + camera head + depth and point DPT heads"
               + (" + track head" if args.queries else " (no query points: no track head)"),
        "notes": [
            "latency_s: every frame once, after an explicit lower+compile, device-synchronised "
            "(jax.block_until_ready); frame 0 also pays the first dispatch, summary medians skip it",
            "flops_per_step: XLA cost analysis of the compiled step; pruned caches: attention spans the "
            "budget, masked slots included; 'none': its prefix-attention loop body is counted once (one chunk "
            "of keys), so no floor ratio is given for it",
            "cache_bytes: allocated cache arrays (cache_report); cache_bytes_used: allocated bytes times the "
            "filled fraction of each layer group",
            "peak_rss_bytes / device_peak_bytes: process-wide peaks so far (monotone), read after each setting",
        ],
        "matmul_peak": peak, "settings": {},
    }

    for s in settings:
        cache_cfg = cache_setting(s, args.budget, args.bits)
        log.info("setting %s: %s", s, cache_cfg)
        r = run_setting(cfg, cache_cfg, params, hw, args.frames, queries)
        r.update(summarize_latency(r["latency_s"]))
        floor = (r["flops_per_step"] / peak["used_flops_per_s"]
                 if r["flops_per_step"] and cache_cfg.prune != "none" else None)
        r["flop_floor_seconds"] = floor
        r["achieved_over_floor"] = r["latency_median_s"] / floor if floor and r["latency_median_s"] else None
        r["cache_config"] = dataclasses.asdict(cache_cfg)
        r["peak_rss_bytes"] = peak_rss_bytes()
        r["device_peak_bytes"] = device_peak_bytes()
        result["settings"][s] = r
        if r["traces"] != 1:
            log.warning("setting %s traced %d times", s, r["traces"])

    out_dir = Path(args.out_dir)
    if args.upstream_src:
        result["upstream"] = run_upstream(args, cfg, settings, hw, params)

    json_path = out_dir / f"{name}.json"
    atomic_write_text(json_path, json.dumps(result, indent=1))
    log.info("wrote %s", json_path)
    if not args.no_plot:
        plot(result, out_dir / f"{name}.png")
        log.info("wrote %s", out_dir / f"{name}.png")

    from .summarize import report
    sys.stdout.write(report([result]) + "\n")
    return result


if __name__ == "__main__":
    main()
