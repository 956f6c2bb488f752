"""Written results of an evaluation: `results.json`, `results.md` and `accuracy_vs_bytes.png`.

`write_report(results, directory)` writes the three files atomically (each under a temporary name,
renamed when complete); `xsvggt eval` calls it inside a staged output directory.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Optional

import numpy as np

from xsvggt_jax.io.fsutil import atomic_write_text
from xsvggt_jax.io.plots import _figure, _save
from xsvggt_jax.eval.runner import TASKS, EvalResults, finite_or_none

PRODUCER = "xsvggt-jax"  # results.json["producer"]: an output directory `xsvggt eval` may replace
KIND = "eval"
MB = 1e6


def _versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist in ("xsvggt-jax", "jax", "jaxlib", "flax", "numpy", "scipy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def results_json(results: EvalResults, extra: Optional[dict] = None) -> dict:
    """The JSON document of `results` (non-finite numbers become null). extra: more top-level keys
    (the CLI adds the command line and notes)."""
    import jax

    task = TASKS[results.task]
    doc = {
        "producer": PRODUCER, "kind": KIND, "task": results.task, "dataset": results.dataset,
        "primary_metric": task.primary, "lower_is_better": task.lower_is_better, "metrics": list(task.columns),
        "resize": results.resize, "frame_size": results.frame_size,
        "sequences": {name: {"frames": results.frames[name], "height": hw[0], "width": hw[1]}
                      for name, hw in results.frame_hw.items()},
        "model": results.model, "protocol": results.protocol, "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "versions": _versions(),
        "settings": [{
            "name": r.setting.name, "cache": None if r.setting.cache is None else dataclasses.asdict(r.setting.cache),
            "offline": r.setting.offline, "aggregate": r.aggregate,
            "cache_bytes": r.cache.get("cache_bytes"), "cache_report": r.cache, "ms_per_frame": r.ms_per_frame,
            "peak_rss_bytes": r.peak_rss_bytes, "device_peak_bytes": r.device_peak_bytes,
            "sequences": r.sequences,
        } for r in results.settings],
        **(extra or {}),
    }
    return finite_or_none(doc)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _ms(value: float) -> str:
    return f"{value:.1f}" if np.isfinite(value) else "n/a"


def _protocol_line(results: EvalResults) -> str:
    """The protocol's choices that differ by model (`settings.PROTOCOLS`), as a sentence."""
    p, model = results.protocol, results.model.get("model", "streamvggt")
    if not p:
        return ""
    points = "the point map" if p["points"] == "pointmap" else "depth unprojected with the predicted cameras"
    pairs = "pooled over all sequences" if p["pose_pairs"] == "pooled" else "scored per sequence"
    return f" Protocol of {model}: recon scores {points}; pose pairs {pairs}."


def results_markdown(results: EvalResults, note: Optional[str] = None) -> str:
    """A Markdown table: one row per setting with the task's metrics, cache MB (1e6 bytes), ms/frame
    and the process's peak RSS."""
    task = TASKS[results.task]
    head = ["setting", *task.columns, "cache MB", "ms/frame", "peak RSS MB"]
    rows = [[f"`{r.setting.name}`", *(_cell(r.aggregate.get(c)) for c in task.columns),
             f"{r.cache.get('cache_bytes', 0) / MB:.3f}", _ms(r.ms_per_frame), f"{r.peak_rss_bytes / MB:.0f}"]
            for r in results.settings]
    seqs = len(results.frames)
    lines = [
        f"# xsvggt eval: {results.task} on {results.dataset}",
        "",
        f"{seqs} sequence{'s' * (seqs != 1)}, {sum(results.frames.values())} frames, resize {results.resize} "
        f"to {results.frame_size} px wide. Metrics: aggregate over sequences "
        f"({'lower' if task.lower_is_better else 'higher'} {task.primary} is better). ms/frame: median after "
        "each sequence's first frame (n/a: no sequence has a second frame). Peak RSS: the process's "
        "high-water mark after the setting ran." + _protocol_line(results),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    if note:
        lines += [f"**Note:** {note}", ""]
    return "\n".join(lines)


def accuracy_bytes_figure(results: EvalResults):
    """The task's primary metric against cache bytes (MB), one labelled point per setting."""
    task = TASKS[results.task]
    fig = _figure((7, 5))
    ax = fig.subplots()
    for r in results.settings:
        x, y = r.cache.get("cache_bytes", 0) / MB, r.aggregate.get(task.primary, float("nan"))
        ax.plot([x], [y], "o")
        ax.annotate(r.setting.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("cache (MB)")
    ax.set_ylabel(f"{task.primary} ({'lower' if task.lower_is_better else 'higher'} is better)")
    ax.set_title(f"{results.task} on {results.dataset}: accuracy vs cache bytes")
    ax.grid(True, alpha=0.3)
    return fig


def write_report(results: EvalResults, directory: str | Path, extra: Optional[dict] = None,
                 note: Optional[str] = None) -> dict[str, Path]:
    """Write results.json, results.md and accuracy_vs_bytes.png into `directory`; returns their paths."""
    directory = Path(directory)
    paths = {"json": directory / "results.json", "markdown": directory / "results.md",
             "plot": directory / "accuracy_vs_bytes.png"}
    doc = results_json(results, {**(extra or {}), **({"note": note} if note else {})})
    atomic_write_text(paths["json"], json.dumps(doc, indent=1, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], results_markdown(results, note))
    _save(accuracy_bytes_figure(results), paths["plot"])
    return paths


__all__ = ["KIND", "PRODUCER", "accuracy_bytes_figure", "results_json", "results_markdown", "write_report"]
