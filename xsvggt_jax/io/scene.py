"""The outputs of one reconstructed scene: the exports (`io.outputs`), stream.png and report.json,
written into a staging directory. `xsvggt reconstruct`, `xsvggt demo` and `xsvggt reconstruct-many`
write every scene through `write_scene`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.io.frames import FrameSource
from xsvggt_jax.io.fsutil import PRODUCER, atomic_write_json
from xsvggt_jax.io.outputs import ExportOptions, write_outputs
from xsvggt_jax.io.plots import plot_offline, plot_stream
from xsvggt_jax.runtime import device_peak_bytes, peak_rss_bytes
from xsvggt_jax.stream.result import Reconstruction

REPORT = "report.json"


def write_scene(tmp: Path, result: Reconstruction, source: FrameSource, options: ExportOptions, cfg: ModelConfig,
                note: Optional[str] = None, weights: Optional[dict] = None) -> dict:
    """Write `result`'s exports (predictions.npz, points.ply, trajectory.txt, colmap/, depth/: see
    `io.outputs`), stream.png and report.json into the staging directory `tmp`; report.json last.
    source: the scene's frames (its name and size are reported); cfg: the model that ran (which published
    model, `config.MODELS`, its dtype and precision are reported); note: a line added to the report; weights: the record of the weights
    that ran (`weights.quant.describe`: format, groups, bytes), reported as "weights". Returns the report."""
    s, hw = source.num_frames, (source.height, source.width)
    exports = write_outputs(tmp, result.predictions, result.rgb, source, options)
    if result.offline:
        plot_offline(tmp / "stream.png", result.compile_seconds, result.total_seconds, s, peak_rss_bytes())
    else:
        plot_stream(tmp / "stream.png", np.asarray(result.latency_s), allocated_bytes=np.asarray(result.cache_bytes),
                    filled_bytes=None if result.filled_bytes is None else np.asarray(result.filled_bytes))
    details = {}
    if result.offline:
        details = {"attention": result.attention, "devices": result.devices}
    elif result.filled_bytes is not None:
        details = {"cache_filled_bytes_per_frame": [int(x) for x in result.filled_bytes]}
    cache = None if result.cache_config is None else dataclasses.asdict(result.cache_config)
    report = {
        "producer": PRODUCER, "mode": result.mode, "input": source.name, "frames": s,
        "height": hw[0], "width": hw[1], "num_queries": result.queries,
        **{k: float(v) for k, v in result.timing.items()}, **result.cache_info,
        "cache": cache, "latency_s": [float(x) for x in result.latency_s],
        "cache_bytes_per_frame": [int(x) for x in result.cache_bytes], "peak_memory_bytes": peak_rss_bytes(),
        "backend": jax.default_backend(), "device": str(jax.devices()[0]), "jax_version": jax.__version__,
        "device_kind": jax.devices()[0].device_kind, "device_peak_bytes": device_peak_bytes(),
        "model": cfg.model, "dtype": cfg.dtype, "compute_dtype": cfg.compute_dtypes(), "precision": cfg.precision,
        **({"weights": weights} if weights is not None else {}), **exports, **details,
        **({"note": note} if note else {}),
    }
    atomic_write_json(tmp / REPORT, report)
    return report
