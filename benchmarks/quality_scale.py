"""Quality per device byte at a realistic scale: every cache policy, code width, quantization order and
weight precision of a model trained on 8-frame clips of 108-patch frames, on >= 200-frame streams.

    PYTHONPATH=. python -m benchmarks.quality_scale --update-readme                  # the shipped stream8 model
    PYTHONPATH=. python -m benchmarks.quality_scale --resume --update-readme     # add rows (new policies, ...)
    PYTHONPATH=. python -m benchmarks.quality_scale --from-json benchmarks/results/quality_scale.json --update-readme

The staged grid (`plan_stage1`, `plan_stage2`), at budgets of 1, 2, 4 and 8 frames' tokens
(`--frame-budgets`; tokens per frame = patches + special tokens at the model's frame size):
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
their codes and scales, which the step decodes at use); total device
bytes = weights + cache. The answer (`leanest`): per tolerance (1%, 5%) the setting of least total
bytes whose AbsRel and ATE vs the ground truth are at most (1 + tol) x the uncompressed run's, and,
stricter, whose deviation from the uncompressed run is within tol (AbsRel vs none <= tol, ATE vs
none <= tol x the uncompressed run's ATE); each against XStreamVGGT's default at the same budget and
against the leanest default setting that meets the same bar.

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
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.cache.prune import POLICIES

from . import quality
from .summarize import markdown, markers, update_readme

log = logging.getLogger(__name__)

SCHEMA = 1
HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "quality_scale.json"
DEFAULT_PNG = HERE / "quality_scale.png"
START, END = markers("quality_scale")
DEFAULT_MODEL = "stream8"
REFERENCE = quality.REFERENCE
FLOAT = "float"
CODE_WIDTHS = ("int8", "int4", "int2")    # stage 2's quantized caches (KCVT, `quality.DEFAULT_FIELDS`)
ORDERS = ("upstream", "once")
TOLERANCES = (0.01, 0.05)
WEIGHT_SEP = "+w="                         # record name of a weight variant: <cache setting>+w=<label>


def has_quant_once() -> bool:
    """CacheConfig has the quantize-once field (issue 24, item 1)."""
    return "quant_once" in {f.name for f in dataclasses.fields(CacheConfig)}


def policies() -> list[str]:
    """Every pruning policy of the registry (the uncompressed `none` apart)."""
    return [name for name, fn in POLICIES.items() if fn is not None]


def setting_text(policy: str, budget: int, width: str = FLOAT, order: str = "upstream") -> str:
    """The study's setting string (`quality.study_setting` reads it)."""
    head = f"{policy}:{budget}" if width == FLOAT else f"{policy}-{width}:{budget}"
    return head + ("/quant_once=true" if order == "once" and width != FLOAT else "")


def record_name(setting: str, weights: str = FLOAT) -> str:
    return setting if weights == FLOAT else f"{setting}{WEIGHT_SEP}{weights}"


def split_name(name: str) -> tuple[str, str]:
    """record name -> (cache setting, weights label)."""
    setting, _, weights = name.partition(WEIGHT_SEP)
    return setting, weights or FLOAT


# --------------------------------------------------------------------------------------------- plan
def plan_stage1(budgets: Sequence[int], policy_names: Sequence[str]) -> list[str]:
    """Reference, then per budget (smallest first) every policy with a float cache and the default."""
    names = [REFERENCE]
    for b in budgets:
        names += [setting_text(p, b) for p in policy_names]
        names.append(quality.default_name(b))
    return list(dict.fromkeys(names))


def rank_policies(records: dict, budget: int, policy_names: Sequence[str]) -> list[str]:
    """Policies at `budget` (float cache, float weights) by fidelity to `none`: the sum of their ranks
    in AbsRel vs none and in ATE vs none (ties: fewer bytes, then name). Missing ones are left out."""
    rows = {p: records[setting_text(p, budget)] for p in policy_names if setting_text(p, budget) in records}

    def ranks(metric):
        order = sorted(rows, key=lambda p: quality._nan(rows[p]["metrics"][metric]))
        return {p: i for i, p in enumerate(order)}
    ra, rt = ranks("abs_rel_ref"), ranks("ate_ref")
    return sorted(rows, key=lambda p: (ra[p] + rt[p], rows[p]["cache_bytes"], p))


