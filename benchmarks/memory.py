"""Memory model of the offline forward: compile, do not run, and read XLA's memory analysis.

`python -m benchmarks.memory` compiles `StreamVGGT.offline` (one device) and `stream.sharded.offline_sharded`
(ring attention over D forced CPU devices, one subprocess per D with XLA_FLAGS) for each frame count,
with abstract parameters (`model.param_shapes`: nothing allocated), and records the peak bytes per
device = temp + arguments + outputs of the compiled executable. From a linear fit per (D, dtype) it
derives the longest sequence that fits a 16 GB and an 80 GB device. Rows are appended to the JSON as
they finish (compiles of the published model take minutes on a small CPU), largest S last.

    PYTHONPATH=. python -m benchmarks.memory --config published --frames 8,16,32,64,128 --devices 1,4 \
        --dtypes float32,bfloat16
    PYTHONPATH=. python -m benchmarks.memory --table        # print the table of the saved rows
    PYTHONPATH=. python -m benchmarks.memory --update-readme  # ... into benchmarks/README.md
    PYTHONPATH=. python -m benchmarks.memory --config medium --run --frames 4,8,16   # measured runs
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.model import StreamVGGT, init_params, param_shapes
from xsvggt_jax.runtime import peak_rss_bytes

log = logging.getLogger("benchmarks.memory")
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "memory.json"
MEDIUM_RUN = HERE / "results" / "memory_medium_run.json"
README = HERE / "README.md"
GB = 1e9
DEVICE_GB = (16, 80)


def config(name: str) -> ModelConfig:
    return ModelConfig.preset(name)


def compile_offline(cfg: ModelConfig, frames: int, hw: tuple[int, int], *, devices: int = 1,
                    causal: bool = True, attention: str = "auto", impl: str = "ring"):
    """The compiled offline forward for a [1, frames, H, W, 3] clip, parameters abstract
    (`param_shapes`, cast to cfg.dtype). devices > 1: `offline_sharded` over a (1, devices) mesh."""
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.jnp_dtype), param_shapes(cfg))
    shape = (1, frames, *hw, 3)
    model = StreamVGGT(cfg, attention=attention)
    if devices == 1:
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x, None, causal, method=StreamVGGT.offline))
        return fn.lower(params, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    from xsvggt_jax.stream.sharded import make_seq_mesh, offline_sharded
    mesh = make_seq_mesh(devices)
    rep = NamedSharding(mesh, P())
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), params)
    images = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P("data", "seq")))
    fn = jax.jit(functools.partial(offline_sharded, mesh=mesh, causal=causal, model=model, impl=impl))
    return fn.lower(params, images).compile()


def peak_bytes(compiled) -> dict:
    """Per-device bytes from `memory_analysis`: temp, arguments, outputs and their sum (peak)."""
    ma = compiled.memory_analysis()
    row = {"temp": int(ma.temp_size_in_bytes), "arguments": int(ma.argument_size_in_bytes),
           "outputs": int(ma.output_size_in_bytes), "alias": int(ma.alias_size_in_bytes)}
    row["peak"] = row["temp"] + row["arguments"] + row["outputs"] - row["alias"]
    return row


def _worker(args) -> None:
    """One process, one device count: compile each (dtype, S) and append a JSON row to args.out."""
    for dtype in args.dtypes.split(","):
        cfg = config(args.config).replace(dtype=dtype)
        for s in sorted(int(f) for f in args.frames.split(",")):
            t0 = time.perf_counter()
            row = {"config": args.config, "dtype": dtype, "devices": args.worker, "frames": s,
                   "hw": [args.height, args.width], "causal": not args.full}
            if args.run:
                row.update(_measured_run(cfg, s, (args.height, args.width), not args.full))
            else:
                compiled = compile_offline(cfg, s, (args.height, args.width), devices=args.worker,
                                           causal=not args.full)
                row.update(peak_bytes(compiled))
                del compiled
            row["seconds"] = round(time.perf_counter() - t0, 1)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("%s", row)


def _measured_run(cfg: ModelConfig, frames: int, hw: tuple[int, int], causal: bool) -> dict:
    """Execute the one-device offline forward on random weights; compiled peak and process peak RSS."""
    params = init_params(cfg, jax.random.PRNGKey(0))
    images = jax.random.uniform(jax.random.PRNGKey(1), (1, frames, *hw, 3))
    fn = jax.jit(lambda p, x: StreamVGGT(cfg).apply({"params": p}, x, None, causal, method=StreamVGGT.offline))
    compiled = fn.lower(params, images).compile()
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, images))
    row = peak_bytes(compiled)
    row.update(run_seconds=round(time.perf_counter() - t0, 2),
               peak_rss=peak_rss_bytes(), measured=True)
    return row


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def longest_fit(rows: Sequence[dict], device_bytes: float) -> Optional[int]:
    """Largest S with a + b*S <= device_bytes for the least-squares line through (frames, peak)."""
    if len(rows) < 2:
        return None
    s = np.array([r["frames"] for r in rows], float)
    b, a = np.polyfit(s, np.array([r["peak"] for r in rows], float), 1)
    return int((device_bytes - a) // b) if b > 0 and device_bytes > a else 0


def table(rows: Sequence[dict]) -> str:
    """Markdown: peak GB per device by S for each (config, dtype, D) (measured runs: also the process
    peak RSS), then the longest S that fits each device size."""
    frames = sorted({r["frames"] for r in rows})
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["config"], r["dtype"], r["devices"], tuple(r["hw"]), bool(r.get("measured"))), []).append(r)
    head = ["config", "dtype", "devices", "HxW"] + [f"S={s}" for s in frames] + [f"max S @{g} GB" for g in DEVICE_GB]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (cfg, dtype, d, hw, measured), rs in sorted(groups.items()):
        by = {r["frames"]: r for r in rs}
        cell = lambda r: f"{r['peak'] / GB:.2f}" + (f" (RSS {r['peak_rss'] / GB:.2f})" if measured else "")
        cells = [cell(by[s]) if s in by else "-" for s in frames]
        fits = [str(longest_fit(rs, g * GB) or "-") for g in DEVICE_GB]
        name = cfg + (" (run)" if measured else "")
        lines.append("| " + " | ".join([name, dtype, str(d), f"{hw[0]}x{hw[1]}"] + cells + fits) + " |")
    return "\n".join(lines)


def update_readme(readme: Path = README) -> None:
    """Replace the text between the memory markers of the README with the compiled and measured tables."""
    text = readme.read_text()
    start, end = "<!-- memory:start -->", "<!-- memory:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} section")
    body = "\n\n".join(table(rows) for rows in (load(DEFAULT_OUT), load(MEDIUM_RUN)) if rows)
    head, rest = text.split(start, 1)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1])
    tmp.replace(readme)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="published", choices=("tiny", "medium", "published"))
    ap.add_argument("--frames", default="8,16,32,64,128")
    ap.add_argument("--devices", default="1,4")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--height", type=int, default=392)
    ap.add_argument("--width", type=int, default=518)
    ap.add_argument("--full", action="store_true", help="full (non-causal) offline attention")
    ap.add_argument("--run", action="store_true", help="execute on one device instead of compiling only")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    ap.add_argument("--update-readme", action="store_true", help="write the tables into benchmarks/README.md")
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table:
        print(table(load(args.out)))
        return
    if args.update_readme:
        update_readme()
        return
    if args.worker:
        _worker(args)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for d in ([1] if args.run else [int(x) for x in args.devices.split(",")]):
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                         f"--xla_force_host_platform_device_count={d}".strip())
        argv_d = [a for a in (argv if argv is not None else sys.argv[1:])] + ["--worker", str(d)]
        subprocess.run([sys.executable, "-m", "benchmarks.memory", *argv_d], env=env, check=True)
    print(table(load(args.out)))


if __name__ == "__main__":
    main()
