"""Quality per cache byte: every cache setting's depth, pose and point-cloud quality against its bytes.

    PYTHONPATH=. python -m benchmarks.quality --update-readme      # the shipped demo model
    PYTHONPATH=. python -m benchmarks.quality --from-json benchmarks/results/quality.json --update-readme

Data: held-out procedural sequences (`xsvggt_jax.data.procedural.make_scene`, default 3 x 100 frames
at the model's training size, seeds `HELD_OUT_SEED + k`: disjoint from training's clips, seeds 0.., and from its eval
scenes, `train.data.EVAL_SEED_BASE + k`). Model: the shipped `demo` model (`xsvggt_jax.pretrained`,
trained here on procedural clips) or `--params DIR` (`xsvggt train` / `convert`).

Per setting (a cache setting string, see `study_setting`), every sequence goes through the jitted
streaming step as `xsvggt eval` streams it (`eval.runner.stream_sequence`: batch 1, no query points,
one compile per setting) and is scored against the ground truth and against the uncompressed run's
predictions (setting `none`, streamed first):
* depth: AbsRel and delta < 1.25 with one robust scale per sequence (`eval.runner.score`,
  "video-depth", as `xsvggt eval` scores it; vs the uncompressed run: its depth taken as the truth);
* pose: ATE (Sim(3), `eval.runner.score`, "pose"), the cameras decoded from `camera_pose`;
* point cloud: Acc / Comp of `pts3d_in_other_view` (`eval.pointcloud.reconstruction_metrics`:
  median shift + scale, ICP, whole frames) on every `--keyframe-every`-th frame, every
  `--pixel-stride`-th pixel (the protocol's ICP and normals on all 1.7 M points of a 100-frame
  sequence would take minutes per setting on this CPU).
Sequence metrics are averaged over sequences (every pixel of a procedural frame is valid, so this
equals `xsvggt eval`'s valid-pixel weighting of depth). Cache bytes: the allocated arrays of the
fixed-shape cache (`cache_report`: global cache, camera-trunk cache, all leaves); `none` holds the
whole stream. ms/frame: median step latency after each sequence's first frame (the first
includes the compile, or the persistent compilation cache's load).

The claim tested (`compare_to_default`): at each budget, the best setting whose cache bytes are at
most those of XStreamVGGT's default (xstream, pool 16, KCVT int4, group 64, camera cache float)
against that default, per metric, with the number of sequences on which it is better. Picking the
best of many settings on the same few sequences favours the winner: read small margins as ties.

Writes `<out-dir>/quality.json` (after every setting, so an interrupted run keeps what it measured),
`<out-dir>/../quality.png` (quality vs total cache bytes, Pareto fronts marked, the default
highlighted) and prints the markdown tables; `--update-readme` puts them between the quality
markers of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.errors import ConfigError
from xsvggt_jax.eval.settings import Setting, SettingsError

from .summarize import markdown, markers, update_readme

log = logging.getLogger(__name__)

SCHEMA = 1
HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "quality.json"
DEFAULT_PNG = HERE / "quality.png"
START, END = markers("quality")
HELD_OUT_SEED = 2_000_000_000  # training clips use seeds 0.., its eval scenes 10^9 + k
REFERENCE = "none"
DEFAULT_FIELDS = {"pool": 16, "group": 64}  # XStreamVGGT's defaults, fixed for every setting of the study


def default_name(budget: int) -> str:
    """XStreamVGGT's default at `budget`: xstream, pool 16, KCVT int4, group 64 (camera cache float)."""
    return f"xstream-int4:{budget}"


#: The study's grid: the reference, XStreamVGGT's default at every budget, xstream's code widths, the
#: other policies at int4, budget-aware protection at a budget below first + current frame (106
#: tokens at 84x112, 186 at 112x154), and compressed camera caches. Ordered by importance: an
#: interrupted run keeps the front of the list.
GRID: tuple[str, ...] = (
    REFERENCE,
    *(default_name(b) for b in (256, 512, 1024, 2048, 64)),
    "xstream-int4:512/camera_quant=kcvt", "xstream-int4:1024/camera_quant=kcvt", "xstream-int4:2048/camera_quant=kcvt",
    "xstream-int4:1024/camera_budget=64", "xstream-int4:2048/camera_budget=64",
    *(f"{p}-int4:{b}" for b in (256, 1024) for p in ("sliding", "random", "diversity", "cumulative", "frame")),
    *(f"{p}-int4:64/protect=budget" for p in ("xstream", "diversity", "cumulative")),
    "xstream:256", "xstream:2048", "xstream-int8:256", "xstream-int8:2048",
    "xstream-int2:256", "xstream-int2:1024", "xstream-int2:2048",
)

