"""The hot path: a pure `step(params, cache, frame) -> (cache, outputs)` and its drivers.

The cache is threaded explicitly: `step` hands each global block and camera-trunk block its
`cache.LayerCache`, the model returns the next ones (`StreamVGGT.stream_frame`), and `step`
assembles the next `StreamCache` from them. Nothing is mutated.

Checks (typed `ValueError`s, raised while tracing, so before any compute):
* the cache is a `StreamCache` (not the dict orbax restores without a target) built for this
  `CacheConfig` and frame size (`CacheMismatchError`). Its arrays' record of that (`built_for`, kept by
  checkpoints) is read where it is concrete: by the `make_step` driver (for a cache it did not just
  return), `run_stream`, and an eager `step`; under jit the static fields are trusted;
* frames are float NHWC [B, H, W, 3] (`FrameError`: uint8 frames are told to divide by 255,
  channels-first frames that NHWC is expected). Values can only be seen on concrete arrays: the
  `make_step` driver checks the range [0, 1] there, jitted code cannot;
* an uncompressed cache holds `max_frames` frames. `frame_index` is traced, so inside jit an overflow
  cannot raise: a step past the capacity returns all-NaN outputs (and every later step does, since
  the index only grows) and `cache.cache_overflowed(cache)` is True. `run_stream` checks the stream
  length statically and raises `CacheOverflowError`; the `make_step` driver checks a concrete index.

`step` is pure: jit it, vmap it over stacked caches, scan it. The `make_step` driver composes too: under
`jax.jit` / `jax.vmap` (any traced argument) it is the jitted pure step, and its concrete checks
(frame range, capacity, `built_for`) are skipped as in `step`.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.cache.core import (CacheConfig, CacheMismatchError, CacheOverflowError, StreamCache, check_built_for,
                                   layer_caches)
from xsvggt_jax.config import ModelConfig, check_frame_size
from xsvggt_jax.nn.model import StreamVGGT
from xsvggt_jax.errors import InputError
from xsvggt_jax.weights.quant import dequantize_params

Array = jax.Array

FRAME_RANGE_TOL = 1e-3  # frames are [0, 1]; resampling may overshoot by rounding, not by more


class FrameError(InputError):
    """A frame that is not float NHWC [B, H, W, 3] in [0, 1]."""


def check_frame(cfg: ModelConfig, cache: StreamCache, frame: Array) -> None:
    """Static checks of a frame against the model and the cache (shape, dtype; works on tracers)."""
    shape = tuple(frame.shape)
    if len(shape) != 4:
        raise FrameError(f"a frame must be [B, H, W, 3] (NHWC), got shape {shape}")
    if shape[-1] != 3:
        hint = " (channels first? NHWC [B, H, W, 3] expected)" if shape[1] == 3 else ""
        raise FrameError(f"a frame must be [B, H, W, 3] (NHWC), got shape {shape}{hint}")
    if not jnp.issubdtype(frame.dtype, jnp.floating):
        hint = " (divide uint8 frames by 255)" if frame.dtype == jnp.uint8 else ""
        raise FrameError(f"frames must be float in [0, 1], got dtype {frame.dtype}{hint}")
    check_frame_size(cfg, *shape[1:3], tracks=cache.track_points is not None)
    if tuple(shape[1:3]) != cache.frame_hw:
        raise CacheMismatchError(f"the cache was built for {cache.frame_hw[0]}x{cache.frame_hw[1]} frames, "
                                 f"got {shape[1]}x{shape[2]}")
    batch = jax.tree_util.tree_leaves(cache.global_kv)[0].shape[0]
    if shape[0] != batch:
        raise CacheMismatchError(f"the cache holds {batch} streams, the frame batch is {shape[0]}")


def check_frame_values(frame: Any) -> None:
    """Concrete float frames (numpy or a non-traced jax array): values in [0, 1]. Tracers and
    non-float frames pass (`check_frame` rejects the latter while tracing)."""
    if isinstance(frame, jax.core.Tracer) or not jnp.issubdtype(frame.dtype, jnp.floating):
        return
    if isinstance(frame, np.ndarray):
        lo, hi = (float(frame.min()), float(frame.max())) if frame.size else (0.0, 0.0)
    else:
        lo, hi = (float(x) for x in jax.device_get((jnp.min(frame), jnp.max(frame))))
    if lo < -FRAME_RANGE_TOL or hi > 1 + FRAME_RANGE_TOL:
        hint = " (0..255 values? divide by 255)" if hi > 1.5 else ""
        raise FrameError(f"frames must be float in [0, 1], got values in [{lo:g}, {hi:g}]{hint}")


def check_cache(cache_cfg: CacheConfig, cache: StreamCache) -> None:
    """The cache is a `StreamCache` built (`init_cache`) for this configuration; when its `built_for`
    leaf is concrete, the arrays were built for it too (`check_built_for`: not a checkpoint restored
    into another configuration's tree)."""
    if not isinstance(cache, StreamCache):
        raise CacheMismatchError(f"the cache is not a StreamCache but a {type(cache).__name__} (restored by orbax "
                                 "without a target?): restore it into its tree, e.g. ckpt.restore(path, "
                                 "jax.eval_shape(lambda: init_cache(cfg, cache_cfg, ...)))")
    if cache.cache_cfg != cache_cfg:
        diff = {f: (getattr(cache.cache_cfg, f), getattr(cache_cfg, f)) for f in cache_cfg.__dataclass_fields__
                if getattr(cache.cache_cfg, f) != getattr(cache_cfg, f)}
        raise CacheMismatchError("the cache was built for another CacheConfig: "
                                 + ", ".join(f"{f}={a!r} (cache) vs {b!r} (step)" for f, (a, b) in diff.items()))
    if not isinstance(cache.built_for, jax.core.Tracer):
        check_built_for(cache)


def step(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, cache: StreamCache, frame: Array, *,
         heads: bool = True, return_aggregated: bool = False,
         query_valid: Array | None = None, attention: str = "auto") -> tuple[StreamCache, dict]:
    """Process one frame of a stream.

    frame: [B, H, W, 3] float in [0, 1] (NHWC). Returns the updated cache and the outputs for this
    frame (upstream names, batch first, no frame axis). Tracks are produced when the cache holds
    query points: frame t is queried with frame t-1's tracks, as upstream chains them.
    heads=False: aggregator + camera head only (outputs: camera_pose). return_aggregated: also
    out["aggregated"], the `depth` aggregator outputs [B, P', 2C] the heads read. query_valid: [B, N]
    bool marking the cache's real query points (the others are padding, `batch.pad_queries`: they do
    not change the real points' outputs); None: all real. attention: the cached layers' attention
    implementation (`attention.ATTENTION_IMPLS`; "packed" reads a quantized cache's codes).
    Pure: jit it (see `make_step`), vmap it over stacked caches; the counters are arrays, so it
    traces once per stream shape. params: float, or with int8 / int4 kernels (`weights.quant`), which
    stay packed as the arguments and are decoded here, at use.
    """
    check_cache(cache_cfg, cache)
    check_frame(cfg, cache, frame)
    rng, key = jax.random.split(cache.rng)
    ns = cfg.num_special_tokens
    glob = layer_caches(cache.global_kv, cache.global_len, jax.random.fold_in(key, 0), cache_cfg, ns)
    cam = layer_caches(cache.camera_kv, cache.camera_len, jax.random.fold_in(key, 1), cache_cfg.camera(), ns)
    slot = jnp.minimum(cache.frame_index, 1).reshape(1)  # frame 0 uses special-token slot 0
    out, (glob, cam) = StreamVGGT(cfg, attention=attention).apply(                    # int8/int4 kernels decoded here, at use
        {"params": dequantize_params(params)}, frame[:, None], slot, glob, cam, cache.track_points if heads else None,
        return_aggregated, heads, query_valid, method=StreamVGGT.stream_frame)
    out = jax.tree.map(lambda x: x[:, 0], out)                     # drop the frame axis
    if return_aggregated:
        out["aggregated"] = tuple(out["aggregated"])
    if cache.max_frames is not None:                               # past the capacity: loudly wrong
        full = cache.frame_index >= cache.max_frames
        out = jax.tree.map(lambda x: jnp.where(full, jnp.nan, x) if jnp.issubdtype(x.dtype, jnp.floating)
                           else x, out)
    chex.assert_shape(out["camera_pose"], (frame.shape[0], 9))
    new = cache.replace(
        global_kv=tuple(c.kv for c in glob), camera_kv=tuple(c.kv for c in cam),
        global_len=glob[0].length, camera_len=cam[0].length, frame_index=cache.frame_index + 1,
        track_points=out["track"] if (heads and cache.track_points is not None) else cache.track_points,
        rng=rng)
    return new, out


def _placement(tree) -> Any:
    """The sharding of the first committed array leaf of `tree`, or None."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and getattr(leaf, "committed", False):
            return leaf.sharding
    return None


def place_cache(cache: StreamCache, params, frame=None) -> StreamCache:
    """The cache placed for a jitted step with these inputs. An uncommitted cache (init_cache without a sharding) is committed like the parameters (or the
    frame): a jitted step returns committed arrays when any input is committed, and a second call with
    a committed cache would compile again. A single-device placement is reused as is; a multi-device
    one (a mesh) gets the cache replicated over the same devices (pass `init_cache(sharding=...)` to
    shard it instead). An already committed cache is left alone."""
    if _placement(cache) is not None or not jax.tree_util.tree_leaves(cache):
        return cache
    like = _placement(params) or _placement(frame)
    if like is None:
        return cache   # everything uncommitted: the outputs stay uncommitted too
    if len(like.device_set) == 1:
        return jax.device_put(cache, like)
    mesh = getattr(like, "mesh", None)
    if mesh is None:
        raise CacheMismatchError("cannot place an uncommitted cache next to parameters sharded with "
                                 f"{type(like).__name__}: pass init_cache(..., sharding=...)")
    return jax.device_put(cache, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _traced(*trees) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(trees))


def make_step(cfg: ModelConfig, cache_cfg: CacheConfig, **step_options) -> Callable[[dict, StreamCache, Array],
                                                                                         tuple[StreamCache, dict]]:
    """`step(params, cache, frame, **step_options)` jitted for the configuration (cache donated), behind
    a driver that checks concrete frames' values, a concrete frame index against an uncompressed
    cache's capacity (reading the index waits for the previous step) and, for a cache it did not
    return itself (a fresh or restored one), its arrays' configuration record (`check_built_for`), and
    places an uncommitted cache like the parameters (one compile per stream). `.jitted` is the bare
    jitted function.
    Under `jax.jit` / `jax.vmap` (any argument traced) the driver is `.jitted`, the pure step: the
    concrete checks above cannot run there (an overflow gives NaN outputs, as in `step`)."""
    jitted = jax.jit(functools.partial(step, cfg, cache_cfg, **step_options), donate_argnums=(1,))
    returned = weakref.WeakValueDictionary()  # id -> the built_for leaf of a cache this driver returned

    def run(params: dict, cache: StreamCache, frame: Array) -> tuple[StreamCache, dict]:
        if _traced(params, cache, frame):
            return jitted(params, cache, frame)
        check_frame_values(frame)
        if not isinstance(cache, StreamCache) or returned.get(id(cache.built_for)) is not cache.built_for:
            check_cache(cache_cfg, cache)  # a cache from elsewhere: its record is read (once)
        if cache.max_frames is not None and int(cache.frame_index) >= cache.max_frames:
            raise CacheOverflowError(f"the uncompressed cache holds {cache.max_frames} frames and is full: "
                                     "build it with a larger max_frames, or prune (e.g. prune='xstream')")
        new, out = jitted(params, place_cache(cache, params, frame), frame)
        returned[id(new.built_for)] = new.built_for
        return new, out

    run.jitted = jitted
    return run


def run_stream(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, cache: StreamCache,
               frames: Array) -> tuple[StreamCache, dict]:
    """All frames [S, B, H, W, 3] through `step` inside one `lax.scan` (one compile). Outputs are
    stacked on a leading frame axis: [S, B, ...]. An uncompressed cache must have room for S more
    frames (checked here when its frame index is concrete, else against S alone)."""
    check_cache(cache_cfg, cache)
    if cache.max_frames is not None:
        done = 0 if isinstance(cache.frame_index, jax.core.Tracer) else int(cache.frame_index)
        if done + frames.shape[0] > cache.max_frames:
            raise CacheOverflowError(f"{frames.shape[0]} frames after {done} do not fit the uncompressed cache's "
                                     f"{cache.max_frames} frames: build it with a larger max_frames")
    check_frame_values(frames)
    return jax.lax.scan(lambda c, f: step(cfg, cache_cfg, params, c, f), cache, frames)
