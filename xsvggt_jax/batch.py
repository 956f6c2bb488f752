"""Continuous batching: a pool of B stream slots stepped together, each slot at its own frame.

A `StreamCache` keeps its fill levels, frame index and random key as scalars shared by its batch, so
B streams in one cache must start together. A *pool* is instead B single-stream caches stacked on a
new leading slot axis: every leaf of `init_cache(..., batch=1)` gets a leading [B] axis
(global_kv k/v [B, 1, H, T, D] (or `Packed` leaves likewise), global_len / camera_len / frame_index
int32 [B], track_points float32 [B, 1, N, 2], rng uint32 [B, 2]). The pool step is `jax.vmap` of
`step.step` over the slots (parameters broadcast), so slot b is exactly a single stream: it sees
only its own counters, and a slot can be reset while the others go on. Cost: one compile per pool
(configuration, B, frame size, N); `reset_slots` is an elementwise select, no recompile.

On a mesh (`parallel.make_mesh`) the pool step runs under `jax.shard_map` over `data`: each device
steps its B / D slots with no communication (`prune="none"` attends in a loop whose trip count is the
longest filled slot of the device's share; the others are masked).

    fresh = init_cache(cfg, cache_cfg, 1, (H, W), max_frames, query_points=jnp.zeros((N, 2)))
    pool = init_pool(fresh, B, sharding=batch_sharding(mesh))
    run = make_pool_step(cfg, cache_cfg, mesh)
    pool, out = run(params, pool, frames)              # frames [B, H, W, 3] -> out[k] [B, ...]
    pool = reset_slots(pool, done, fresh, queries)     # done bool [B]; queries [B, N, 2] (optional)

Scenes with different numbers of query points share a pool of N points per slot: `pad_queries`
pads a scene's [n, 2] points to [N, 2] and returns the validity mask [N]; `mask_tracks` sets the
padded points' outputs to NaN. NOTE: the track head's space attention lets the virtual tracks attend
over all N query tracks, so padded points change the real points' `vis` and `track_conf` (tiny
reference model, 3 points padded to 5: up to 0.02 / 0.03 absolute) unless the head masks them out
(a key mask in `UpdateFormer`'s virtual-to-point attention; not available yet). Everything else of
the slot, its `track` included, equals its single-stream run.
Frames of one pool share one size (the cache is laid out for it): a scene of another size goes to a
pool of its own (or is resized to the pool's size by the preprocessing).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from .cache import CacheConfig, StreamCache, cache_overflowed
from .config import ModelConfig
from .parallel import DATA, batch_sharding, check_batch, replicated
from .step import check_frame_values, step

Array = jax.Array

__all__ = ["PoolError", "init_pool", "pool_size", "pool_step", "make_pool_step", "reset_slots", "pad_queries",
           "mask_tracks", "slot_overflowed", "TRACK_KEYS"]

TRACK_KEYS = ("track", "vis", "track_conf")  # outputs with a query-point axis: [B, N, ...]


class PoolError(ValueError):
    """A pool used with a cache, frames or query points that do not fit it."""


def _check_single(fresh: StreamCache) -> None:
    batch = jax.tree_util.tree_leaves(fresh.global_kv)[0].shape[0]
    if fresh.frame_index.ndim != 0 or batch != 1:
        raise PoolError(f"a pool is built from a single-stream cache (init_cache(..., batch=1)), got batch "
                        f"{batch} and frame_index of shape {fresh.frame_index.shape}")


def init_pool(fresh: StreamCache, slots: int, sharding=None) -> StreamCache:
    """B = `slots` copies of the fresh single-stream cache `fresh` stacked on a leading slot axis (own
    buffers: the pool is donated to the step). sharding: e.g. `parallel.batch_sharding(mesh)`."""
    _check_single(fresh)
    if slots < 1:
        raise PoolError(f"a pool needs at least one slot, got {slots}")
    pool = jax.tree.map(lambda x: jnp.repeat(x[None], slots, 0), fresh)
    return pool if sharding is None else jax.device_put(pool, sharding)


def pool_size(pool: StreamCache) -> int:
    """B, the number of slots."""
    return int(pool.frame_index.shape[0])


def pool_step(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, pool: StreamCache,
              frames: Array, *, heads: bool = True) -> tuple[StreamCache, dict]:
    """One frame for every slot: frames [B, H, W, 3] float in [0, 1]. Returns the next pool and the
    outputs of `step.step` with the slot axis first ([B, H, W, 1] depth, [B, 9] camera_pose,
    [B, N, 2] track, ...). Slot b computes exactly `step` on its own single-stream cache.
    heads=False: aggregator + camera head only (outputs: camera_pose), as `step`."""
    b = pool_size(pool)
    if frames.ndim != 4 or frames.shape[0] != b:
        raise PoolError(f"a pool of {b} slots takes frames [B, H, W, 3] with B = {b}, "
                        f"got shape {tuple(frames.shape)}")

    def one(cache: StreamCache, frame: Array):
        cache, out = step(cfg, cache_cfg, params, cache, frame[None], heads=heads)
        return cache, jax.tree.map(lambda x: x[0], out)

    return jax.vmap(one)(pool, frames)


def make_pool_step(cfg: ModelConfig, cache_cfg: CacheConfig, mesh: Optional[Mesh] = None, *,
                   heads: bool = True) -> Callable[[dict, StreamCache, Array], tuple[StreamCache, dict]]:
    """`pool_step(params, pool, frames)` jitted with the pool donated. With a mesh: parameters
    replicated, pool, frames and outputs split over `data` (B / D slots a device, stepped there by
    `jax.shard_map` without communication). The returned driver checks concrete frames' values and
    that B splits over the mesh; `.jitted` is the bare jitted function (one compile per pool shape;
    the driver's value check reads the frames' range back from the device, so a pipelined loop
    calls `.jitted` with frames checked on the host)."""
    fn = functools.partial(pool_step, cfg, cache_cfg, heads=heads)
    if mesh is None:
        jitted = jax.jit(fn, donate_argnums=(1,))
    else:
        data = PartitionSpec(DATA)
        # check_vma=False: the step's attention loops start from constant carries, which the
        # varying-axes check would ask to `pcast`; the body has no collectives to check.
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec(), data, data), out_specs=data,
                           check_vma=False)
        jitted = jax.jit(fn, in_shardings=(replicated(mesh), batch_sharding(mesh), batch_sharding(mesh)),
                         out_shardings=batch_sharding(mesh), donate_argnums=(1,))

    def run(params: dict, pool: StreamCache, frames: Array) -> tuple[StreamCache, dict]:
        if mesh is not None:
            check_batch(mesh, int(frames.shape[0]))
        check_frame_values(frames)
        return jitted(params, pool, frames)

    run.jitted = jitted
    return run


@functools.partial(jax.jit, donate_argnums=(0,))
def _reset(pool: StreamCache, done: Array, fresh: StreamCache, query_points: Optional[Array]) -> StreamCache:
    rows = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (done.shape[0],) + x.shape), fresh)
    if query_points is not None:
        rows = rows.replace(track_points=query_points[:, None].astype(jnp.float32))

    def select(new, old):
        return jnp.where(done.reshape((-1,) + (1,) * (old.ndim - 1)), new.astype(old.dtype), old)

    return jax.tree.map(select, rows, pool)


def reset_slots(pool: StreamCache, done: Array, fresh: StreamCache,
                query_points: Optional[Array] = None) -> StreamCache:
    """The pool with the slots where done [B] (bool) is True set back to `fresh` (the single-stream
    cache the pool was built from), so a new scene starts there at the next step; the other slots are
    untouched. query_points [B, N, 2]: the new scenes' points (rows of slots not reset are ignored),
    e.g. stacked from `pad_queries`; None keeps `fresh`'s. Jitted (the pool is donated): the same
    compiled select for any mask, no recompile of the step. `fresh` is passed rather than rebuilt:
    an empty cache is not all zeros (codec scales are 1, the key is PRNGKey(seed)), and only
    `init_cache` knows it; keep it uncommitted (or replicated on the pool's mesh)."""
    _check_single(fresh)
    b = pool_size(pool)
    done = jnp.asarray(done, bool)
    if done.shape != (b,):
        raise PoolError(f"done must be a bool mask of shape ({b},), got {done.shape}")
    if (fresh.cache_cfg, fresh.frame_hw, fresh.max_frames) != (pool.cache_cfg, pool.frame_hw, pool.max_frames):
        raise PoolError("the fresh cache was not built like the pool (CacheConfig, frame size or max_frames)")
    if query_points is not None:
        if pool.track_points is None:
            raise PoolError("the pool was built without query points (init_cache(..., query_points=...))")
        n = pool.track_points.shape[2]
        if tuple(query_points.shape) != (b, n, 2):
            raise PoolError(f"query_points must be [{b}, {n}, 2] (pad with pad_queries), "
                            f"got {tuple(query_points.shape)}")
    return _reset(pool, done, fresh, query_points)


def pad_queries(points, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A scene's query points [k, 2] (pixel x, y) padded to the pool's n: (points [n, 2] float32,
    valid [n] bool). Padding repeats the first point (a point inside the frame) or is (0, 0) for k = 0."""
    points = np.asarray(points, np.float32).reshape(-1, 2)
    k = points.shape[0]
    if k > n:
        raise PoolError(f"{k} query points do not fit a pool of {n} points a slot")
    fill = points[:1] if k else np.zeros((1, 2), np.float32)
    padded = np.concatenate([points, np.repeat(fill, n - k, 0)], 0)
    return padded, np.arange(n) < k


def mask_tracks(out: dict, valid: Array) -> dict:
    """Outputs with the padded query points' track / vis / track_conf set to NaN. valid: [B, N] bool."""
    valid = jnp.asarray(valid, bool)
    masked = dict(out)
    for key in TRACK_KEYS:
        if key in out:
            x = out[key]
            masked[key] = jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, jnp.nan)
    return masked


def slot_overflowed(pool: StreamCache) -> Array:
    """bool [B]: slots whose uncompressed cache was stepped past `max_frames` (their outputs are NaN)."""
    return jax.vmap(cache_overflowed)(pool)