#: Metric keys per setting (and sequence): vs the ground truth, then vs the uncompressed run ("_ref").
METRICS = ("abs_rel", "delta_1.25", "ate", "acc", "comp", "abs_rel_ref", "delta_1.25_ref", "ate_ref", "acc_ref",
           "comp_ref")
#: Metrics where higher is better (all others: lower).
HIGHER_IS_BETTER = ("delta_1.25", "delta_1.25_ref")
#: Relative difference below which two metric values count as equal (float noise, not quality).
TIE_RTOL = 1e-6
#: Metrics of the comparison with the default and of the plot panels.
COMPARED = ("abs_rel", "ate", "acc", "abs_rel_ref", "ate_ref")


# ------------------------------------------------------------------------------------------ settings
def study_setting(text: str) -> Setting:
    """`<eval setting>[/<field>=<value>...]` -> Setting: an `xsvggt eval` setting string (e.g.
    `xstream-int4:1024`, see `eval.settings`) with pool 16 and group 64, then CacheConfig fields
    (e.g. `/protect=budget`, `/camera_quant=kcvt`, `/camera_budget=64`), read by
    `CacheConfig.from_text` (values typed by the fields). Raises SettingsError."""
    name = text.strip()
    try:
        return Setting(name, CacheConfig.from_text(name, DEFAULT_FIELDS, sep="/"))
    except ConfigError as e:
        raise SettingsError(str(e)) from None


# -------------------------------------------------------------------------------------------- data
def held_out_sequences(count: int, frames: int, hw: tuple[int, int], seed: int = HELD_OUT_SEED) -> dict:
    """name -> `eval.runner.GroundTruth` of `count` procedural sequences (seeds seed, seed + 1, ...):
    frames [S, H, W, 3], depth [S, H, W], intrinsics [S, 3, 3], extrinsics [S, 4, 4] camera-from-world."""
    from xsvggt_jax.data.procedural import SceneConfig, make_scene
    from xsvggt_jax.eval.runner import GroundTruth

    out = {}
    for k in range(count):
        scene = make_scene(SceneConfig(frames=frames, height=hw[0], width=hw[1]), seed=seed + k, num_queries=0)
        extr = np.tile(np.eye(4), (frames, 1, 1))
        extr[:, :3] = scene.extrinsics
        out[f"procedural-{seed + k}"] = GroundTruth(scene.images, scene.depth, scene.intrinsics.astype(np.float64),
                                                    extr, np.ones(frames, bool))
    return out


# ----------------------------------------------------------------------------------------- metrics
def _sampled(points: np.ndarray, every: int, stride: int) -> np.ndarray:
    """[S, H, W, ...] -> the frames 0, every, 2 every, ... at every `stride`-th row and column."""
    return points[::every, ::stride, ::stride]


