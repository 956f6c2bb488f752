"""`Reconstruction`: what a streamed or offline run of one scene produced, the one result that
`pipeline.stream_frames`, `offline.run_offline` and `reconstruct-many`'s writer hand to the scene
writer (`io.scene.write_scene`)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from xsvggt_jax.cache.core import CacheConfig


def stream_timing(latency: Sequence[float]) -> dict:
    """report.json's timing of a stream from its per-frame latencies (the first includes compilation):
    compile_seconds, seconds_per_frame (median after the first frame), total_seconds."""
    return {"compile_seconds": float(latency[0]),
            "seconds_per_frame": float(np.median(latency[1:])) if len(latency) > 1 else float(latency[0]),
            "total_seconds": float(sum(latency))}


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: identity equality
class Reconstruction:
    """One scene's predictions and what it cost.

    mode: "stream", "offline_causal" or "offline_full". predictions: name -> [S, ...] float32 (memory
    maps when streamed); rgb: [S, H, W, 3] uint8 frame colours; queries: query points tracked (0: no
    tracks). Per frame: latency_s (streamed: device-synchronised, the first includes compilation;
    offline: the forward's seconds per frame), cache_bytes (allocated; 0 offline), filled_bytes (the
    share of the cache in use; None where not measured). cache_info: `cache_report` of the cache
    ({"cache_bytes": 0} offline); cache_config: the stream's (None offline). compile_seconds /
    seconds_per_frame / total_seconds: report.json's timing. attention, devices: the offline global
    attention implementation that ran and the devices the frames were sharded over (None streamed).
    """

    mode: str
    predictions: dict
    rgb: np.ndarray
    queries: int
    latency_s: tuple[float, ...]
    cache_bytes: tuple[int, ...]
    cache_info: dict
    compile_seconds: float
    seconds_per_frame: float
    total_seconds: float
    cache_config: Optional[CacheConfig] = None
    filled_bytes: Optional[tuple[int, ...]] = None
    attention: Optional[str] = None
    devices: Optional[int] = None

    @classmethod
    def streamed(cls, predictions: dict, rgb: np.ndarray, queries: int, latency_s: Sequence[float],
                 cache_info: dict, cache_config: CacheConfig,
                 filled_bytes: Optional[Sequence[int]] = None,
                 cache_bytes: Optional[Sequence[int]] = None) -> "Reconstruction":
        """A stream's result, its timing from `latency_s` (`stream_timing`); cache_bytes: per frame
        (default: cache_info's allocation every frame, as fixed shapes have)."""
        nbytes = [cache_info["cache_bytes"]] * len(latency_s) if cache_bytes is None else cache_bytes
        return cls("stream", predictions, rgb, queries, tuple(latency_s), tuple(nbytes), cache_info,
                   **stream_timing(latency_s), cache_config=cache_config,
                   filled_bytes=None if filled_bytes is None else tuple(filled_bytes))

    @property
    def frames(self) -> int:
        return len(self.rgb)

    @property
    def offline(self) -> bool:
        return self.mode != "stream"

    @property
    def timing(self) -> dict:
        """compile_seconds, seconds_per_frame, total_seconds (report.json's order)."""
        return {"compile_seconds": self.compile_seconds, "seconds_per_frame": self.seconds_per_frame,
                "total_seconds": self.total_seconds}