def plan_stage2(records: dict, budgets: Sequence[int], policy_names: Sequence[str], best: int,
                widths: Sequence[str], orders: Sequence[str], weights: Sequence[str]) -> list[str]:
    """Record names of stage 2 (module docstring): per budget the `best` policies across float and the
    code `widths` x `orders` x float and `weights`; `none` per weight variant first."""
    names = [record_name(REFERENCE, w) for w in weights if w != FLOAT]
    for b in budgets:
        for p in rank_policies(records, b, policy_names)[:best]:
            cache = [setting_text(p, b)] + [setting_text(p, b, c, o) for c in widths for o in orders]
            names += [record_name(s, w) for w in (FLOAT, *weights) for s in cache]
    return list(dict.fromkeys(names))


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


# ---------------------------------------------------------------------------------------- analysis
#: The answer's criteria: "gt" (AbsRel and ATE vs the ground truth within (1 + tol) x the uncompressed
#: run's), "ref" (AbsRel vs none <= tol and ATE vs none <= tol x the uncompressed run's ATE), and each
#: of the two on one metric alone ("gt:abs_rel", ...).
CRITERIA = ("gt", "gt:abs_rel", "gt:ate", "ref", "ref:abs_rel", "ref:ate")


def _ok(rec: dict, ref: dict, tol: float, kind: str) -> bool:
    base, _, only = kind.partition(":")
    m, r = rec["metrics"], ref["metrics"]
    for k in (only,) if only else ("abs_rel", "ate"):
        if base == "gt":
            value, bound = quality._nan(m[k]), (1 + tol) * r[k]
        else:
            value, bound = quality._nan(m[f"{k}_ref"]), tol * (1.0 if k == "abs_rel" else r["ate"])
        if not value <= bound:  # NaN never qualifies
            return False
    return True


def leanest(records: dict, tol: float, kind: str) -> dict:
    """The answer for one tolerance and criterion (`CRITERIA`): the qualifying setting of least total bytes (ties: cache bytes, name), XStreamVGGT's default
    at its budget, and the leanest default that qualifies (None when none does)."""
    ref = records[REFERENCE]
    ok = sorted((n for n, r in records.items() if n != REFERENCE and _ok(r, ref, tol, kind)),
                key=lambda n: (records[n]["total_bytes"], records[n]["cache_bytes"], n))
    out: dict[str, Any] = {"tolerance": tol, "criterion": kind, "qualifying": len(ok), "best": None}
    if not ok:
        return out
    best = ok[0]
    rec = records[best]
    same = quality.default_name(rec["cache_config"]["budget"])
    defaults = [n for n in ok if n == quality.default_name(records[n]["cache_config"]["budget"])]
    out.update(best=best, total_bytes=rec["total_bytes"], cache_bytes=rec["cache_bytes"],
               weight_bytes=rec["weight_bytes"], metrics={k: rec["metrics"][k] for k in quality.COMPARED},
               default_same_budget=same if same in records else None,
               default_same_budget_total=records[same]["total_bytes"] if same in records else None,
               default_same_budget_cache=records[same]["cache_bytes"] if same in records else None,
               default_same_budget_ok=same in ok,
               leanest_default=defaults[0] if defaults else None,
               leanest_default_total=records[defaults[0]]["total_bytes"] if defaults else None,
               leanest_default_cache=records[defaults[0]]["cache_bytes"] if defaults else None)
    return out


def answers(records: dict) -> list[dict]:
    if REFERENCE not in records:
        return []
    return [leanest(records, tol, kind) for kind in CRITERIA for tol in TOLERANCES]


# ------------------------------------------------------------------------------------------ report
def _kib(x: Optional[int]) -> str:
    return "-" if x is None else f"{x / 1024:,.0f}"


def settings_table(result: dict) -> str:
    """Every record by total bytes; `a` / `t` mark the AbsRel / ATE Pareto fronts (total bytes vs error
    against the ground truth), `D` XStreamVGGT's default."""
    recs = result["records"]
    names = sorted(recs, key=lambda n: (recs[n]["total_bytes"], n))
    fronts = {m: {names[i] for i in quality.pareto_front([(recs[n]["total_bytes"], quality._nan(recs[n]["metrics"][m]))
                                                            for n in names])} for m in ("abs_rel", "ate")}
    header = ("setting", "weights", "weights KiB", "cache KiB", "total KiB", "AbsRel", "δ<1.25", "ATE",
              "AbsRel vs none", "ATE vs none", "Acc vs none", "ms/frame", "front")
    body = []
    for n in names:
        r, m = recs[n], recs[n]["metrics"]
        setting, weights = split_name(n)
        mark = "".join(["D" if n == quality.default_name(r["cache_config"]["budget"]) else "",
                        "a" if n in fronts["abs_rel"] else "", "t" if n in fronts["ate"] else ""])
        body.append([f"`{setting}`", weights, _kib(r["weight_bytes"]), _kib(r["cache_bytes"]), _kib(r["total_bytes"]),
                     *(quality._fmt(m[k]) for k in ("abs_rel", "delta_1.25", "ate", "abs_rel_ref", "ate_ref", "acc_ref")),
                     f"{r['ms_per_frame']:.0f}", mark or "-"])
    return markdown(header, body)