def _cloud_metrics(pred: np.ndarray, target: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Acc / Comp of point maps [S, H, W, 3] (whole frames, see the module docstring)."""
    from xsvggt_jax.eval.geometry import EvalInputError
    from xsvggt_jax.eval.pointcloud import reconstruction_metrics

    try:
        m = reconstruction_metrics(pred, target, valid, crop=None)
    except EvalInputError as e:  # e.g. no finite predicted point: recorded as missing, not fatal
        log.warning("point-cloud metrics: %s", e)
        return {"acc": math.nan, "comp": math.nan}
    return {"acc": m["acc"], "comp": m["comp"]}


def sequence_metrics(preds: dict, truth, ref: dict, every: int, stride: int) -> dict[str, float]:
    """METRICS of one sequence. preds / ref: `eval.runner.PREDICTION_KEYS` arrays [S, ...] of the
    setting and of the uncompressed run; truth: its `GroundTruth`."""
    from xsvggt_jax.eval.depth import DepthProtocol, evaluate_depth
    from xsvggt_jax.eval.pointcloud import world_to_camera
    from xsvggt_jax.eval.pose import extrinsics_to_c2w, trajectory_metrics
    from xsvggt_jax.eval.runner import score
    from xsvggt_jax.geometry import pose_encoding_to_extri_intri, unproject_depth

    out = {}
    depth = score("video-depth", preds, truth, DepthProtocol())
    out["abs_rel"], out["delta_1.25"] = depth["abs_rel"], depth["delta_1.25"]
    out["ate"] = score("pose", preds, truth, DepthProtocol())["ate"]
    extr = truth.extrinsics[:, :3]
    gt = world_to_camera(unproject_depth(truth.depth, extr, truth.intrinsics), extr[0])   # [S, H, W, 3]
    pts = _sampled(preds["pts3d_in_other_view"], every, stride)
    out.update(_cloud_metrics(pts, _sampled(gt, every, stride), _sampled(truth.depth > 0, every, stride)))

    d = evaluate_depth(preds["depth"][..., 0], ref["depth"][..., 0], align="scale")
    out["abs_rel_ref"], out["delta_1.25_ref"] = d["abs_rel"], d["delta_1.25"]
    hw = preds["depth"].shape[1:3]
    c2w = lambda p: extrinsics_to_c2w(pose_encoding_to_extri_intri(p["camera_pose"], hw)[0])
    out["ate_ref"] = trajectory_metrics(c2w(preds), c2w(ref))["ate"]
    ref_pts = _sampled(ref["pts3d_in_other_view"], every, stride)
    cloud = _cloud_metrics(pts, ref_pts, np.isfinite(ref_pts).all(-1))
    out["acc_ref"], out["comp_ref"] = cloud["acc"], cloud["comp"]
    return {k: float(out[k]) for k in METRICS}


def mean_metrics(per_sequence: Sequence[dict]) -> dict[str, float]:
    """Mean of every metric over sequences (NaN when any sequence has none)."""
    return {k: float(np.mean([m[k] for m in per_sequence])) for k in METRICS}


# ------------------------------------------------------------------------------------------- study
def run_study(params: dict, cfg, settings: Sequence[Setting], sequences: dict, *, every: int = 10, stride: int = 4,
              on_record: Optional[Callable[[dict], None]] = None) -> dict[str, dict]:
    """Stream every sequence with every setting and score it (module docstring).

    settings: Settings (names unique); the uncompressed reference `none` is streamed first (added
    when missing). sequences: name -> GroundTruth (`held_out_sequences`). on_record: called with
    the records so far after every setting. Returns setting name -> record: cache_config,
    cache_bytes / cache_bytes_global / cache_bytes_camera (allocated), ms_per_frame, first_frame_s,
    metrics (means over sequences), sequences (name -> metrics)."""
    import jax

    from xsvggt_jax.eval.runner import stream_sequence

    settings = list(settings)
    if REFERENCE not in [s.name for s in settings]:
        settings.insert(0, study_setting(REFERENCE))
    settings.sort(key=lambda s: s.name != REFERENCE)  # stable: the reference first, the rest in order
    params = jax.device_put(params)  # committed: one compile per setting
    refs: dict[str, dict] = {}
    records: dict[str, dict] = {}
    for setting in settings:
        t0 = time.perf_counter()
        per_seq, after_first, first, info = {}, [], [], {}
        for name, truth in sequences.items():
            preds, latency, info = stream_sequence(params, cfg, setting.cache, truth.frames)
            if setting.name == REFERENCE:
                refs[name] = preds
            first.append(latency[0])
            after_first.extend(latency[1:] or latency)
            per_seq[name] = sequence_metrics(preds, truth, refs[name], every, stride)
        records[setting.name] = {
            "cache_config": dataclasses.asdict(setting.cache),
            "cache_bytes": info["cache_bytes"], "cache_bytes_global": info["cache_bytes_global"],
            "cache_bytes_camera": info["cache_bytes_camera"],
            "ms_per_frame": 1e3 * float(np.median(after_first)), "first_frame_s": first[0],
            "wall_s": time.perf_counter() - t0,
            "metrics": mean_metrics(list(per_seq.values())), "sequences": per_seq}
        log.info("%s: %d B, %.1f ms/frame, %s", setting.name, info["cache_bytes"], records[setting.name]["ms_per_frame"],
                 {k: round(v, 4) for k, v in records[setting.name]["metrics"].items()})
        if on_record is not None:
            on_record(records)
    return records


# -------------------------------------------------------------------------------------- analysis
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (bytes, error) no other point dominates (lower or equal in both, lower
    in one), by increasing bytes; both coordinates are minimised. Points with a NaN are skipped; of
    exact duplicates the first is kept."""
    order = sorted((i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))),
                   key=lambda i: (points[i][0], points[i][1], i))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _nan(x: Optional[float]) -> float:
    """A metric as a float (the JSON writes NaN as null)."""
    return math.nan if x is None else x


