"""The streaming hot path: a pure `step(params, cache, frame) -> (cache, outputs)` and its drivers."""

from __future__ import annotations

import functools
import logging
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .cache import AppendWriter, StreamCache
from .config import ModelConfig, check_frame_size
from .model import StreamVGGT

Array = jax.Array
log = logging.getLogger(__name__)


def step(cfg: ModelConfig, params: dict, cache: StreamCache, frame: Array) -> tuple[StreamCache, dict]:
    """Process one frame of a stream.

    frame: [B, H, W, 3] float in [0, 1] (NHWC). Returns the updated cache and the outputs for this
    frame (upstream names, batch first, no frame axis). Tracks are produced when the cache holds
    query points (N > 0): frame t is queried with frame t-1's tracks, as upstream chains them.
    Pure: jit it (see `make_step`); the counters are arrays, so it traces once per stream shape.
    """
    h, w = frame.shape[1:3]
    check_frame_size(cfg, h, w)
    p = cfg.tokens_per_frame(h, w)
    model = StreamVGGT(cfg)
    glob = AppendWriter(cache.global_kv, cache.global_len)
    cam = AppendWriter(cache.camera_kv, cache.camera_len)
    slot = jnp.minimum(cache.frame_index, 1).reshape(1)
    queries = cache.track_points if cache.track_points.shape[1] > 0 else None
    out = model.apply({"params": params}, frame[:, None], slot, glob.hook, cam.hook, queries,
                      method=StreamVGGT.stream_frame)
    out = {k: v[:, 0] for k, v in out.items()}
    new_cache = StreamCache(
        global_kv=tuple(glob.layers), camera_kv=tuple(cam.layers),
        global_len=cache.global_len + p,
        camera_len=cache.camera_len + cfg.camera.iterations,
        frame_index=cache.frame_index + 1,
        track_points=out["track"] if queries is not None else cache.track_points,
    )
    return new_cache, out


def make_step(cfg: ModelConfig):
    """`step` jitted for `cfg`, with the cache donated (updated in place on the device)."""
    return jax.jit(functools.partial(step, cfg), donate_argnums=(1,))


def stream(cfg: ModelConfig, params: dict, cache: StreamCache, frames: Iterable[Array],
           step_fn=None) -> Iterator[dict]:
    """Feed frames ([B, H, W, 3] each) through `step`, yielding each frame's outputs (device arrays).

    Refuses to run past the cache's capacity (the uncompressed cache has a fixed frame budget).
    """
    step_fn = step_fn or make_step(cfg)
    max_frames = cache.camera_capacity // cfg.camera.iterations
    done = int(cache.frame_index)
    for frame in frames:
        if done >= max_frames:
            raise ValueError(f"stream longer than the cache capacity of {max_frames} frames")
        cache, out = step_fn(params, cache, jnp.asarray(frame))
        done += 1
        yield out
    stream.last_cache = cache  # type: ignore[attr-defined]


def run_stream(cfg: ModelConfig, params: dict, cache: StreamCache, frames: Array) -> tuple[StreamCache, dict]:
    """All frames [S, B, H, W, 3] through `step` inside one `lax.scan` (one compile). Outputs are
    stacked on a leading frame axis: [S, B, ...]."""
    return jax.lax.scan(lambda c, f: step(cfg, params, c, f), cache, frames)