def policy_table(result: dict) -> str:
    """Stage 1: per budget the policies (float cache) by fidelity rank, with the default beside them."""
    recs, body = result["records"], []
    for b in result["budgets"]:
        ranked = rank_policies(recs, b, result["policies"])
        for i, p in enumerate(ranked):
            r = recs[setting_text(p, b)]
            m = r["metrics"]
            body.append([str(b), str(i + 1), f"`{p}`", _kib(r["cache_bytes"]),
                         *(quality._fmt(m[k]) for k in ("abs_rel", "ate", "abs_rel_ref", "ate_ref"))])
    return markdown(("budget", "rank", "policy (float cache)", "cache KiB", "AbsRel", "ATE", "AbsRel vs none",
                     "ATE vs none"), body)


def answer_table(result: dict) -> str:
    body = []
    for a in result["answers"]:
        base, _, only = a["criterion"].partition(":")
        what = {"abs_rel": "AbsRel", "ate": "ATE", "": "AbsRel, ATE"}[only]
        of_ate = "" if only == "abs_rel" else " (ATE: of none's ATE)"
        bar = (f"{what} <= {1 + a['tolerance']:g} x none's" if base == "gt" else
               f"{what} vs none <= {a['tolerance']:.0%}{of_ate}")
        if a["best"] is None:
            body.append([bar, "none qualifies", *("-" * 6)])
            continue
        m = a["metrics"]
        ratio = lambda t, c: "-" if t is None else f"{t / a['total_bytes']:.2f}x ({c / a['cache_bytes']:.2f}x)"
        same = ("-" if a["default_same_budget"] is None else
                f"`{a['default_same_budget']}` {_kib(a['default_same_budget_total'])} ({_kib(a['default_same_budget_cache'])})"
                f"{'' if a['default_same_budget_ok'] else ', fails the bar'}")
        lean = ("no default qualifies" if a["leanest_default"] is None else
                f"`{a['leanest_default']}` {_kib(a['leanest_default_total'])} ({_kib(a['leanest_default_cache'])})")
        body.append([bar, f"`{a['best']}`", f"{_kib(a['total_bytes'])} ({_kib(a['cache_bytes'])})",
                     f"{quality._fmt(m['abs_rel'])} / {quality._fmt(m['ate'])}",
                     f"{quality._fmt(m['abs_rel_ref'])} / {quality._fmt(m['ate_ref'])}",
                     same, ratio(a["default_same_budget_total"], a["default_same_budget_cache"]),
                     f"{lean}, {ratio(a['leanest_default_total'], a['leanest_default_cache'])}"])
    return markdown(("bar", "leanest setting", "total KiB (cache)", "AbsRel / ATE", "vs none", "default at its budget: "
                     "total KiB (cache)", "default / leanest: total (cache)", "leanest qualifying default, ratio"), body)


def report(result: dict) -> str:
    ref = result["records"].get(REFERENCE, {}).get("metrics", {})
    notes = " ".join(result.get("notes", []))
    head = (f"{result['frames']} frames x {len(result['sequences'])} held-out procedural sequences at "
            f"{result['frame'][0]}x{result['frame'][1]} ({result['tokens_per_frame']} tokens a frame; budgets "
            f"{', '.join(map(str, result['budgets']))}), params `{result['params']}`, {result['backend']}; "
            f"{len(result['records'])} settings in {result['wall_s'] / 60:.0f} min"
            f"{'' if result['complete'] else ' (INCOMPLETE)'}. Uncompressed float run: AbsRel "
            f"{quality._fmt(ref.get('abs_rel'))}, ATE {quality._fmt(ref.get('ate'))}. {notes}".rstrip())
    return (f"{head}\n\nThe answer (bytes are total device bytes, weights + cache, KiB; cache in brackets):\n\n"
            f"{answer_table(result)}\n\nStage 1, the policies (float cache, ranked by fidelity to `none`):\n\n"
            f"{policy_table(result)}\n\nEvery setting by total device bytes (`a` / `t`: AbsRel / ATE Pareto "
            f"front vs the ground truth; `D`: XStreamVGGT's default):\n\n{settings_table(result)}")