def _better(metric: str, a: Optional[float], b: Optional[float]) -> bool:
    """`a` is better than `b` by more than float noise (TIE_RTOL relative); False when either is missing."""
    a, b = _nan(a), _nan(b)
    gain = a - b if metric in HIGHER_IS_BETTER else b - a
    return gain > TIE_RTOL * abs(b)


def compare_to_default(records: dict[str, dict], metrics: Sequence[str] = COMPARED) -> list[dict]:
    """Per budget with a default setting (`default_name`) among the records: for each metric the best
    other setting (reference excluded) with cache bytes <= the default's, its value and bytes, the
    default's value, and on how many sequences it beats the default."""
    rows = []
    for name, rec in records.items():
        cc = rec["cache_config"]
        if name != default_name(cc["budget"]):
            continue
        row = {"budget": cc["budget"], "default": name, "default_bytes": rec["cache_bytes"], "metrics": {}}
        pool = {n: r for n, r in records.items() if n not in (name, REFERENCE) and r["cache_bytes"] <= rec["cache_bytes"]}
        for m in metrics:
            scored = {n: r for n, r in pool.items() if not math.isnan(_nan(r["metrics"][m]))}
            entry = {"default": rec["metrics"][m], "best": None}
            if scored:
                sign = -1 if m in HIGHER_IS_BETTER else 1
                best = min(scored, key=lambda n: (sign * scored[n]["metrics"][m], scored[n]["cache_bytes"]))
                wins = sum(_better(m, scored[best]["sequences"][s][m], rec["sequences"][s][m]) for s in rec["sequences"])
                entry.update(best=best, value=scored[best]["metrics"][m], bytes=scored[best]["cache_bytes"],
                             beats_default=_better(m, scored[best]["metrics"][m], rec["metrics"][m]),
                             sequences_better=wins, sequences=len(rec["sequences"]))
            row["metrics"][m] = entry
        rows.append(row)
    return sorted(rows, key=lambda r: r["budget"])


# ------------------------------------------------------------------------------------------ report
def _kib(x: int) -> str:
    return f"{x / 1024:.0f}"


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def settings_table(result: dict) -> str:
    """One row per setting, by total bytes; `*` marks the AbsRel / ATE Pareto fronts, `D` the default."""
    recs = result["records"]
    names = sorted(recs, key=lambda n: (recs[n]["cache_bytes"], n))
    fronts = {m: {names[i] for i in pareto_front([(recs[n]["cache_bytes"], _nan(recs[n]["metrics"][m])) for n in names])}
              for m in ("abs_rel", "ate")}
    header = ("setting", "global KiB", "camera KiB", "total KiB", "AbsRel", "δ<1.25", "ATE", "Acc", "Comp",
              "AbsRel vs none", "ATE vs none", "Acc vs none", "ms/frame", "front")
    body = []
    for n in names:
        r, m = recs[n], recs[n]["metrics"]
        mark = "".join(["D" if n == default_name(r["cache_config"]["budget"]) else "",
                        "a" if n in fronts["abs_rel"] else "", "t" if n in fronts["ate"] else ""])
        body.append([f"`{n}`", _kib(r["cache_bytes_global"]), _kib(r["cache_bytes_camera"]), _kib(r["cache_bytes"]),
                     *(_fmt(m[k]) for k in ("abs_rel", "delta_1.25", "ate", "acc", "comp", "abs_rel_ref", "ate_ref",
                                            "acc_ref")),
                     f"{r['ms_per_frame']:.1f}", mark or "-"])
    return markdown(header, body)


