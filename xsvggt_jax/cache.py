"""The streaming KV cache: an immutable, fixed-shape pytree updated once per frame.

This version holds the uncompressed cache: every token of every frame up to a capacity fixed at
construction (`max_frames`), so `step` compiles once for the whole stream. Slots past the fill
level are masked out of attention.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from .config import ModelConfig
from .layers import KVHook

Array = jax.Array


@flax.struct.dataclass
class LayerKV:
    """Keys/values of one attention layer.

    k: [B, H, T, D] compute dtype; keys after q/k-norm and RoPE (what attention consumes).
    v: [B, H, T, D] compute dtype.
    """

    k: Array
    v: Array


@flax.struct.dataclass
class StreamCache:
    """Everything a stream carries from one frame to the next.

    global_kv:   tuple of `depth` LayerKV, T = global capacity (max_frames * tokens per frame).
    camera_kv:   tuple of `camera.trunk_depth` LayerKV, T = max_frames * camera iterations.
    global_len:  int32 [] valid tokens in every global_kv layer.
    camera_len:  int32 [] valid tokens in every camera_kv layer.
    frame_index: int32 [] frames processed so far.
    track_points: float32 [B, N, 2] query points for the next frame (the last frame's tracks); N may be 0.
    """

    global_kv: tuple
    camera_kv: tuple
    global_len: Array
    camera_len: Array
    frame_index: Array
    track_points: Array

    @property
    def global_capacity(self) -> int:
        return self.global_kv[0].k.shape[2]

    @property
    def camera_capacity(self) -> int:
        return self.camera_kv[0].k.shape[2]


def init_cache(cfg: ModelConfig, batch: int, frame_hw: tuple[int, int], max_frames: int,
               query_points: Array | None = None) -> StreamCache:
    """Empty cache for streams of up to `max_frames` frames of size frame_hw = (H, W)."""
    p = cfg.tokens_per_frame(*frame_hw)
    dt = cfg.jnp_dtype

    def layers(n, heads, tokens, hd):
        # distinct buffers per leaf: the cache is donated to `step`
        shape = (batch, heads, tokens, hd)
        return tuple(LayerKV(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(n))

    cam_dim = 2 * cfg.embed_dim
    if query_points is None:
        query_points = jnp.zeros((batch, 0, 2), jnp.float32)
    return StreamCache(
        global_kv=layers(cfg.depth, cfg.num_heads, max_frames * p, cfg.head_dim),
        camera_kv=layers(cfg.camera.trunk_depth, cfg.camera.num_heads, max_frames * cfg.camera.iterations,
                         cam_dim // cfg.camera.num_heads),
        global_len=jnp.zeros((), jnp.int32),
        camera_len=jnp.zeros((), jnp.int32),
        frame_index=jnp.zeros((), jnp.int32),
        track_points=jnp.asarray(query_points, jnp.float32).reshape(batch, -1, 2),
    )


class AppendWriter:
    """Builds KV hooks that append the current tokens to fixed-capacity layer caches.

    Used inside one traced step: each hook call writes (k, v) at the layer's fill level and returns
    the whole buffer with a mask hiding unused slots. Collect the result with `.layers` / `.lengths`.
    """

    def __init__(self, layers: tuple, length: Array):
        self.layers = list(layers)
        self.lengths = [length] * len(layers)

    def hook(self, i: int) -> KVHook:
        def fn(q, k, v):
            kv, start = self.layers[i], self.lengths[i]
            new_k = jax.lax.dynamic_update_slice_in_dim(kv.k, k.astype(kv.k.dtype), start, axis=2)
            new_v = jax.lax.dynamic_update_slice_in_dim(kv.v, v.astype(kv.v.dtype), start, axis=2)
            end = start + k.shape[2]
            bias = jnp.where(jnp.arange(kv.k.shape[2]) < end, 0.0, -jnp.inf).astype(jnp.float32)
            self.layers[i], self.lengths[i] = LayerKV(new_k, new_v), end
            return new_k, new_v, bias, None
        return fn


def cache_bytes(cache: StreamCache) -> int:
    """Bytes of every array in the cache."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
