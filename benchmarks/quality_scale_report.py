"""Tables and plot of `benchmarks.quality_scale` (its JSON -> markdown, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import quality
from .quality_scale_grid import FLOAT, REFERENCE, rank_policies, setting_text, split_name
from .summarize import markdown

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