def comparison_table(result: dict) -> str:
    """Per budget and metric: the default's value vs the best setting at <= its bytes."""
    body = []
    for row in result["comparison"]:
        for m, e in row["metrics"].items():
            best = "-" if e["best"] is None else f"`{e['best']}` ({_kib(e['bytes'])} KiB)"
            won = "-" if e["best"] is None else f"{'yes' if e['beats_default'] else 'no'} ({e['sequences_better']}/{e['sequences']})"
            body.append([str(row["budget"]), _kib(row["default_bytes"]), m, _fmt(e["default"]), best,
                         _fmt(e.get("value")), won])
    return markdown(("budget", "default KiB", "metric", "default", "best at <= default's bytes", "its value",
                     "better? (sequences)"), body)


def report(result: dict) -> str:
    head = (f"{result['frames']} frames x {len(result['sequences'])} held-out procedural sequences at "
            f"{result['frame'][0]}x{result['frame'][1]}, params `{result['params']}`, {result['backend']}; "
            f"run {result['wall_s'] / 60:.1f} min{'' if result['complete'] else ' (INCOMPLETE)'}. Front: "
            "`a` AbsRel, `t` ATE Pareto front (total bytes vs error); `D` XStreamVGGT's default.")
    return f"{head}\n\n{settings_table(result)}\n\nAgainst XStreamVGGT's default:\n\n{comparison_table(result)}"