def plot(result: dict, path: Path) -> None:
    """Error vs total device bytes (log): AbsRel and ATE vs the ground truth and vs the uncompressed run;
    colour = policy, marker = code width, hollow = low-bit weights; Pareto front line; defaults ringed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from xsvggt_jax.io.fsutil import atomic_write

    recs = result["records"]
    names = list(recs)
    pols = sorted({recs[n]["cache_config"]["prune"] for n in names})
    shapes = {FLOAT: "o", 8: "s", 4: "^", 2: "v"}
    fig = Figure(figsize=(12, 9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = (("abs_rel", "depth AbsRel vs GT"), ("ate", "ATE vs GT"),
              ("abs_rel_ref", "depth AbsRel vs uncompressed"), ("ate_ref", "ATE vs uncompressed"))
    for ax, (metric, title) in zip(axes.flat, panels):
        xs = [recs[n]["total_bytes"] / 2 ** 20 for n in names]
        ys = [quality._nan(recs[n]["metrics"][metric]) for n in names]
        for n, x, y in zip(names, xs, ys):
            cc = recs[n]["cache_config"]
            colour = f"C{pols.index(cc['prune']) % 10}"
            hollow = split_name(n)[1] != FLOAT
            ax.scatter(x, y, marker=shapes.get(FLOAT if cc["quant"] == "none" else cc["bits"], "x"), s=30, zorder=3,
                       facecolors="none" if hollow else colour, edgecolors=colour)
            if n == quality.default_name(cc["budget"]):
                ax.scatter(x, y, facecolors="none", edgecolors="k", s=140, lw=1.5, zorder=4)
        front = quality.pareto_front(list(zip(xs, ys)))
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="k", lw=1, alpha=0.6, zorder=2)
        for i in front:
            ax.annotate(names[i], (xs[i], ys[i]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="total device bytes: weights + cache (MiB, log)", ylabel=metric, title=title)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    handles = [axes[0, 0].scatter([], [], color=f"C{i % 10}", label=p) for i, p in enumerate(pols)]
    handles += [axes[0, 0].scatter([], [], color="grey", marker=m, label="float cache" if b == FLOAT else f"{b}-bit cache")
                for b, m in shapes.items()]
    handles.append(axes[0, 0].scatter([], [], facecolors="none", edgecolors="grey", label="low-bit weights"))
    handles.append(axes[0, 0].scatter([], [], facecolors="none", edgecolors="k", s=140, label="XStreamVGGT default"))
    axes[0, 0].legend(handles=handles, fontsize=7, ncol=2)
    fig.suptitle(f"quality per device byte: {len(result['sequences'])} x {result['frames']} frames at "
                 f"{result['frame'][0]}x{result['frame'][1]}, params {result['params']} (line: Pareto front)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


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
    p.add_argument("--time-limit", type=float, help="minutes: start no new setting after this (the JSON says INCOMPLETE)")
    p.add_argument("--keyframe-every", type=int, default=20, help="point-cloud metrics on every k-th frame (default 20)")
    p.add_argument("--pixel-stride", type=int, default=4, help="... at every s-th row and column (default 4)")
    p.add_argument("--resume", action="store_true", help="keep the records of an existing --json of the same run")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="output JSON (default results/quality_scale.json)")
    p.add_argument("--png", type=Path, default=DEFAULT_PNG, help="output plot (default benchmarks/quality_scale.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--from-json", type=Path, help="no study: report (and plot) an existing JSON")
    p.add_argument("--update-readme", nargs="?", const=HERE / "README.md", type=Path, metavar="README",
                   help="put the tables between the quality_scale markers of this README (default benchmarks/README.md)")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")
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
    tpf = cfg.tokens_per_frame(*hw)
    sources = {FLOAT: label, **{f: f"{label} quantized in memory (weights.quant {f})" for f in formats},
               **{name: d for name, _, d in pairs}}
    return Plan(params, cfg, label, hw, [k * tpf for k in frames_budgets], pols, widths, orders, weights, sources,
                notes)


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
            for key in ("budgets", "policies", "widths", "orders", "notes"):  # the report covers both runs
                result[key] = list(dict.fromkeys([*old.get(key, []), *result[key]]))
            result["budgets"].sort()
            result["weights"] = {**old.get("weights", {}), **result["weights"]}
            result["wall_s_before_resume"] = old.get("wall_s", 0.0) + old.get("wall_s_before_resume", 0.0)
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
    result["load_avg_after"] = os.getloadavg()[0]
    save(complete=done)
    log.info("wrote %s", args.json)
    return json.loads(json.dumps(finite_or_none(result)))


if __name__ == "__main__":
    main()
