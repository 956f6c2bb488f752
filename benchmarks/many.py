"""Many-scene benchmark: scenes/hour of `reconstruct-many`'s driver, continuous batching vs one scene
at a time, and the device-idle fraction with and without prefetch.

    python -m benchmarks.many [--scenes 40 --min-frames 5 --max-frames 40 --slots 4] [--update-readme]

Scenes: procedural (`xsvggt_jax.data.procedural`, seeds 0.., lengths drawn uniformly in
[min, max] frames with a fixed seed) at 56x70, each frame rendered when the driver reads it (the
host work a video decoder would do), 8 query points. Model: `ModelConfig.tiny()` with random weights
(`init_params(cfg, PRNGKey(0))`), cache xstream + int4 KCVT (budget 64). Every scene writes what
`xsvggt reconstruct` writes (`io.scene.write_scene`: predictions.npz, points.ply, COLMAP, depth
maps, stream.png, report.json), published per scene, so scenes/hour includes output writing.
Runs (each its own output root, compile included, as a user sees it):
* `continuous`: a pool of `--slots` slots, prefetch `--prefetch` frames per scene;
* `one-at-a-time`: a pool of 1 slot (scenes back to back, one compile), same prefetch;
* `continuous-no-prefetch`: `--slots` slots, frames rendered in the main loop (prefetch 0);
* `offline-full`: `reconstruct-many --offline full` (VGGT's mode, `many.offline`): each scene one batch
  forward, scenes of one length batched `--slots` a forward, the next batch read ahead (no cache;
  every distinct length compiles once, so give equal lengths: `--min-frames` = `--max-frames`).
Device-idle fraction = time the main loop waited for frames / its total time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from xsvggt_jax.io.fsutil import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
HW = (56, 70)


def scenes(count: int, lo: int, hi: int, seed: int = 0):
    """`count` lazily rendered procedural FrameSources with lengths in [lo, hi]."""
    from xsvggt_jax.data.procedural import PRESETS, camera_path, default_intrinsics, make_world, render_frame
    from xsvggt_jax.io.frames import FrameSource

    lengths = np.random.default_rng(seed).integers(lo, hi + 1, count)

    class Rendered(FrameSource):
        def __init__(self, i: int, n: int):
            self.config = dataclasses.replace(PRESETS["demo"], frames=int(n), height=HW[0], width=HW[1])
            self.world = make_world(self.config, i)
            self.extr = camera_path(self.config, self.world, i)
            rng = np.random.default_rng([i, 2])
            qp = np.stack([rng.uniform(8, HW[1] - 8, 8), rng.uniform(8, HW[0] - 8, 8)], -1).astype(np.float32)
            super().__init__(f"procedural-{i:04d}", int(n), *HW, qp)

        def __iter__(self):
            k = default_intrinsics(self.config)
            for e in self.extr:
                yield render_frame(self.world, e, k, *HW)[0]

    return [Rendered(i, n) for i, n in enumerate(lengths)]


def run(label: str, sources, cfg, cache_cfg, params, slots: int, prefetch: int, root: Path,
        slot_compute: str = "auto") -> dict:
    from xsvggt_jax.io.outdir import OutputDir
    from xsvggt_jax.io.outputs import ExportOptions
    from xsvggt_jax.many import Job, Scene, run_scenes

    from xsvggt_jax.many import run_offline_scenes

    jobs = [Job(Scene(s.name, Path(s.name)), s, OutputDir(root / s.name)) for s in sources]
    t0 = time.perf_counter()
    # the exports `reconstruct-many` writes with its default flags
    if label.startswith("offline-"):
        results, stats = run_offline_scenes(cfg, params, jobs, ExportOptions(), causal=label == "offline-causal",
                                            slots=slots, prefetch=prefetch)
    else:
        results, stats = run_scenes(cfg, cache_cfg, params, jobs, ExportOptions(), slots=slots, prefetch=prefetch,
                                    slot_compute=slot_compute)
    wall = time.perf_counter() - t0
    done = sum(r["status"] == "done" for r in results)
    rec = {"run": label, "slots": slots, "prefetch": prefetch, "scenes": done, "frames": stats.frames,
           "wall_s": wall, "scenes_per_hour": 3600 * done / wall, "frames_per_s": stats.frames / wall,
           "device_idle_fraction": stats.device_idle_fraction, "frame_wait_s": stats.frame_wait_s,
           "writer_wait_s": stats.writer_wait_s, "loop_s": stats.total_s, "load_avg": os.getloadavg()[0]}
    log.info("%s", rec)
    return rec


def table(result: dict) -> str:
    rows = ["| run | slots | prefetch | scenes | frames | wall s | scenes/hour | frames/s | device idle | "
            "main loop waiting for the writer s | load avg (1 min) after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        rows.append(f"| {r['run']} | {r['slots']} | {r['prefetch']} | {r['scenes']} | {r['frames']} | "
                    f"{r['wall_s']:.1f} | {r['scenes_per_hour']:.0f} | {r['frames_per_s']:.2f} | "
                    f"{r['device_idle_fraction']:.4f} | {r['writer_wait_s']:.1f} | {r['load_avg']:.1f} |")
    return "\n".join(rows)


def write_readme(text: str, marker: str = "many") -> None:
    """Put `text` between the `<!-- marker:start/end -->` markers of benchmarks/README.md."""
    from .summarize import markers, update_readme

    update_readme(HERE / "README.md", text, *markers(marker))


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    labels = [r["run"] for r in result["runs"]]
    a.barh(labels, [r["scenes_per_hour"] for r in result["runs"]])
    a.set(xlabel="scenes/hour", title=f"{result['scenes']} scenes, {result['frames']} frames")
    b.barh(labels, [r["device_idle_fraction"] for r in result["runs"]])
    b.set(xlabel="device-idle fraction (waiting for frames)", xlim=(0, 1), yticks=[])
    where = (f"provisional: shared {result['cpu_count']}-core CPU" if result["backend"] == "cpu"
             else f"{result['device_kind']}, {result['cpu_count']} host cores")
    fig.suptitle(f"reconstruct-many, tiny {result['frame'][0]}x{result['frame'][1]} {result.get('dtype', 'float32')}, "
                 f"slots {result.get('slot_compute', 'auto')} ({where})", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many", description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=40)
    p.add_argument("--min-frames", type=int, default=5)
    p.add_argument("--max-frames", type=int, default=40)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--runs", default="continuous,one-at-a-time,continuous-no-prefetch")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default="many_tiny")
    p.add_argument("--slot-compute", default="auto", help="how a pool steps its slots (batch.SLOT_COMPUTE or auto)")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    p.add_argument("--marker", default="many", help="README table markers <!-- MARKER:start/end --> (default many)")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import jax

    from xsvggt_jax.cache.core import CacheConfig
    from xsvggt_jax.config import ModelConfig
    from xsvggt_jax.nn.model import init_params

    cfg = dataclasses.replace(ModelConfig.tiny(), dtype=args.dtype)
    params = init_params(cfg, jax.random.PRNGKey(0))
    cache_cfg = CacheConfig(prune="xstream", budget=64, quant="kcvt", bits=4)
    plans = {"continuous": (args.slots, args.prefetch), "one-at-a-time": (1, args.prefetch),
             "continuous-no-prefetch": (args.slots, 0), "offline-full": (args.slots, args.prefetch),
             "offline-causal": (args.slots, args.prefetch)}
    sources = scenes(args.scenes, args.min_frames, args.max_frames)
    runs = []
    for label in args.runs.split(","):
        with tempfile.TemporaryDirectory(prefix="xsvggt-many-bench-") as tmp:
            runs.append(run(label, sources, cfg, cache_cfg, params, *plans[label], Path(tmp) / "root",
                            args.slot_compute))
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"scenes": args.scenes, "frames": int(sum(s.num_frames for s in sources)),
              "lengths": [args.min_frames, args.max_frames], "frame": list(HW), "config": "tiny (random weights)",
              "cache": "xstream + int4 kcvt, budget 64", "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "dtype": args.dtype,
              "slot_compute": args.slot_compute,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "note": ("provisional: the CPU was shared with other jobs (see load averages)"
                       if jax.default_backend() == "cpu" else "frames rendered and outputs written on the host"),
              "runs": runs}
    atomic_write_json(args.out_dir / f"{args.name}.json", result)
    plot(result, args.out_dir / f"{args.name}.png")
    text = table(result)
    print(text)
    if args.update_readme:
        write_readme(text, args.marker)
    return result


if __name__ == "__main__":
    main()
