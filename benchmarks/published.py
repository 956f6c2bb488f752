"""The paper's Figure 1 on one GPU: per-frame ms and peak memory vs frames, ours and upstream, published model.

    python -m benchmarks.published --upstream-src .upstream --upstream-python python3 --time-limit 480
    python -m benchmarks.published --config tiny --height 56 --width 70 --frames 3   # CPU dry run

Ours: `xsvggt_jax.stream.step.step` (aggregator, camera head, depth and point DPT heads; no query points)
with random weights (`init_params(cfg, PRNGKey(0))`) for each (setting, dtype): settings `none`
(uncompressed, cache sized for the stream), `xstream` (budget `--budget`, pool `--pool`) and
`xstream-int4` (xstream + KCVT `--bits`-bit codes, group `--group`); dtypes float32, bfloat16 and auto
(the accelerator policy: trunk bfloat16, heads float32; float32 on CPU). Frame i is
`np.random.default_rng(i).random((1, H, W, 3))`. Programs are lowered and compiled up front,
`--compile-workers` at a time in threads (compile seconds reported apart, measured under that
concurrency), and run in priority order as they become ready: the essentials first (ours xstream-int4
bfloat16, upstream XStreamVGGT, upstream StreamVGGT, ours none bfloat16), then the other dtypes, then
the compressed runs continued to the long frames (their cache is kept between the two passes).
Upstream (optional, `--upstream-src` with a torch interpreter `--upstream-python`): StreamVGGT
(KV_PRUNE_MODE=none) and XStreamVGGT (KV_PRUNE_MODE=XStreamVGGT, KV_CACHE_SIZE=budget, KV_POOL_SIZE=pool,
KV_QUANT_MODE=KCVT on the prune_and_quantize branch) via `benchmarks/upstream_stream.py --heads`, the
aggregator under bfloat16 autocast and the heads in float32 (dtype "autocast-bf16"), one process per
setting, never at the same time as ours (the compiles of ours may run meanwhile).

Output: JSON Lines (`--out`, default benchmarks/results/published_gpu_vs_upstream.jsonl), one object
per (impl, setting, dtype, frame): impl "ours"|"upstream", setting, dtype, frame (1-based), ms (that
frame's step, device-synchronised; frame 1 also pays the first dispatch), peak_bytes (device peak so
far in the process; host peak RSS where the device does not report it, `peak_kind` says which), device,
compile_s, cache_bytes_used (the run's filled cache) and bytes_in_use (device bytes live now; None
on CPU) for ours, and a PNG beside it (ms/frame and GiB vs frames). Runs that do not fit `--time-limit`
are skipped or cut short with a logged reason; a header line (impl "meta") records them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.io.fsutil import atomic_write, atomic_write_text
from xsvggt_jax.nn.model import init_params
from xsvggt_jax.runtime import device_peak_bytes, peak_rss_bytes
from xsvggt_jax.stream import step as step_mod
from xsvggt_jax.stream.pipeline import filled_bytes

log = logging.getLogger("benchmarks.published")

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "published_gpu_vs_upstream.jsonl"
SETTINGS = ("none", "xstream", "xstream-int4")
DTYPES = ("float32", "bfloat16", "auto")
UPSTREAM_ENV = {"none": {"KV_PRUNE_MODE": "none", "KV_QUANT_MODE": ""},
                "xstream": {"KV_PRUNE_MODE": "XStreamVGGT", "KV_QUANT_MODE": ""},
                "xstream-int4": {"KV_PRUNE_MODE": "XStreamVGGT", "KV_QUANT_MODE": "KCVT"}}
UPSTREAM_DTYPE = "autocast-bf16"


def fail(msg: str) -> None:
    sys.stderr.write(f"xsvggt: error: {msg}\n")
    raise SystemExit(2)


def int_list(text: str, what: str) -> list[int]:
    try:
        xs = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        fail(f"{what} must be a comma list of frame numbers, got {text!r}")
    if not xs or xs[0] < 1:
        fail(f"{what} must list frame numbers >= 1, got {text!r}")
    return xs


def cache_config(setting: str, args) -> CacheConfig:
    if setting == "none":
        return CacheConfig.from_text("none")
    cc = CacheConfig(prune="xstream", budget=args.budget, pool=args.pool)
    if setting == "xstream-int4":
        cc = CacheConfig.from_text(f"xstream-int{args.bits}:{args.budget}")
        cc = dataclasses.replace(cc, pool=args.pool, group=args.group)
    return cc


def frame(i: int, hw) -> np.ndarray:
    """Frame i (0-based): deterministic, independent of the frames before it."""
    return np.random.default_rng(i).random((1, *hw, 3), dtype=np.float32)


@dataclasses.dataclass
class Run:
    """One of our (setting, dtype) streams: its program, its cache, and the frames done so far."""
    setting: str
    dtype: str
    cache_cfg: CacheConfig
    compiled: object = None
    cache: object = None
    compile_s: float = 0.0
    done: int = 0
    error: str | None = None


def build(run: Run, base: ModelConfig, params, hw, capacity: int) -> Run:
    try:
        cfg = base.replace(dtype=run.dtype)
        t0 = time.perf_counter()
        example = jax.device_put(np.zeros((1, *hw, 3), np.float32))
        max_frames = capacity if run.cache_cfg.prune == "none" else None
        run.cache = step_mod.place_cache(init_cache(cfg, run.cache_cfg, 1, hw, max_frames=max_frames), params, example)
        jitted = jax.jit(lambda p, c, f: step_mod.step(cfg, run.cache_cfg, p, c, f), donate_argnums=(1,))
        run.compiled = jitted.lower(params, run.cache, example).compile()
        run.compile_s = time.perf_counter() - t0
        log.info("compiled ours %s %s in %.1f s", run.setting, run.dtype, run.compile_s)
    except Exception as e:  # noqa: BLE001 - one program that fails to build loses only its own rows
        run.error = f"{type(e).__name__}: {e}"
        log.warning("ours %s %s: build failed: %s", run.setting, run.dtype, run.error)
    return run


def live_bytes() -> int | None:
    """Device bytes in use now (every live run's cache and the parameters), None where unreported."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return int(stats["bytes_in_use"]) if stats and "bytes_in_use" in stats else None


def peak() -> tuple[int, str]:
    d = device_peak_bytes()
    return (int(d), "device") if d is not None else (int(peak_rss_bytes()), "host_rss")


def stream(run: Run, params, hw, until: int, record: set[int], deadline: float, device: str, emit) -> None:
    """Continue `run` to frame `until` (1-based), emitting a row at each recorded frame."""
    while run.done < until:
        if time.monotonic() > deadline:
            log.warning("ours %s %s: time limit at frame %d of %d", run.setting, run.dtype, run.done, until)
            return
        img = jax.block_until_ready(jax.device_put(frame(run.done, hw)))
        t = time.perf_counter()
        run.cache, out = run.compiled(params, run.cache, img)
        jax.block_until_ready((run.cache, out))
        ms = (time.perf_counter() - t) * 1e3
        run.done += 1
        if run.done in record:
            pb, kind = peak()
            emit({"impl": "ours", "setting": run.setting, "dtype": run.dtype, "frame": run.done, "ms": ms,
                  "peak_bytes": pb, "peak_kind": kind, "device": device, "compile_s": run.compile_s,
                  "cache_bytes_used": int(filled_bytes(run.cache)), "bytes_in_use": live_bytes()})


def upstream(setting: str, frames: int, record: set[int], args, spec: dict, hw, deadline: float, emit,
             skipped: list) -> None:
    left = deadline - time.monotonic()
    if left < 20:
        skipped.append(f"upstream {setting}: no time left")
        return
    env = dict(os.environ, **UPSTREAM_ENV[setting], KV_CACHE_SIZE=str(args.budget), KV_POOL_SIZE=str(args.pool))
    runner = Path(__file__).resolve().parent / "upstream_stream.py"
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "up.json"
        cmd = [args.upstream_python, str(runner), "--src", str(args.upstream_src), "--spec", json.dumps(spec),
               "--height", str(hw[0]), "--width", str(hw[1]), "--frames", str(frames), "--out", str(res),
               "--device", args.upstream_device, "--autocast", "bfloat16", "--heads"]
        log.info("upstream %s to frame %d", setting, frames)
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            skipped.append(f"upstream {setting}: time limit before frame {frames}")
            log.warning(skipped[-1])
            return
        if r.returncode != 0 or not res.exists():
            skipped.append(f"upstream {setting}: failed (rc {r.returncode}): {r.stderr[-1500:]}")
            log.warning(skipped[-1])
            return
        up = json.loads(res.read_text())
    if setting == "xstream-int4" and not up.get("quant_supported"):
        skipped.append("upstream xstream-int4: this upstream tree has no KV_QUANT_MODE (not prune_and_quantize)")
        log.warning(skipped[-1])
    pb, kind = ((up["device_peak_bytes"], "device") if up.get("device_peak_bytes") is not None
                else (up["peak_rss_bytes"], "host_rss"))
    for f in sorted(record):
        if f <= len(up["latency_s"]):
            emit({"impl": "upstream", "setting": setting, "dtype": UPSTREAM_DTYPE, "frame": f,
                  "ms": up["latency_s"][f - 1] * 1e3, "peak_bytes": pb, "peak_kind": kind,
                  "peak_note": "process peak at the end of the run", "device": up.get("device", "cpu"),
                  "heads": up.get("heads"), "torch_version": up.get("torch_version")})


def plot(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.subplots(1, 2)
    keys = sorted({(r["impl"], r["setting"], r["dtype"]) for r in rows if r["impl"] != "meta"})
    for i, key in enumerate(keys):
        rs = sorted((r for r in rows if (r["impl"], r["setting"], r["dtype"]) == key), key=lambda r: r["frame"])
        x = [r["frame"] for r in rs]
        ls = "-" if key[0] == "ours" else "--"
        label = f"{key[0]} {key[1]} {key[2]}"
        ax_t.plot(x, [r["ms"] for r in rs], ls, marker="o", ms=3, color=f"C{i % 10}", label=label)
        ax_m.plot(x, [r["peak_bytes"] / 2 ** 30 for r in rs], ls, marker="o", ms=3, color=f"C{i % 10}", label=label)
    ax_t.set(xlabel="frames", ylabel="ms / frame", title="per-frame latency", yscale="log")
    ax_m.set(xlabel="frames", ylabel="GiB (peak so far)", title="peak memory")
    for ax in (ax_t, ax_m):
        ax.set_xscale("symlog", linthresh=10)
        ax.grid(alpha=0.3, which="both")
    ax_t.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.published", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("published", "medium", "tiny", "micro"), default="published")
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--frames", type=int, default=1000, help="no run goes past this frame (default 1000)")
    p.add_argument("--record", default="1,50,100,200", help="frames recorded for every run")
    p.add_argument("--record-long", default="500,1000", help="further frames for the compressed settings")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--pool", type=int, default=16)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--compile-workers", type=int, default=4, help="programs compiled at once (default 4)")
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds for everything (default 480)")
    p.add_argument("--upstream-src", type=Path, help="upstream (X)StreamVGGT checkout; absent: skipped")
    p.add_argument("--upstream-python", default=sys.executable, help="interpreter with torch")
    p.add_argument("--upstream-device", default="cuda", help="torch device for upstream (default cuda)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON Lines; the PNG goes beside it")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.monotonic()
    deadline = t_start + args.time_limit
    settings = [s for s in args.settings.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for s in settings:
        if s not in SETTINGS:
            fail(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    for d in dtypes:
        if d not in DTYPES:
            fail(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    if args.frames < 1:
        fail("--frames must be >= 1")
    record = [f for f in int_list(args.record, "--record") if f <= args.frames]
    record_long = [f for f in int_list(args.record_long, "--record-long") if f <= args.frames]
    if not record:
        record = [args.frames]
    short_until = max(record)
    long_until = max(record + record_long)
    cfg = ModelConfig.preset(args.config)
    hw = (args.height, args.width)
    try:
        cfg.tokens_per_frame(*hw)
    except Exception as e:  # noqa: BLE001 - a bad frame size is bad input
        fail(str(e))
    skipped: list[str] = []
    up_ok = False
    if args.upstream_src is None:
        skipped.append("upstream: no --upstream-src given")
    elif not (args.upstream_src / "src" / "streamvggt").is_dir() and not (args.upstream_src / "streamvggt").is_dir():
        skipped.append(f"upstream: {args.upstream_src} holds no streamvggt package")
    elif subprocess.run([args.upstream_python, "-c", "import torch"], capture_output=True).returncode != 0:
        skipped.append(f"upstream: `import torch` fails for {args.upstream_python}")
    else:
        up_ok = True
    for s in skipped:
        log.warning("%s: skipped", s)

    dev = jax.devices()[0]
    device = getattr(dev, "device_kind", str(dev))
    out = Path(args.out)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        log.info("%s", row)
        # rewritten whole each time (atomically): a run cut short keeps every row so far
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in [meta, *rows]))

    t0 = time.perf_counter()
    params = jax.block_until_ready(jax.device_put(init_params(cfg, jax.random.PRNGKey(0)), dev))
    meta = {"impl": "meta", "config": args.config, "frame_hw": list(hw), "device": device,
            "backend": jax.default_backend(), "jax_version": jax.__version__, "params_init_s": time.perf_counter() - t0,
            "budget": args.budget, "pool": args.pool, "bits": args.bits, "group": args.group,
            "record": record, "record_long": record_long, "skipped": skipped,
            "peak_note": "ours: device peak_bytes_in_use so far in this process (monotone over runs; run order "
                         "in 'order'), host peak RSS where the backend reports none (peak_kind)",
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat()}

    # priority order: essentials first, then the other dtypes
    order: list[tuple[str, str]] = []
    for key in [("xstream-int4", "bfloat16"), ("none", "bfloat16"), ("xstream", "bfloat16")]:
        if key[0] in settings and key[1] in dtypes:
            order.append(key)
    for d in ("auto", "float32", "bfloat16"):
        for s in SETTINGS:
            if s in settings and d in dtypes and (s, d) not in order:
                order.append((s, d))
    meta["order"] = [f"{s}/{d}" for s, d in order]
    runs = {key: Run(key[0], key[1], cache_config(key[0], args)) for key in order}
    pool = concurrent.futures.ThreadPoolExecutor(max(1, args.compile_workers))
    futures = {key: pool.submit(build, runs[key], cfg, params, hw, long_until) for key in order}

    def run_ours(key, until, rec):
        try:  # waits for the compile, but not past the time limit
            r = futures[key].result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            skipped.append(f"ours {key[0]} {key[1]}: still compiling at the time limit")
            return
        if r.error:
            skipped.append(f"ours {key[0]} {key[1]}: {r.error}")
        elif time.monotonic() > deadline:
            skipped.append(f"ours {key[0]} {key[1]}: no time left at frame {r.done}")
        else:
            stream(r, params, hw, until, set(rec), deadline, device, emit)

    spec = cfg.to_spec()
    ups = [s for s in ("xstream-int4" if "xstream-int4" in settings else "xstream", "none") if s in settings]
    for i, key in enumerate(order):
        run_ours(key, short_until, record)
        if i == 0 and up_ok:  # upstream XStreamVGGT and StreamVGGT right after our first essential
            for s in ups:
                upstream(s, short_until, set(record), args, spec, hw, deadline, emit, skipped)
    for key in order:  # the compressed runs, continued to the long frames
        if key[0] != "none" and record_long and not runs[key].error:
            run_ours(key, long_until, record + record_long)
    if up_ok and record_long and ups and ups[0] != "none":
        upstream(ups[0], long_until, set(record_long), args, spec, hw, deadline, emit, skipped)
    pool.shutdown(wait=False, cancel_futures=True)
    meta["wall_s"] = time.monotonic() - t_start
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in [meta, *rows]))
    if not args.no_plot:
        plot(rows, out.with_suffix(".png"), f"{args.config} {hw[0]}x{hw[1]}, {device}, random weights")
    for s in skipped:
        log.warning("skipped: %s", s)
    sys.stdout.write(f"wrote {out} ({len(rows)} rows)\n")
    return [meta, *rows]


if __name__ == "__main__":
    main()