def plot(result: dict, path: Path) -> None:
    """Quality vs total cache bytes (log): top row vs the ground truth, bottom row vs the uncompressed
    run; colour = policy, marker = code width; the Pareto front as a line; defaults ringed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from xsvggt_jax.io.fsutil import atomic_write

    recs = result["records"]
    names = list(recs)
    policies = sorted({recs[n]["cache_config"]["prune"] for n in names})
    markers = {"none": "o", 8: "s", 4: "^", 2: "v"}
    fig = Figure(figsize=(11, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = (("abs_rel", "depth AbsRel vs GT"), ("ate", "ATE vs GT"),
              ("abs_rel_ref", "depth AbsRel vs uncompressed"), ("ate_ref", "ATE vs uncompressed"))
    for ax, (metric, title) in zip(axes.flat, panels):
        xs = [recs[n]["cache_bytes"] / 2 ** 20 for n in names]
        ys = [_nan(recs[n]["metrics"][metric]) for n in names]
        for n, x, y in zip(names, xs, ys):
            cc = recs[n]["cache_config"]
            bits = "none" if cc["quant"] == "none" else cc["bits"]
            ax.scatter(x, y, color=f"C{policies.index(cc['prune'])}", marker=markers.get(bits, "x"), s=30, zorder=3)
            if n == default_name(cc["budget"]):
                ax.scatter(x, y, facecolors="none", edgecolors="k", s=140, lw=1.5, zorder=4)
        front = pareto_front([(x, y) for x, y in zip(xs, ys)])
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="k", lw=1, alpha=0.6, zorder=2)
        for i in front:
            ax.annotate(names[i], (xs[i], ys[i]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="cache bytes (MiB, allocated, log)", ylabel=metric, title=title)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    handles = [axes[0, 0].scatter([], [], color=f"C{i}", label=p) for i, p in enumerate(policies)]
    handles += [axes[0, 0].scatter([], [], color="grey", marker=m, label=f"{b}-bit" if b != "none" else "float")
                for b, m in markers.items()]
    handles.append(axes[0, 0].scatter([], [], facecolors="none", edgecolors="k", s=140, label="XStreamVGGT default"))
    axes[0, 0].legend(handles=handles, fontsize=7, ncol=2)
    fig.suptitle(f"quality per cache byte: {len(result['sequences'])} x {result['frames']} frames, "
                 f"{result['frame'][0]}x{result['frame'][1]} (line: Pareto front)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


# -------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=Path, help="params directory (config.json + params), e.g. from `xsvggt train` "
                                               "(default: the shipped demo model)")
    p.add_argument("--settings", help="comma list of settings (`study_setting`; default: the GRID)")
    p.add_argument("--sequences", type=int, default=3, help="held-out sequences (default 3)")
    p.add_argument("--frames", type=int, default=100, help="frames per sequence (default 100)")
    p.add_argument("--size", help="frame HxW (default: the demo model's training size, 84x112)")
    add_study_flags(p, keyframe_every=10, json_default=DEFAULT_JSON, png_default=DEFAULT_PNG, markers_name="quality")
    return p


def add_study_flags(p: argparse.ArgumentParser, *, keyframe_every: int, json_default: Path, png_default: Path,
                    markers_name: str) -> None:
    """The flags this study shares with `quality_scale`: metric sampling, outputs, README, compile cache."""
    p.add_argument("--keyframe-every", type=int, default=keyframe_every,
                   help=f"point-cloud metrics on every k-th frame (default {keyframe_every})")
    p.add_argument("--pixel-stride", type=int, default=4, help="... at every s-th row and column (default 4)")
    p.add_argument("--json", type=Path, default=json_default, help=f"output JSON (default {_shown(json_default)})")
    p.add_argument("--png", type=Path, default=png_default, help=f"output plot (default {_shown(png_default)})")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--from-json", type=Path, help="no study: report (and plot) an existing JSON")
    p.add_argument("--update-readme", nargs="?", const=HERE / "README.md", type=Path, metavar="README",
                   help=f"put the tables between the {markers_name} markers of this README (default benchmarks/README.md)")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")


def _shown(path: Path) -> str:
    return str(path.relative_to(HERE.parent)) if path.is_relative_to(HERE.parent) else str(path)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
    else:
        try:
            from xsvggt_jax import pretrained
            from xsvggt_jax.train.command import parse_size

            hw = tuple(pretrained.card("demo")["frame_size"]) if args.size is None else parse_size(args.size)
            settings = [study_setting(t) for t in (args.settings.split(",") if args.settings else GRID)]
        except (ValueError, SettingsError) as e:
            parser.error(f"--size must be HxW and --settings valid settings ({e})")
        if len(hw) != 2 or min(hw) < 1 or min(args.sequences, args.frames, args.keyframe_every, args.pixel_stride) < 1:
            parser.error("--size must be HxW and --sequences, --frames, --keyframe-every, --pixel-stride positive")
        result = study(parser, args, settings, hw)
    if not args.no_plot:
        plot(result, args.png)
    text = report(result)
    print(text)
    if args.update_readme:
        update_readme(args.update_readme, text, START, END)
    return result


def study(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Sequence[Setting],
          hw: tuple[int, int]) -> dict:
    """Run the study as `main`'s arguments say; writes the JSON after every setting."""
    import jax

    from xsvggt_jax.config import check_frame_size
    from xsvggt_jax.eval.runner import finite_or_none
    from xsvggt_jax.io.fsutil import atomic_write_json
    from xsvggt_jax.weights.params import load_params
    from xsvggt_jax.runtime import configure_compile_cache

    from xsvggt_jax import pretrained

    try:
        params, cfg = pretrained.load("demo") if args.params is None else load_params(args.params)
        check_frame_size(cfg, *hw)
    except ValueError as e:  # ParamsError, ConfigError / frame size
        parser.error(str(e))
    configure_compile_cache(not args.no_compile_cache)
    t0 = time.perf_counter()
    sequences = held_out_sequences(args.sequences, args.frames, hw)
    result: dict[str, Any] = {
        "schema": SCHEMA, "params": "pretrained:demo" if args.params is None else str(args.params), "model": cfg.to_dict(), "frame": list(hw),
        "tokens_per_frame": cfg.tokens_per_frame(*hw), "frames": args.frames, "sequences": list(sequences),
        "seed": HELD_OUT_SEED, "keyframe_every": args.keyframe_every, "pixel_stride": args.pixel_stride,
        "backend": jax.default_backend(), "jax_version": jax.__version__, "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "load_avg_before": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "records": {}, "comparison": [], "wall_s": 0.0,
    }

    def save(records: dict) -> None:
        result.update(records=records, comparison=compare_to_default(records), wall_s=time.perf_counter() - t0)
        atomic_write_json(args.json, finite_or_none(result))

    save(run_study(params, cfg, settings, sequences, every=args.keyframe_every, stride=args.pixel_stride,
                   on_record=save))
    result.update(complete=True, load_avg_after=os.getloadavg()[0])
    atomic_write_json(args.json, finite_or_none(result))
    log.info("wrote %s", args.json)
    return json.loads(json.dumps(finite_or_none(result)))


if __name__ == "__main__":
    main()
