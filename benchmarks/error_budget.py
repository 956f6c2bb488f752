"""The error budget over long streams: weight quantization x cache quantization x precision, frame by
frame, with a bounded cache (memory constant over the stream).

    python -m benchmarks.error_budget --frames 1000

The shipped demo model (`xsvggt_jax.pretrained.load("demo")`, 84x112 frames) streams one procedural
scene (`xsvggt_jax.data.procedural`, the "demo" preset, `--frames` long, seed `--seed`) once per cell:
  weights    `--weights`, `weights.quant.WeightFormat` texts (default float, int8, int4): kernels
             quantized once, stored packed and decoded inside the jitted step;
  cache      `--caches`, NAME=SETTING pairs separated by ";", each SETTING a `CacheConfig.from_text`
             text (default: xstream pruning to `--budget` tokens a layer, unquantized ("none") and
             KCVT int8 / int4 / int2; the K/V of the global layers are quantized, upstream's rule);
             the first is the reference's and must not quantize. A cache of prune=none (a control
             without pruning) is allocated for the whole stream and grows with it;
  precision  `--precisions` (default float32, bfloat16: the whole network in that dtype).
float32 runs every weights x cache cell; the other precisions run the caches `--reduced-caches` names
(default "none": the grid is cut there so that it fits in a CPU half hour; "all" runs the full grid).
Each cell runs the whole stream in one `lax.scan` (one compile), and is compared frame by frame with
the reference cell: float weights, the first (unquantized) cache, float32. Metrics per frame are
`benchmarks.drift`'s: depth_rel, points_rel, cam_t_rel (camera translation error / extent of the
reference path so far) and cam_rot_deg. Error that accumulates through the cache shows as growth
along the stream: each cell's median over the first and the last `--window` frames, and their ratio.
Writes `<out-dir>/<name>.json` (every frame) and `.png`, and prints the README table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.drift import frame_metrics
from xsvggt_jax import pretrained
from xsvggt_jax.cache.core import CacheConfig, cache_report, init_cache
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.data import procedural
from xsvggt_jax.errors import ConfigError
from xsvggt_jax.io.fsutil import atomic_write, atomic_write_text
from xsvggt_jax.stream.step import run_stream
from xsvggt_jax.weights.quant import WeightFormat, describe, quantize_params

log = logging.getLogger("benchmarks.error_budget")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_CACHES = "none=xstream:{budget};int8=xstream-int8:{budget};int4=xstream-int4:{budget};int2=xstream-int2:{budget}"
METRICS = ("depth_rel", "points_rel", "cam_t_rel", "cam_rot_deg")
KEYS = ("depth", "pts3d_in_other_view", "camera_pose")


@dataclasses.dataclass(frozen=True)
class Cell:
    weights: str
    cache: str
    precision: str

    @property
    def name(self) -> str:
        return f"w-{self.weights}|c-{self.cache}|{self.precision}"


def parse_caches(text: str, budget: int) -> dict[str, CacheConfig]:
    """NAME=SETTING;... -> {name: CacheConfig}; ConfigError naming the item."""
    out = {}
    for item in (p.strip() for p in text.format(budget=budget).split(";")):
        name, eq, setting = item.partition("=")
        if not eq or not name.strip() or name.strip() in out:
            raise ConfigError(f"--caches: expected NAME=SETTING items with distinct names, got {item!r}")
        out[name.strip()] = CacheConfig.from_text(setting, where=f"--caches {name.strip()}")
    if next(iter(out.values())).quant != "none":
        raise ConfigError("--caches: the first cache is the reference's and must not quantize")
    return out


def grid(weights: Sequence[str], caches: Sequence[str], precisions: Sequence[str], reduced: Sequence[str]) -> list:
    """float32 (the first precision) x every weights x cache; the others x `reduced` caches. The
    reference cell (first weights, first cache, first precision) comes first."""
    cells = [Cell(w, c, p) for p in precisions for c in caches for w in weights
             if p == precisions[0] or c in reduced]
    return cells


def run_cell(cell: Cell, params32: dict, fmt: WeightFormat, base_cfg, cache_cfg: CacheConfig,
             frames: jax.Array) -> tuple[dict, dict]:
    """(outputs stacked over the stream as numpy [S, ...], the cell's record: bytes and timings)."""
    cfg = base_cfg.replace(dtype=cell.precision)
    params = jax.device_put(quantize_params(params32, fmt), jax.devices()[0])
    hw = tuple(frames.shape[2:4])
    max_frames = None if cache_cfg.pruned else frames.shape[0]   # prune=none: a cache for the whole stream
    cache = jax.device_put(init_cache(cfg, cache_cfg, 1, hw, max_frames=max_frames), jax.devices()[0])
    fn = jax.jit(lambda p, c, f: run_stream(cfg, cache_cfg, p, c, f))
    t0 = time.perf_counter()
    compiled = fn.lower(params, cache, frames).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    last, out = compiled(params, cache, frames)
    out = jax.device_get({k: out[k][:, 0] for k in KEYS})
    stream_s = time.perf_counter() - t0
    record = {"weights": describe(params), "weights_device_bytes": int(sum(x.on_device_size_in_bytes()
                                                                          for x in jax.tree.leaves(params))),
              "cache_config": dataclasses.asdict(cache_cfg), "cache": cache_report(cfg, cache_cfg, last),
              "compile_s": compile_s, "stream_s": stream_s}
    return out, record


def stream_metrics(out: dict, ref: dict) -> dict:
    """Per frame (`benchmarks.drift.frame_metrics`, the camera extent from the reference path so far)."""
    t_ref = np.asarray(ref["camera_pose"], np.float64)[:, :3]
    per = {m: [] for m in METRICS}
    for i in range(len(t_ref)):
        path = t_ref[:i + 1]
        extent = float(np.linalg.norm(path.max(0) - path.min(0)))
        row = frame_metrics({k: out[k][i:i + 1] for k in KEYS}, {k: ref[k][i:i + 1] for k in KEYS}, extent)
        for m, x in row.items():
            per[m].append(float(f"{x:.4g}"))   # 4 significant digits: the JSON keeps every frame of every cell
    return per


def growth(per: dict, window: int) -> dict:
    """metric -> medians over frames 1-10 ("start"), 11-100 ("early") and the last `window` ("late"),
    and "ratio" = late / start: how far the error grew along the stream (frame 0 has no history and is
    left out)."""
    out = {}
    for m, xs in per.items():
        xs = np.asarray(xs)
        start, early, late = (float(np.median(xs[a:b])) for a, b in ((1, 11), (11, 101), (len(xs) - window, None)))
        out[m] = {"start": start, "early": early, "late": late, "ratio": late / start if start > 0 else None}
    return out


def table(result: dict) -> str:
    w = result["window"]
    head = ["weights", "cache", "precision", "weights bytes", "cache bytes", *METRICS]
    lines = [f"each metric: medians over frames 1-10 / 11-100 / the last {w}, and (last / 1-10)",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in result["cells"].items():
        cells = [c["weights_format"], c["cache_name"], c["precision"], f"{c['weights']['bytes']:,}",
                 f"{c['cache']['cache_bytes']:,}"]
        for m in METRICS:
            g = c["growth"][m]
            if name == result["reference"]:
                cells.append("reference")
            else:
                ratio = f" ({g['ratio']:.1f}x)" if g["ratio"] is not None else ""
                cells.append(f"{g['start']:.1e} / {g['early']:.1e} / {g['late']:.1e}{ratio}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    precisions = list(dict.fromkeys(c["precision"] for c in result["cells"].values()))
    weights = list(dict.fromkeys(c["weights_format"] for c in result["cells"].values()))
    caches = list(dict.fromkeys(c["cache_name"] for c in result["cells"].values()))
    styles = ["-", "--", "-.", ":", (0, (1, 3)), (0, (5, 1))]
    fig = Figure(figsize=(4.2 * len(METRICS), 3.4 * len(precisions)))
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(len(precisions), len(METRICS), squeeze=False))
    k = 25
    for name, c in result["cells"].items():
        if name == result["reference"]:
            continue
        row = precisions.index(c["precision"])
        for col, m in enumerate(METRICS):
            xs = np.asarray(c["per_frame"][m])[1:]            # frame 0 has no history (log x axis)
            if len(xs) > 4 * k:   # a running median from frame 50 on; the start as it is, to show early growth
                pad = np.pad(xs, (k // 2, k // 2), mode="edge")
                xs = np.concatenate([xs[:50], np.median(np.lib.stride_tricks.sliding_window_view(pad, k), axis=-1)[50:]])
            axes[row, col].plot(np.arange(1, len(xs) + 1), np.maximum(xs, 1e-6),
                                linestyle=styles[caches.index(c["cache_name"]) % len(styles)],
                                color=f"C{weights.index(c['weights_format'])}", lw=1,
                                label=f"weights {c['weights_format']}, cache {c['cache_name']}")
    for row, p in enumerate(precisions):
        for col, m in enumerate(METRICS):
            ax = axes[row, col]
            ax.set(xscale="log", yscale="log", xlabel="frame")
            ax.set_title(f"{m}, {p}" + (f" (running median of {k} after frame 50)" if col == 0 else ""), fontsize=9)
            ax.grid(alpha=0.3, which="both")
        axes[row, 0].legend(fontsize=7)
    fig.suptitle(f"error budget vs float weights / unquantized cache / float32: demo model, procedural scene "
                 f"{result['frames']} frames, xstream budget {result['budget']}, {result['device']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.error_budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=1000, help="stream length (default 1000)")
    p.add_argument("--weights", default="float,int8,int4", help="comma list of --weights formats (first: reference)")
    p.add_argument("--caches", default=DEFAULT_CACHES,
                   help="NAME=CacheConfig text items separated by ';' ({budget} is --budget; first: reference, "
                        "unquantized)")
    p.add_argument("--budget", type=int, default=512, help="tokens a layer of the default caches (default 512)")
    p.add_argument("--precisions", default="float32,bfloat16", help="comma list of dtypes (first: reference)")
    p.add_argument("--reduced-caches", default="none",
                   help="cache names run at the precisions after the first (comma list, or 'all'; default none)")
    p.add_argument("--window", type=int, default=100, help="frames of the first / last medians (default 100)")
    p.add_argument("--seed", type=int, default=0, help="procedural scene seed")
    p.add_argument("--name", default=None, help="output base name (default error_budget_<frames>f)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--summarize", type=Path, metavar="JSON",
                   help="recompute the summary, table and plot of a saved result (no streaming)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _fail(message: str) -> None:
    sys.stderr.write(f"xsvggt: error: {message}\n")
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.summarize:
        return summarize(args.summarize, args.no_plot)
    try:
        if args.frames < 2 * args.window or args.window < 1:
            raise ConfigError(f"--frames ({args.frames}) must be at least twice --window ({args.window}) >= 1")
        formats = {t.strip(): WeightFormat.from_text(t.strip()) for t in args.weights.split(",") if t.strip()}
        caches = parse_caches(args.caches, args.budget)
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        if not formats or not precisions or list(formats.values())[0].quantized or precisions[0] != "float32":
            raise ConfigError("the first --weights must be float and the first --precisions float32 (the reference)")
        reduced = list(caches) if args.reduced_caches.strip() == "all" else \
            [c.strip() for c in args.reduced_caches.split(",") if c.strip()]
        if set(reduced) - set(caches):
            raise ConfigError(f"--reduced-caches names {sorted(set(reduced) - set(caches))}, not in --caches")
        base_cfg = ModelConfig.from_dict(pretrained.card("demo")["config"])
        for p in precisions:
            base_cfg.replace(dtype=p)  # ConfigError for an unknown dtype, before any work
    except ConfigError as e:
        _fail(str(e))
    params, base_cfg = pretrained.load("demo")
    params = jax.device_get(params)
    hw = tuple(pretrained.card("demo")["frame_size"])
    t0 = time.perf_counter()
    scene = procedural.make_scene(dataclasses.replace(procedural.PRESETS["demo"], frames=args.frames, height=hw[0],
                                                      width=hw[1]), seed=args.seed)
    frames = jax.device_put(jnp.asarray(np.asarray(scene.images, np.float32))[:, None], jax.devices()[0])
    log.info("scene: %d frames %dx%d rendered in %.1f s", args.frames, *hw, time.perf_counter() - t0)
    cells = grid(list(formats), list(caches), precisions, reduced)
    dev = jax.devices()[0]
    result = {"name": args.name or f"error_budget_{args.frames}f", "model": "pretrained demo", "frame_hw": list(hw),
              "frames": args.frames, "seed": args.seed, "budget": args.budget, "window": args.window,
              "backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
              "jax_version": jax.__version__, "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "caches": {n: str(c) for n, c in caches.items()},
              "reference": cells[0].name,
              "metrics": {"depth_rel": "mean|d-d_ref|/mean|d_ref|", "points_rel": "mean||p-p_ref||/mean||p_ref||",
                          "cam_t_rel": "||t-t_ref|| / max(extent of the reference camera path so far, "
                                       "mean||p_ref||/10)",
                          "cam_rot_deg": "rotation angle between pose quaternions, degrees"},
              "cells": {}}
    ref = None
    t_all = time.perf_counter()
    for i, cell in enumerate(cells):
        out, record = run_cell(cell, params, formats[cell.weights], base_cfg, caches[cell.cache], frames)
        if ref is None:
            ref = out
        per = stream_metrics(out, ref)
        result["cells"][cell.name] = {"weights_format": cell.weights, "cache_name": cell.cache,
                                      "precision": cell.precision, **record, "per_frame": per,
                                      "growth": growth(per, args.window)}
        log.warning("cell %d/%d %s: compile %.1f s, stream %.1f s (%.1f min so far)", i + 1, len(cells), cell.name,
                    record["compile_s"], record["stream_s"], (time.perf_counter() - t_all) / 60)
    result["total_s"] = time.perf_counter() - t_all
    out_dir = Path(args.out_dir)
    atomic_write_text(out_dir / f"{result['name']}.json", json.dumps(result))
    if not args.no_plot:
        plot(result, out_dir / f"{result['name']}.png")
    sys.stdout.write(table(result) + "\n")
    return result


def summarize(path: Path, no_plot: bool) -> dict:
    """Re-derive a saved result's per-cell summary (`growth`), rewrite it with its plot, print the table."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        _fail(f"{path}: unreadable result ({e})")
    for c in result["cells"].values():
        c["per_frame"] = {m: [float(f"{x:.4g}") for x in xs] for m, xs in c["per_frame"].items()}
        c["growth"] = growth(c["per_frame"], result["window"])
    atomic_write_text(Path(path), json.dumps(result))
    if not no_plot:
        plot(result, Path(path).with_suffix(".png"))
    sys.stdout.write(table(result) + "\n")
    return result


if __name__ == "__main__":
    main()
