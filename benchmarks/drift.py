"""Precision drift over long streams: how far bfloat16 and the accelerator `auto` policy move depth,
points and the camera path from float32, frame by frame, uncompressed and compressed.

    python -m benchmarks.drift --frames 1000 --settings none,xstream-int4

The shipped demo model (`xsvggt_jax.pretrained.load("demo")`) streams one procedural scene
(`xsvggt_jax.data.procedural`, the "demo" scene preset at the model's frame size, `--frames` long, seed
`--seed`) three times in lockstep, one frame at a time, per cache setting:
  float32   the whole network in float32 (the reference);
  bfloat16  the whole network in bfloat16 (`--dtype bfloat16`);
  auto-gpu  dtype "auto" as it resolves on an accelerator: aggregator (and global K/V cache) in
            bfloat16, every head (camera trunk and its cache included) in float32. On CPU "auto" is
            float32, so the accelerator policy is emulated as tests/test_precision.py does: the backend
            that resolves "auto" (`xsvggt_jax.config.compute_backend`) reads "gpu" while the step is
            traced; the traced program's dtypes are what the policy chooses, the arithmetic is the CPU's.
Per frame and variant, against float32 of the same setting:
  depth_rel     mean |depth - depth32| / mean |depth32|
  points_rel    mean ||pts - pts32|| / mean ||pts32||  (pts3d_in_other_view)
  cam_t_rel     ||t - t32|| / (extent of the float32 camera path so far, at least mean ||pts32||/10)
  cam_rot_deg   angle between the rotations (from the pose encoding's quaternions), degrees
Writes `<out-dir>/<name>.json` and `.png` and prints a markdown table (windowed medians and maxima).
Settings: "none" (uncompressed, cache sized for the stream) and "xstream-int4" (`--budget`, pool
`--pool`, KCVT 4-bit group 64); frames that do not fit `--time-limit` are not run (the JSON says how
many ran).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from xsvggt_jax import config as config_mod
from xsvggt_jax import pretrained
from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.data import procedural
from xsvggt_jax.io.fsutil import atomic_write, atomic_write_text
from xsvggt_jax.stream import step as step_mod

log = logging.getLogger("benchmarks.drift")

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
VARIANTS = ("float32", "bfloat16", "auto-gpu")
SETTINGS = {"none": "none", "xstream-int4": "xstream-int4:{budget}"}
METRICS = ("depth_rel", "points_rel", "cam_t_rel", "cam_rot_deg")
WINDOWS = (1, 10, 100, 300, 1000, 3000)


@contextlib.contextmanager
def backend_resolves_as(backend: str | None):
    """While active, dtype "auto" resolves as on `backend` (None: unchanged)."""
    if backend is None:
        yield
        return
    saved = config_mod.compute_backend
    config_mod.compute_backend = lambda: backend
    try:
        yield
    finally:
        config_mod.compute_backend = saved


def variant_config(cfg, variant: str):
    """(ModelConfig, backend override) of a variant."""
    if variant == "auto-gpu":
        return cfg.replace(dtype="auto"), "gpu"
    return cfg.replace(dtype=variant), None


def cache_config(setting: str, budget: int, pool: int) -> CacheConfig:
    cc = CacheConfig.from_text(SETTINGS[setting].format(budget=budget))
    return dataclasses.replace(cc, pool=pool) if cc.prune != "none" else cc


def build_step(cfg, cache_cfg: CacheConfig, params: dict, hw, frames: int, backend: str | None):
    """(compiled step, initial cache) with `auto` resolved as on `backend` while tracing."""
    with backend_resolves_as(backend):
        max_frames = frames if cache_cfg.prune == "none" else None
        example = jax.device_put(np.zeros((1, *hw, 3), np.float32))
        cache = step_mod.place_cache(init_cache(cfg, cache_cfg, 1, hw, max_frames=max_frames), params, example)
        jitted = jax.jit(lambda p, c, f: step_mod.step(cfg, cache_cfg, p, c, f), donate_argnums=(1,))
        compiled = jitted.lower(params, cache, example).compile()
    return compiled, cache


def quat_angle_deg(q1: np.ndarray, q2: np.ndarray) -> float:
    q1, q2 = q1 / np.linalg.norm(q1), q2 / np.linalg.norm(q2)
    return float(np.degrees(2 * np.arccos(np.clip(abs(float(np.dot(q1, q2))), 0.0, 1.0))))


def frame_metrics(out: dict, ref: dict, extent: float) -> dict:
    d, d0 = np.asarray(out["depth"], np.float64), np.asarray(ref["depth"], np.float64)
    p, p0 = np.asarray(out["pts3d_in_other_view"], np.float64), np.asarray(ref["pts3d_in_other_view"], np.float64)
    c, c0 = np.asarray(out["camera_pose"], np.float64)[0], np.asarray(ref["camera_pose"], np.float64)[0]
    pts_scale = float(np.linalg.norm(p0, axis=-1).mean())
    return {"depth_rel": float(np.abs(d - d0).mean() / max(np.abs(d0).mean(), 1e-12)),
            "points_rel": float(np.linalg.norm(p - p0, axis=-1).mean() / max(pts_scale, 1e-12)),
            "cam_t_rel": float(np.linalg.norm(c[:3] - c0[:3]) / max(extent, pts_scale / 10, 1e-12)),
            "cam_rot_deg": quat_angle_deg(c[3:7], c0[3:7])}


def run_setting(setting: str, cache_cfg: CacheConfig, params: dict, base_cfg, scene_images: np.ndarray,
                deadline: float) -> dict:
    hw = scene_images.shape[1:3]
    frames = scene_images.shape[0]
    built = {}
    for v in VARIANTS:
        cfg, backend = variant_config(base_cfg, v)
        t0 = time.perf_counter()
        built[v] = list(build_step(cfg, cache_cfg, params, hw, frames, backend))
        log.info("%s %s compiled in %.1f s", setting, v, time.perf_counter() - t0)
    per = {v: {m: [] for m in METRICS} for v in VARIANTS[1:]}
    t_path, ran = [], 0
    t0 = time.perf_counter()
    for i in range(frames):
        if time.perf_counter() > deadline:
            log.warning("%s: time limit reached after %d frames", setting, i)
            break
        frame = jax.device_put(scene_images[i][None])
        outs = {}
        for v in VARIANTS:
            fn, cache = built[v]
            cache, out = fn(params, cache, frame)
            built[v][1] = cache
            outs[v] = jax.device_get({k: out[k] for k in ("depth", "pts3d_in_other_view", "camera_pose")})
        t_path.append(np.asarray(outs["float32"]["camera_pose"], np.float64)[0, :3])
        tp = np.stack(t_path)
        extent = float(np.linalg.norm(tp.max(0) - tp.min(0)))
        for v in VARIANTS[1:]:
            for m, x in frame_metrics(outs[v], outs["float32"], extent).items():
                per[v][m].append(x)
        ran = i + 1
        if ran % 100 == 0:
            log.info("%s: %d frames, %.1f s", setting, ran, time.perf_counter() - t0)
    return {"cache_config": str(cache_cfg), "frames_run": ran, "stream_s": time.perf_counter() - t0,
            "per_frame": per}


def summary_rows(result: dict) -> list[dict]:
    """Per (setting, variant, metric): median over frame windows [w/2, w) and the max over all frames."""
    rows = []
    for s, r in result["settings"].items():
        n = r["frames_run"]
        for v, metrics in r["per_frame"].items():
            for m, xs in metrics.items():
                xs = np.asarray(xs)
                row = {"setting": s, "variant": v, "metric": m, "frames": n, "max": float(xs.max()) if n else None}
                for w in WINDOWS:
                    if w <= n:
                        seg = xs[w // 2:w] if w > 1 else xs[:1]
                        row[f"median@{w}"] = float(np.median(seg))
                rows.append(row)
    return rows


def table(result: dict) -> str:
    rows = summary_rows(result)
    ws = [w for w in WINDOWS if any(f"median@{w}" in r for r in rows)]
    head = ["setting", "vs float32", "metric", *[f"frames {w // 2}-{w - 1}" if w > 1 else "frame 0" for w in ws],
            "max (all frames)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], r["variant"], r["metric"], *[f"{r[f'median@{w}']:.2e}" if f"median@{w}" in r else ""
                                                             for w in ws], f"{r['max']:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    styles = {"none": "-", "xstream-int4": "--"}
    for ax, m in zip(axes, METRICS):
        for s, r in result["settings"].items():
            for j, (v, metrics) in enumerate(r["per_frame"].items()):
                xs = np.asarray(metrics[m])
                if len(xs) > 20:  # a running median over 11 frames keeps the curve readable
                    k = 11
                    pad = np.pad(xs, (k // 2, k // 2), mode="edge")
                    xs = np.median(np.lib.stride_tricks.sliding_window_view(pad, k), axis=-1)
                ax.plot(np.arange(len(xs)), np.maximum(xs, 1e-9), styles.get(s, ":"), color=f"C{j}", lw=1,
                        label=f"{v}, {s}")
        ax.set(yscale="log", xlabel="frame", title=m + " vs float32 (running median, 11 frames)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"precision drift, demo model, procedural scene {result['frame_hw'][0]}x{result['frame_hw'][1]}, "
                 f"{result['device']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.drift", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=1000, help="stream length (default 1000)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list from {', '.join(SETTINGS)}")
    p.add_argument("--budget", type=int, default=2048, help="xstream-int4 token budget (default 2048)")
    p.add_argument("--pool", type=int, default=16, help="xstream pool size (default 16)")
    p.add_argument("--seed", type=int, default=0, help="procedural scene seed")
    p.add_argument("--time-limit", type=float, default=1e9, help="seconds of streaming per setting before stopping")
    p.add_argument("--name", default=None, help="output base name (default drift_demo_<frames>f)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad or args.frames < 1:
        sys.stderr.write(f"xsvggt: error: unknown setting {bad[0]!r}\n" if bad else "xsvggt: error: --frames must be >= 1\n")
        raise SystemExit(2)
    params, cfg = pretrained.load("demo")
    hw = tuple(pretrained.card("demo")["frame_size"])
    t0 = time.perf_counter()
    scene_cfg = dataclasses.replace(procedural.PRESETS["demo"], frames=args.frames, height=hw[0], width=hw[1])
    scene = procedural.make_scene(scene_cfg, seed=args.seed)
    images = np.asarray(scene.images, np.float32)
    log.info("scene: %d frames %dx%d rendered in %.1f s", args.frames, *hw, time.perf_counter() - t0)
    dev = jax.devices()[0]
    result = {"name": args.name or f"drift_demo_{args.frames}f", "model": "pretrained demo", "frame_hw": list(hw),
              "frames": args.frames, "seed": args.seed, "budget": args.budget, "pool": args.pool,
              "backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
              "jax_version": jax.__version__,
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "variants": {"float32": "reference", "bfloat16": "whole network in bfloat16",
                           "auto-gpu": "dtype auto as on an accelerator (trunk bfloat16, heads float32), "
                                       "emulated on this backend by resolving 'auto' as 'gpu' while tracing"},
              "metrics": {"depth_rel": "mean|d-d32|/mean|d32|", "points_rel": "mean||p-p32||/mean||p32||",
                          "cam_t_rel": "||t-t32|| / max(extent of float32 camera path so far, mean||p32||/10)",
                          "cam_rot_deg": "rotation angle between pose quaternions, degrees"},
              "settings": {}}
    for s in settings:
        cc = cache_config(s, args.budget, args.pool)
        result["settings"][s] = run_setting(s, cc, params, cfg, images, time.perf_counter() + args.time_limit)
    result["summary"] = summary_rows(result)
    out = Path(args.out_dir)
    atomic_write_text(out / f"{result['name']}.json", json.dumps(result))
    if not args.no_plot:
        plot(result, out / f"{result['name']}.png")
    sys.stdout.write(table(result) + "\n")
    return result


if __name__ == "__main__":
    main()
