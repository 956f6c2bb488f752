"""Run plots: `stream.png` for a streamed reconstruction, an offline summary for `--offline`.

Figures are built with `matplotlib.figure.Figure` on an explicit Agg canvas, so they work headless
and leave pyplot's global backend (and the caller's open figures) alone. The `*_figure` builders
return the figure (tests inspect its axes); `plot_*` write it atomically as PNG.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from xsvggt_jax.io.exports import PathLike
from xsvggt_jax.io.fsutil import atomic_write

log = logging.getLogger(__name__)

MB = 1e6


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def stream_figure(latency_s: np.ndarray, allocated_bytes: np.ndarray | float,
                  filled_bytes: np.ndarray | None = None):
    """Two panels over frame index.

    Latency (ms) of frames 1.. only: frame 0 includes the compilation, which would flatten every
    other frame, so it is given in the panel's title instead. Cache (MB, 1e6 B): the bytes filled
    by each frame's cache (`filled_bytes`, [S]) against the allocation (`allocated_bytes`, a scalar
    or [S], drawn dashed); with `filled_bytes=None` only the allocation is drawn."""
    lat = np.asarray(latency_s, np.float64).reshape(-1) * 1e3
    s = len(lat)
    if s == 0:
        raise ValueError("no frames to plot")
    alloc = np.broadcast_to(np.asarray(allocated_bytes, np.float64), (s,)) / MB
    filled = None if filled_bytes is None else np.asarray(filled_bytes, np.float64).reshape(-1) / MB
    if filled is not None and filled.shape != (s,):
        raise ValueError(f"latency has {s} frames, filled_bytes {filled.shape}")
    frames = np.arange(s)

    fig = _figure((8, 6))
    ax_l, ax_c = fig.subplots(2, 1, sharex=True)
    if s > 1:
        ax_l.plot(frames[1:], lat[1:], marker=".", lw=1)
        ax_l.set_ylim(0, float(lat[1:].max()) * 1.1 or 1.0)
        ax_l.set_title(f"per-frame latency (frame 0 with compilation: {lat[0] / 1e3:.2f} s, not drawn)")
    else:
        ax_l.set_title(f"per-frame latency: a single frame, {lat[0] / 1e3:.2f} s with compilation")
    ax_l.set_ylabel("latency (ms)")
    ax_l.grid(alpha=0.3)
    ax_c.plot(frames, alloc, ls="--", color="tab:gray", label="allocated")
    if filled is not None:
        ax_c.plot(frames, filled, marker=".", lw=1, color="tab:orange", label="filled")
    ax_c.set_ylim(0, max(float(alloc.max()), float(filled.max()) if filled is not None else 0.0) * 1.1 or 1.0)
    ax_c.set_ylabel("cache (MB)")
    ax_c.set_xlabel("frame")
    ax_c.set_title("KV cache")
    ax_c.legend(loc="lower right")
    ax_c.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_stream(path: PathLike, latency_s: np.ndarray, allocated_bytes: np.ndarray | float,
                filled_bytes: np.ndarray | None = None) -> Path:
    """Write `stream_figure(...)` as PNG to `path` (800 x 600 px)."""
    out = _save(stream_figure(latency_s, allocated_bytes, filled_bytes), path)
    log.info("wrote stream plot (%d frames) to %s", len(np.reshape(latency_s, -1)), out)
    return out


def offline_figure(compile_s: float, run_s: float, frames: int, peak_memory_bytes: int):
    """One panel for an offline (batch) run, which has no per-frame latency and no cache: the
    compile and forward times as bars, titled with seconds per frame and the peak memory."""
    fig = _figure((6, 3.5))
    ax = fig.subplots()
    bars = ax.barh(["compile", "forward"], [compile_s, run_s], color=["tab:gray", "tab:blue"])
    ax.bar_label(bars, fmt="%.2f s", padding=3)
    ax.set_xlim(0, max(compile_s, run_s, 1e-9) * 1.3)
    ax.set_xlabel("seconds")
    ax.set_title(f"offline run: {frames} frames, {run_s / max(frames, 1):.3f} s/frame, "
                 f"peak memory {peak_memory_bytes / MB:.0f} MB")
    fig.tight_layout()
    return fig


def plot_offline(path: PathLike, compile_s: float, run_s: float, frames: int, peak_memory_bytes: int) -> Path:
    """Write `offline_figure(...)` as PNG to `path` (600 x 350 px)."""
    out = _save(offline_figure(compile_s, run_s, frames, peak_memory_bytes), path)
    log.info("wrote offline run plot to %s", out)
    return out
