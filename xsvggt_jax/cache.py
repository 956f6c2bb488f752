"""The streaming KV cache: an immutable, fixed-shape pytree updated once per frame.

Every array has a shape fixed by the configuration, so `step` compiles once for a whole stream:

* `prune="none"`: every token of every frame, up to `max_frames` (the uncompressed cache);
* a pruning policy (`xstream`, `sliding`, `random`): a budget of `keep` tokens per layer plus room
  for the current frame. Each step appends the frame, attends over [past; current], then prunes back
  to the budget (XStreamVGGT's order).

Slots past a layer's fill level are masked out of attention.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from .config import ModelConfig
from .layers import KVHook
from .prune import POLICIES, PruneContext


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """How the streaming cache is kept.

    prune:  "none" | "xstream" | "sliding" | "random" (see `xsvggt_jax.prune`).
    budget: tokens kept per attention layer when pruning (upstream KV_CACHE_SIZE; the same budget
            applies to the camera-trunk cache, which gains camera.iterations tokens a frame).
    pool:   query pooling group size of the xstream score (upstream KV_POOL_SIZE).
    seed:   seed of the `random` policy's key.
    """

    prune: str = "xstream"
    budget: int = 2048
    pool: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.prune not in POLICIES:
            raise ValueError(f"prune must be one of {sorted(POLICIES)}, got {self.prune!r}")
        if self.budget < 1 or self.pool < 1:
            raise ValueError(f"budget and pool must be positive (got {self.budget}, {self.pool})")

    @classmethod
    def uncompressed(cls) -> "CacheConfig":
        return cls(prune="none")

    def keep(self, tokens_per_step: int) -> int:
        """Tokens a pruned layer holds at most: upstream always keeps the first and the newest
        `tokens_per_step` tokens, so a budget below twice that still keeps both."""
        return max(self.budget, 2 * tokens_per_step)

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
    rng:         uint32 [2] key of the `random` policy (advanced every step).
    """

    global_kv: tuple
    camera_kv: tuple
    global_len: Array
    camera_len: Array
    frame_index: Array
    track_points: Array
    rng: Array

    @property
    def global_capacity(self) -> int:
        return self.global_kv[0].k.shape[2]

    @property
    def camera_capacity(self) -> int:
        return self.camera_kv[0].k.shape[2]


def cache_capacity(cfg: ModelConfig, cache_cfg: CacheConfig, frame_hw: tuple[int, int],
                   max_frames: int | None) -> tuple[int, int]:
    """Buffer slots (global layers, camera layers) for this configuration."""
    p, it = cfg.tokens_per_frame(*frame_hw), cfg.camera.iterations
    if cache_cfg.prune == "none":
        if not max_frames:
            raise ValueError("an uncompressed cache (prune='none') needs max_frames, the stream length")
        return max_frames * p, max_frames * it
    return cache_cfg.keep(p) + p, cache_cfg.keep(1) + 1


def init_cache(cfg: ModelConfig, cache_cfg: CacheConfig, batch: int, frame_hw: tuple[int, int],
               max_frames: int | None = None, query_points: Array | None = None) -> StreamCache:
    """Empty cache for frames of size frame_hw = (H, W); `max_frames` bounds an uncompressed stream."""
    g_cap, c_cap = cache_capacity(cfg, cache_cfg, frame_hw, max_frames)
    dt = cfg.jnp_dtype

    def layers(n, heads, tokens, hd):
        # distinct buffers per leaf: the cache is donated to `step`
        shape = (batch, heads, tokens, hd)
        return tuple(LayerKV(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(n))

    cam_dim = 2 * cfg.embed_dim
    if query_points is None:
        query_points = jnp.zeros((batch, 0, 2), jnp.float32)
    return StreamCache(
        global_kv=layers(cfg.depth, cfg.num_heads, g_cap, cfg.head_dim),
        camera_kv=layers(cfg.camera.trunk_depth, cfg.camera.num_heads, c_cap, cam_dim // cfg.camera.num_heads),
        global_len=jnp.zeros((), jnp.int32),
        camera_len=jnp.zeros((), jnp.int32),
        frame_index=jnp.zeros((), jnp.int32),
        track_points=jnp.array(query_points, jnp.float32, copy=True).reshape(batch, -1, 2),  # own buffer: donated
        rng=jax.random.PRNGKey(cache_cfg.seed),
    )


class CacheWriter:
    """Builds the KV hooks of one traced step over a group of layer caches.

    Each hook call writes the current tokens (k, v) at the layer's fill level, returns the buffer for
    attention with unused slots masked, and then applies the pruning policy to what is stored. Read
    the result back from `.layers` / `.lengths` after the model has run.
    """

    def __init__(self, layers: tuple, length: Array, cache_cfg: CacheConfig, num_special: int, key: Array):
        self.layers = list(layers)
        self.lengths = [length] * len(layers)
        self.cfg, self.num_special, self.key = cache_cfg, num_special, key
        self.policy = POLICIES[cache_cfg.prune]
        self.calls = 0

    def hook(self, i: int) -> KVHook:
        def fn(q, k, v):
            kv, start = self.layers[i], self.lengths[i]
            slots, n = kv.k.shape[2], k.shape[2]
            new_k = jax.lax.dynamic_update_slice_in_dim(kv.k, k.astype(kv.k.dtype), start, axis=2)
            new_v = jax.lax.dynamic_update_slice_in_dim(kv.v, v.astype(kv.v.dtype), start, axis=2)
            end = start + n
            bias = jnp.where(jnp.arange(slots) < end, 0.0, -jnp.inf).astype(jnp.float32)
            stored, length = LayerKV(new_k, new_v), end
            if self.policy is not None:
                keep = self.cfg.keep(n)
                ctx = PruneContext(k=new_k, q_new=q, length=end, n_new=n, keep=keep, pool=self.cfg.pool,
                                   num_special=self.num_special, key=jax.random.fold_in(self.key, self.calls))
                idx = self.policy(ctx)                                            # [B, keep]
                tail = jnp.broadcast_to(jnp.arange(keep, slots, dtype=jnp.int32), (idx.shape[0], slots - keep))
                idx = jnp.where(end > keep, jnp.concatenate([idx, tail], -1), jnp.arange(slots, dtype=jnp.int32))
                take = lambda x: jnp.take_along_axis(x, idx[:, None, :, None], axis=2)
                stored, length = LayerKV(take(new_k), take(new_v)), jnp.minimum(end, keep)
            self.calls += 1
            self.layers[i], self.lengths[i] = stored, length
            return new_k, new_v, bias, None
        return fn


def cache_bytes(cache: StreamCache) -> int:
    """Bytes of every array in the cache."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
