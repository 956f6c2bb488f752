"""Batched-streams benchmark: frames/s of the pool step for B streams on 1 and on D forced devices.

    python -m benchmarks.batch --configs tiny,medium --batches 1,2,4,8 --devices 1,4 [--update-readme]

For each device count D a child interpreter runs with
`XLA_FLAGS=--xla_force_host_platform_device_count=D` (XLA must see the flag before jax starts). In it,
for each model config and each B, a pool of B slots (`xsvggt_jax.stream.pool`, cache `--setting`,
random weights `init_params(cfg, PRNGKey(0))`, deterministic random frames already placed on the
devices) is stepped by `make_pool_step`: on one device the jitted `vmap` of the step, on D devices
under `shard_map` over a mesh of min(B, D) devices on `data` (B / D slots a device). The step is
lowered and compiled explicitly (timed apart), run once to warm up, then `--steps` steps are timed,
each device-synchronised. frames/s = B x steps / time; per device = frames/s / devices used.

Forced host devices share the machine's cores: on a CPU they measure the partitioned program, not
more compute. The JSON records the load average before and after each child (the machine may be
shared): compare numbers only within one run. Writes `<out-dir>/<name>.json` and `.png` atomically
and prints a markdown table; `--update-readme` puts it between the batch markers of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

SCHEMA = 1
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
DEFAULT_HW = {"tiny": (56, 70), "medium": (112, 154)}  # tiny: the reference frames' size


def measure(config: str, hw: tuple[int, int], batches: Sequence[int], steps: int, setting: str,
            budget: int, dtype: str = "float32", compile_workers: int = 1) -> list[dict]:
    """In this process (its devices): one record per B, the model computing in `dtype`. The B
    programs are compiled first, `compile_workers` at a time (XLA compiles outside the GIL; on a
    many-core host several at once save wall time, each compile_s then measured under that
    concurrency), and timed afterwards one after another."""
    import concurrent.futures
    import dataclasses

    import jax
    import numpy as np

    from xsvggt_jax.stream import pool as pool_mod
    from xsvggt_jax.stream import mesh as parallel
    from xsvggt_jax.cache.core import init_cache, tree_bytes

    from .stream import CONFIGS, cache_setting, random_params

    cfg = dataclasses.replace(CONFIGS[config], dtype=dtype)
    cc = cache_setting(setting, budget, 4)
    params = random_params(cfg)
    fresh = init_cache(cfg, cc, 1, hw, max_frames=steps + 1)

    def build(b: int) -> tuple:  # (B, devices, params, pool, frames, compiled step, compile seconds)
        devices = jax.devices()[:min(b, len(jax.devices()))]
        mesh = parallel.make_mesh(devices=devices) if len(devices) > 1 else None
        if mesh is not None:
            parallel.check_batch(mesh, b)
        place = (lambda x: jax.device_put(x, parallel.batch_sharding(mesh))) if mesh else jax.device_put
        rep = jax.device_put(params, parallel.replicated(mesh)) if mesh else params
        pool = pool_mod.init_pool(fresh, b, sharding=parallel.batch_sharding(mesh) if mesh else None)
        frames = [place(np.random.default_rng(t).random((b, *hw, 3), dtype=np.float32)) for t in range(2)]
        run = pool_mod.make_pool_step(cfg, cc, mesh)
        t0 = time.perf_counter()
        compiled = run.jitted.lower(rep, pool, frames[0], None).compile()  # no query validity mask
        return b, devices, rep, pool, frames, compiled, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(max(1, compile_workers)) as ex:
        built = list(ex.map(build, batches))
    records = []
    for b, devices, rep, pool, frames, compiled, compile_s in built:
        pool, out = jax.block_until_ready(compiled(rep, pool, frames[0], None))  # warm-up
        times = []
        for t in range(steps):
            t0 = time.perf_counter()
            pool, out = jax.block_until_ready(compiled(rep, pool, frames[t % 2], None))
            times.append(time.perf_counter() - t0)
        fps = b * steps / sum(times)
        records.append({"config": config, "dtype": dtype, "frame_hw": list(hw), "batch": b, "devices": len(devices),
                        "compile_s": compile_s, "step_s": times, "median_step_s": statistics.median(times),
                        "frames_per_s": fps, "frames_per_s_per_device": fps / len(devices),
                        "pool_cache_bytes": tree_bytes(pool),
                        "cache_bytes_per_device": max(parallel.per_device_bytes(pool).values())})
        log.info("%s %s B=%d on %d device(s): %.2f frames/s (compile %.1f s)", config, dtype, b, len(devices), fps,
                 compile_s)
    return records


def child(argv: Sequence[str]) -> None:
    """`--child` mode: measure and print one JSON line."""
    args = build_parser().parse_args(argv)
    import jax
    recs = []
    for dtype in args.dtypes.split(","):
        for config in args.configs.split(","):
            hw = DEFAULT_HW[config] if args.height is None else (args.height, args.width)
            recs += measure(config, hw, [int(b) for b in args.batches.split(",")], args.steps, args.setting,
                            args.budget, dtype, args.compile_workers)
    print(json.dumps({"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                      "jax_version": jax.__version__, "records": recs}))


def run_devices(argv: Sequence[str], devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.batch", "--child", *argv], cwd=HERE.parent,
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"benchmark child ({devices} devices) failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(forced_devices=devices, load_avg_before=load_before, load_avg_after=os.getloadavg())
    return res


def table(result: dict) -> str:
    head = ("config", "dtype", "frame", "forced devices", "B", "devices used", "compile s", "median step ms",
            "frames/s", "frames/s per device", "cache KiB per device", "load avg (1 min) before/after")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in result["runs"]:
        load = f"{run['load_avg_before'][0]:.1f}/{run['load_avg_after'][0]:.1f}"
        for r in run["records"]:
            lines.append("| " + " | ".join([
                r["config"], r.get("dtype", "float32"), f"{r['frame_hw'][0]}x{r['frame_hw'][1]}",
                str(run["forced_devices"]), str(r["batch"]),
                str(r["devices"]), f"{r['compile_s']:.1f}", f"{r['median_step_s'] * 1e3:.1f}",
                f"{r['frames_per_s']:.2f}", f"{r['frames_per_s_per_device']:.2f}",
                f"{r['cache_bytes_per_device'] / 1024:.0f}", load]) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """frames/s against B, one line per (config, forced devices)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from xsvggt_jax.io.fsutil import atomic_write

    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for run in result["runs"]:
        for config, dtype in dict.fromkeys((r["config"], r.get("dtype", "float32")) for r in run["records"]):
            recs = [r for r in run["records"] if (r["config"], r.get("dtype", "float32")) == (config, dtype)]
            devices = f"{run['forced_devices']} forced device(s)" if run["backend"] == "cpu" else run["device_kind"]
            ax.plot([r["batch"] for r in recs], [r["frames_per_s"] for r in recs], marker="o",
                    ls="-" if run["forced_devices"] == 1 else "--", label=f"{config} {dtype}, {devices}")
    ax.set(xscale="log", ylim=(0, None), xlabel="streams B", ylabel="frames/s (all streams)",
           title=f"pool step, {result['setting']} ({machine_words(result)})")
    ax.set_xticks(result["batches"], [str(b) for b in result["batches"]])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def machine_words(result: dict) -> str:
    """What ran the numbers, for titles: the accelerator's kind, or the (possibly shared) CPU."""
    kinds = sorted({run["device_kind"] for run in result["runs"] if run["backend"] != "cpu"})
    return ", ".join(kinds) if kinds else f"provisional: shared {result['cpu_count']}-core CPU"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,medium", help="comma list of tiny, medium")
    p.add_argument("--batches", default="1,2,4,8", help="comma list of stream counts B")
    p.add_argument("--devices", default="1,4", help="comma list of forced host device counts")
    p.add_argument("--steps", type=int, default=5, help="timed steps per B (after one warm-up step)")
    p.add_argument("--setting", default="xstream-int4", help="cache setting (benchmarks.stream.SETTINGS)")
    p.add_argument("--budget", type=int, default=64, help="tokens kept per layer (pruned settings)")
    p.add_argument("--dtypes", default="float32", help="comma list of compute dtypes (float32, bfloat16)")
    p.add_argument("--compile-workers", type=int, default=1,
                   help="programs compiled at once before timing (default 1; more on a many-core host)")
    p.add_argument("--height", type=int, default=None, help="frame height (default per config)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default=None, help="output name (default batch_<configs>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--marker", default="batch", help="README table markers <!-- MARKER:start/end --> (default batch)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.child:
        child(argv)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keep = [a for a in argv if a not in ("--update-readme", "--no-plot")]
    runs = [run_devices(keep, int(d)) for d in args.devices.split(",")]
    shared_cpu = all(run["backend"] == "cpu" for run in runs)
    result = {"schema": SCHEMA, "setting": args.setting, "budget": args.budget, "steps": args.steps,
              "batches": [int(b) for b in args.batches.split(",")], "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "note": ("provisional: the CPU was shared with other jobs (see load averages)" if shared_cpu else
                       f"compiled {args.compile_workers} at a time; timed one program at a time"),
              "runs": runs}
    from xsvggt_jax.io.fsutil import atomic_write_text
    name = args.name or "batch_" + args.configs.replace(",", "_")
    atomic_write_text(args.out_dir / f"{name}.json", json.dumps(result, indent=1))
    if not args.no_plot:
        plot(result, args.out_dir / f"{name}.png")
    text = table(result)
    print(text)
    if args.update_readme:
        from .summarize import markers, update_readme
        update_readme(HERE / "README.md", text, *markers(args.marker))
    return result


if __name__ == "__main__":
    main()
