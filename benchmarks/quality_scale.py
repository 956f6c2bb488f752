"""Quality per device byte at a realistic scale: every cache policy, code width, quantization order and
weight precision of a model trained on 8-frame clips of 108-patch frames, on >= 200-frame streams.

    PYTHONPATH=. python -m benchmarks.quality_scale --update-readme              # the shipped stream8 model
    PYTHONPATH=. python -m benchmarks.quality_scale --resume --update-readme     # add rows (new policies, ...)
    PYTHONPATH=. python -m benchmarks.quality_scale --from-json benchmarks/results/quality_scale.json --update-readme

The staged grid (`quality_scale_grid.plan_stage1`, `plan_stage2`), at budgets of 1, 2, 4 and 8
frames' tokens (`--frame-budgets`; tokens per frame = patches + special tokens at the frame size):
1. the uncompressed reference `none`, then every policy of the registry (`cache.prune.POLICIES`, so
   policies registered later join by rerunning) with a float cache, and XStreamVGGT's default
   (`quality.default_name`: xstream + KCVT int4, group 64, pool 16, camera cache float) per budget;
2. per budget the `--best` policies of stage 1 (ranked by fidelity to `none`: the sum of their ranks
   in AbsRel vs none and ATE vs none) across code widths {float, int8, int4, int2} (KCVT layout) x
   quantization order {upstream: dequantize, append, re-quantize every step; once: each token
   quantized when it enters, `CacheConfig.quant_once`, when that field exists, else the axis is
   skipped and the JSON says so} x weights {float32, the `--weights` formats (default int8, int4:
   the model converted in memory by `xsvggt_jax.weights.quant.quantize_params`, as `--weights`
   converts it; skipped with a note when the tree has no `weights.quant`), and every
   `--weight-params LABEL=DIR` (params directories of the same model)}. Every weight variant also
   streams `none` (the weights' error alone).
Everything is scored as `benchmarks.quality` scores it (`quality.sequence_metrics`: vs the ground
truth and vs the uncompressed float-weight run) on `--sequences` held-out procedural sequences of
`--frames` frames (`quality.held_out_sequences`: seeds 2,000,000,000 + k, never seen in training).

Bytes: cache bytes are the allocated arrays of the fixed-shape cache (`cache_report`); weight bytes are
the bytes of the params pytree's leaves as streamed (float32 for the shipped model; low-bit weights:
their codes and scales, which the step decodes at use); total device bytes = weights + cache. The
answer (`quality_scale_grid.leanest`, `CRITERIA`): per tolerance (1%, 5%) the setting of least total
bytes whose AbsRel and ATE vs the ground truth are at most (1 + tol) x the uncompressed run's, and,
stricter, whose deviation from the uncompressed run is within tol (AbsRel vs none <= tol, ATE vs
none <= tol x the uncompressed run's ATE), both metrics and each alone; each against XStreamVGGT's
default at the same budget and against the leanest default setting that meets the same bar.
`--extra` adds any setting strings after the stages (e.g. compressed camera caches).

`--resume` keeps the records of an existing JSON of the same model, frame size and sequences and
streams only the missing settings (the reference is re-streamed for the `_ref` metrics), so new
policies, `quant_once` or weight variants add rows without rerunning the rest. Writes
`<json>` after every setting, `<png>` (error vs total device bytes, Pareto fronts) and the README
tables between the quality_scale markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import quality
from .quality_scale_grid import (CODE_WIDTHS, FLOAT, ORDERS, REFERENCE, answers, has_quant_once, plan_stage1,
                                 plan_stage2, policies, split_name)
from .quality_scale_report import plot, report
from .summarize import markers, update_readme

log = logging.getLogger(__name__)

SCHEMA = 1
HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "quality_scale.json"
DEFAULT_PNG = HERE / "quality_scale.png"
START, END = markers("quality_scale")
DEFAULT_MODEL = "stream8"


# ------------------------------------------------------------------------------------------ stream
def stream_record(params: dict, cfg, setting, sequences: dict, refs: dict, every: int, stride: int,
                  weight_bytes: int) -> dict:
    """Stream and score every sequence with one setting and params (`quality.run_study`'s record,
    plus weight and total bytes). refs: sequence name -> the uncompressed float run's predictions,
    filled when `setting` is the reference and `refs` is empty."""
    from xsvggt_jax.eval.runner import stream_sequence

    t0 = time.perf_counter()
    per_seq, after_first, first, info = {}, [], [], {}
    for name, truth in sequences.items():
        preds, latency, info = stream_sequence(params, cfg, setting.cache, truth.frames)
        refs.setdefault(name, preds)
        first.append(latency[0])
        after_first.extend(latency[1:] or latency)
        per_seq[name] = quality.sequence_metrics(preds, truth, refs[name], every, stride)
    return {"cache_config": dataclasses.asdict(setting.cache),
            "cache_bytes": info["cache_bytes"], "cache_bytes_global": info["cache_bytes_global"],
            "cache_bytes_camera": info["cache_bytes_camera"], "weight_bytes": weight_bytes,
            "total_bytes": weight_bytes + info["cache_bytes"],
            "ms_per_frame": 1e3 * float(np.median(after_first)), "first_frame_s": first[0],
            "wall_s": time.perf_counter() - t0,
            "metrics": quality.mean_metrics(list(per_seq.values())), "sequences": per_seq}


# -------------------------------------------------------------------------------------------- main
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality_scale", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=DEFAULT_MODEL, help=f"a shipped model (xsvggt_jax.pretrained; default {DEFAULT_MODEL})")
    src.add_argument("--params", type=Path, help="params directory (config.json + params) instead; needs --size")
    p.add_argument("--size", help="frame HxW (default: the shipped model's training size)")
    p.add_argument("--sequences", type=int, default=3, help="held-out sequences (default 3)")
    p.add_argument("--frames", type=int, default=200, help="frames per sequence (default 200)")
    p.add_argument("--frame-budgets", default="1,2,4,8", help="budgets in frames' tokens (default 1,2,4,8)")
    p.add_argument("--policies", help="comma list of registry policies (default: every one of cache.prune.POLICIES)")
    p.add_argument("--best", type=int, default=1, help="policies per budget carried into stage 2 (default 1)")
    p.add_argument("--widths", default=",".join(CODE_WIDTHS), help="stage 2's code widths (default int8,int4,int2)")
    p.add_argument("--orders", default=",".join(ORDERS), help="quantization orders: upstream, once (default both; "
                                                            "once is skipped when CacheConfig has no quant_once)")
    p.add_argument("--weights", default="int8,int4", help="low-bit weight formats quantized from the model in memory "
                   "(`weights.quant.WeightFormat` text, e.g. int8,int4:64; skipped with a note when this tree has no "
                   "weights.quant); '' for none (default int8,int4)")
    p.add_argument("--weight-params", default="", metavar="LABEL=DIR,...",
                   help="more weight variants: params directories of the same model (e.g. int8=DIR)")
    p.add_argument("--stages", type=int, choices=(1, 2), default=2, help="run stage 1 only, or both (default)")
    p.add_argument("--extra", default="", metavar="SETTING[+w=LABEL],...",
                   help="more rows after the stages: `quality.study_setting` strings (e.g. a compressed camera "
                        "cache: random-int4:3616/camera_quant=kcvt), optionally with a weight variant")
    p.add_argument("--time-limit", type=float, help="minutes: start no new setting after this (the JSON says INCOMPLETE)")
    p.add_argument("--resume", action="store_true", help="keep the records of an existing --json of the same run")
    quality.add_study_flags(p, keyframe_every=20, json_default=DEFAULT_JSON, png_default=DEFAULT_PNG,
                            markers_name="quality_scale")
    return p


@dataclasses.dataclass
class Plan:
    """The checked arguments of a study run."""

    params: dict
    cfg: Any
    label: str
    hw: tuple[int, int]
    budgets: list[int]
    policies: list[str]
    widths: list[str]
    orders: list[str]
    weights: dict[str, dict]      # label -> params ("float" first)
    sources: dict[str, str]       # label -> where its params come from
    notes: list[str]
    extra: list[str]              # --extra record names


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    """Everything `main` needs, checked before any stream (parser.error: exit 2, one line)."""
    import jax

    from xsvggt_jax import pretrained
    from xsvggt_jax.config import check_frame_size
    from xsvggt_jax.train.command import parse_size
    from xsvggt_jax.weights.params import load_params

    if min(args.sequences, args.frames, args.best, args.keyframe_every, args.pixel_stride) < 1:
        parser.error("--sequences, --frames, --best, --keyframe-every and --pixel-stride must be positive")
    if args.time_limit is not None and not args.time_limit > 0:
        parser.error("--time-limit must be a positive number of minutes")
    try:
        frames_budgets = [int(t) for t in _csv(args.frame_budgets)]
    except ValueError:
        frames_budgets = []
    if not frames_budgets or min(frames_budgets) < 1:
        parser.error(f"--frame-budgets must be positive integers, got {args.frame_budgets!r}")
    pols = _csv(args.policies) if args.policies else policies()
    if not pols or any(p not in policies() for p in pols):
        parser.error(f"--policies must name policies of the registry ({', '.join(policies())}), got {args.policies!r}")
    widths = _csv(args.widths)
    if any(w not in CODE_WIDTHS for w in widths):
        parser.error(f"--widths must be among {', '.join(CODE_WIDTHS)}, got {args.widths!r}")
    orders = _csv(args.orders)
    if not orders or any(o not in ORDERS for o in orders):
        parser.error(f"--orders must be among {', '.join(ORDERS)}, got {args.orders!r}")
    notes = []
    if "once" in orders and not has_quant_once():
        orders.remove("once")
        notes.append("Quantize-once not measured: this CacheConfig has no `quant_once` field (the axis was skipped).")
    orders = orders or ["upstream"]
    pairs = [t.partition("=") for t in _csv(args.weight_params)]
    if any(not eq or not label or not d or label == FLOAT for label, eq, d in pairs) or len({l for l, _, _ in pairs}) < len(pairs):
        parser.error(f"--weight-params must be distinct LABEL=DIR items (LABEL not {FLOAT!r}), got {args.weight_params!r}")
    formats = [f for f in _csv(args.weights) if f != FLOAT]
    wquant = None
    if formats:
        try:
            wquant = importlib.import_module("xsvggt_jax.weights.quant")
        except ImportError:
            notes.append(f"Low-bit weights ({', '.join(formats)}) not measured: this tree has no `weights.quant` "
                         "(the axis was skipped).")
            formats = []
    if any(f in {label for label, _, _ in pairs} for f in formats):
        parser.error("--weight-params labels must differ from the --weights formats")
    try:
        if args.params is not None:
            if args.size is None:
                parser.error("--params needs --size (the frame size the model was trained at)")
            params, cfg = load_params(args.params)
            label = str(args.params)
        else:
            params, cfg = pretrained.load(args.model)
            label = f"pretrained:{args.model}"
        hw = tuple(pretrained.card(args.model)["frame_size"]) if args.size is None else parse_size(args.size)
        check_frame_size(cfg, *hw)
        weights = {FLOAT: params}
        for f in formats:  # converted once, in memory, as `--weights` converts them
            weights[f] = wquant.quantize_params(jax.device_get(params), f)
        for name, _, d in pairs:
            wp, wcfg = load_params(d)
            if wcfg.architecture() != cfg.architecture():
                parser.error(f"--weight-params {name}={d}: another architecture than the model's")
            weights[name] = wp
    except ValueError as e:  # ParamsError, PretrainedError, ConfigError (frame size)
        parser.error(str(e))
    extra = _csv(args.extra)
    for name in extra:
        setting, w = split_name(name)
        try:
            quality.study_setting(setting)
        except ValueError as e:
            parser.error(f"--extra {name!r}: {e}")
        if w not in weights:
            parser.error(f"--extra {name!r}: no weight variant {w!r} (have {', '.join(weights)})")
    tpf = cfg.tokens_per_frame(*hw)
    sources = {FLOAT: label, **{f: f"{label} quantized in memory (weights.quant {f})" for f in formats},
               **{name: d for name, _, d in pairs}}
    return Plan(params, cfg, label, hw, [k * tpf for k in frames_budgets], pols, widths, orders, weights, sources,
                notes, extra)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        result["answers"] = answers(result["records"])  # the analysis of this code, on the stored records
    else:
        result = study(args, check_args(parser, args))
    if not args.no_plot:
        plot(result, args.png)
    text = report(result)
    print(text)
    if args.update_readme:
        update_readme(args.update_readme, text, START, END)
    return result


def _same_run(old: dict, new: dict) -> bool:
    keys = ("params", "frame", "frames", "sequences", "seed", "keyframe_every", "pixel_stride")
    return all(old.get(k) == new.get(k) for k in keys)


def study(args: argparse.Namespace, plan: Plan) -> dict:
    """Run the staged grid as `main`'s arguments say; writes the JSON after every setting."""
    import jax

    from xsvggt_jax.cache.core import tree_bytes
    from xsvggt_jax.eval.runner import finite_or_none
    from xsvggt_jax.io.fsutil import atomic_write_json
    from xsvggt_jax.runtime import configure_compile_cache

    configure_compile_cache(not args.no_compile_cache)
    t0 = time.perf_counter()
    sequences = quality.held_out_sequences(args.sequences, args.frames, plan.hw)
    weights = {k: jax.device_put(v) for k, v in plan.weights.items()}  # committed: one compile per setting
    weight_bytes = {k: tree_bytes(v) for k, v in weights.items()}
    result: dict[str, Any] = {
        "schema": SCHEMA, "params": plan.label, "model": plan.cfg.to_dict(), "frame": list(plan.hw),
        "tokens_per_frame": plan.cfg.tokens_per_frame(*plan.hw), "frames": args.frames, "sequences": list(sequences),
        "seed": quality.HELD_OUT_SEED, "keyframe_every": args.keyframe_every, "pixel_stride": args.pixel_stride,
        "budgets": plan.budgets, "policies": plan.policies, "widths": plan.widths, "orders": plan.orders,
        "weights": {k: {"bytes": weight_bytes[k], "source": plan.sources[k]} for k in weights},
        "best": args.best, "notes": plan.notes, "quant_once_available": has_quant_once(),
        "backend": jax.default_backend(), "jax_version": jax.__version__, "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "load_avg_before": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "records": {}, "answers": [], "wall_s": 0.0, "wall_s_before_resume": 0.0,
    }
    records: dict[str, dict] = {}
    if args.resume and args.json.exists():
        old = json.loads(args.json.read_text())
        if _same_run(old, result):
            records = {n: r for n, r in old["records"].items() if n != REFERENCE}
            for key in ("budgets", "policies", "widths", "orders"):  # the report covers both runs
                result[key] = list(dict.fromkeys([*old.get(key, []), *result[key]]))
            # the notes say which axes this tree cannot run: an earlier run's "not measured" is stale
            # once this one measures it, so they are this run's (plan.notes)
            result["budgets"].sort()
            result["weights"] = {**old.get("weights", {}), **result["weights"]}
            result["wall_s_before_resume"] = old.get("wall_s", 0.0)  # which counts the runs before it
            log.info("resuming %s: %d records kept", args.json, len(records))
        else:
            log.warning("%s is another run (model, frames or sequences differ): starting afresh", args.json)

    def save(complete: bool = False) -> None:
        result.update(records=records, answers=answers(records), complete=complete,
                      wall_s=time.perf_counter() - t0 + result["wall_s_before_resume"])
        atomic_write_json(args.json, finite_or_none(result))

    refs: dict[str, dict] = {}
    deadline = None if args.time_limit is None else t0 + 60 * args.time_limit

    def run(names: Sequence[str]) -> bool:
        for name in names:
            if name in records and name != REFERENCE:
                continue
            if deadline is not None and time.perf_counter() > deadline and name != REFERENCE:
                log.warning("time limit reached: %s and later settings not run", name)
                return False
            setting, w = split_name(name)
            rec = stream_record(weights[w], plan.cfg, quality.study_setting(setting), sequences, refs,
                                args.keyframe_every, args.pixel_stride, weight_bytes[w])
            records[name] = rec
            log.info("%s: %d + %d B, %s", name, rec["weight_bytes"], rec["cache_bytes"],
                     {k: round(v, 4) for k, v in rec["metrics"].items() if k in quality.COMPARED})
            save()
        return True

    done = run(plan_stage1(plan.budgets, plan.policies))
    if done and args.stages == 2:
        done = run(plan_stage2(records, plan.budgets, plan.policies, args.best, plan.widths, plan.orders,
                               [w for w in weights if w != FLOAT]))
    if done and plan.extra:
        done = run(plan.extra)
    result["load_avg_after"] = os.getloadavg()[0]
    save(complete=done)
    log.info("wrote %s", args.json)
    return json.loads(json.dumps(finite_or_none(result)))


if __name__ == "__main__":
    main()
