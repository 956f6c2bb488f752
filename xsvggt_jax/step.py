"""The streaming hot path: a pure `step(params, cache, frame) -> (cache, outputs)` and its drivers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .cache import CacheConfig, CacheWriter, StreamCache
from .config import ModelConfig, check_frame_size
from .model import StreamVGGT

Array = jax.Array


class CacheUpdate:
    """One step's cache bookkeeping: the KV writers the model's hooks use, the special-token slot,
    and `finish`, which assembles the next cache once the model has run."""

    def __init__(self, cfg: ModelConfig, cache_cfg: CacheConfig, cache: StreamCache):
        self.cache = cache
        self.rng, key = jax.random.split(cache.rng)
        self.glob = CacheWriter(cache.global_kv, cache.global_len, cache_cfg, cfg.num_special_tokens,
                                jax.random.fold_in(key, 0))
        self.cam = CacheWriter(cache.camera_kv, cache.camera_len, cache_cfg, cfg.num_special_tokens,
                               jax.random.fold_in(key, 1))
        self.slot = jnp.minimum(cache.frame_index, 1).reshape(1)  # frame 0 uses special-token slot 0

    def finish(self, track_points: Array) -> StreamCache:
        return StreamCache(
            global_kv=tuple(self.glob.layers), camera_kv=tuple(self.cam.layers),
            global_len=self.glob.lengths[0], camera_len=self.cam.lengths[0],
            frame_index=self.cache.frame_index + 1, track_points=track_points, rng=self.rng)


def step(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, cache: StreamCache,
         frame: Array) -> tuple[StreamCache, dict]:
    """Process one frame of a stream.

    frame: [B, H, W, 3] float in [0, 1] (NHWC). Returns the updated cache and the outputs for this
    frame (upstream names, batch first, no frame axis). Tracks are produced when the cache holds
    query points (N > 0): frame t is queried with frame t-1's tracks, as upstream chains them.
    Pure: jit it (see `make_step`); the counters are arrays, so it traces once per stream shape.
    """
    check_frame_size(cfg, *frame.shape[1:3])
    update = CacheUpdate(cfg, cache_cfg, cache)
    queries = cache.track_points if cache.track_points.shape[1] > 0 else None
    out = StreamVGGT(cfg).apply({"params": params}, frame[:, None], update.slot, update.glob.hook,
                                update.cam.hook, queries, method=StreamVGGT.stream_frame)
    out = {k: v[:, 0] for k, v in out.items()}
    return update.finish(out["track"] if queries is not None else cache.track_points), out


def make_step(cfg: ModelConfig, cache_cfg: CacheConfig):
    """`step(params, cache, frame)` jitted for the configuration, with the cache donated."""
    return jax.jit(functools.partial(step, cfg, cache_cfg), donate_argnums=(1,))


def run_stream(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, cache: StreamCache,
               frames: Array) -> tuple[StreamCache, dict]:
    """All frames [S, B, H, W, 3] through `step` inside one `lax.scan` (one compile). Outputs are
    stacked on a leading frame axis: [S, B, ...]."""
    return jax.lax.scan(lambda c, f: step(cfg, cache_cfg, params, c, f), cache, frames)
