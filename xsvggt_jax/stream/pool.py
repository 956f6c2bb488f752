"""Continuous batching: a pool of B stream slots stepped together, each slot at its own frame.

A `StreamCache` keeps its fill levels, frame index and random key as scalars shared by its batch, so
B streams in one cache must start together. A *pool* is instead B single-stream caches stacked on a
new leading slot axis: every leaf of `init_cache(..., batch=1)` gets a leading [B] axis
(global_kv k/v [B, 1, H, T, D] (or `Packed` leaves likewise), global_len / camera_len / frame_index
int32 [B], track_points float32 [B, 1, N, 2], rng uint32 [B, 2]). The pool step maps `step.step`
over the slots (parameters broadcast), so slot b is exactly a single stream: it sees only its own
counters, and a slot can be reset while the others go on. Cost: one compile per pool
(configuration, B, frame size, N); `reset_slots` is an elementwise select, no recompile.

How the pool is stepped (`SLOT_COMPUTE`, `make_pool_step(slot_compute=...)`):
  batched     `pool_step`: `jax.vmap` of the step over the B slots, one jitted program (under
              `shard_map` on a mesh): what accelerators want. XLA compiles the batched program with
              other fusions / gemm blockings than a single stream's, so on CPU a slot differs from its
              single-stream run in the last bits (tiny model: up to ~5e-6).
  sequential  the single-stream step's own jitted program (`step.make_step`'s: B = 1 shapes), called
              once per slot on that slot's row of the pool (taken and put back by two small jitted
              programs; one compile each): on CPU a slot is bit-identical to its single-stream run.
              One device only (no mesh). Not `jax.lax.map` inside one program: XLA:CPU compiles the
              loop body with other fusions than the top-level step (it recomputes the new keys'
              k_norm + RoPE inside the write of the slot's cache row), which is not bit-identical.
  auto        sequential on CPU without a mesh, batched otherwise (`resolve_slot_compute`).

On a mesh (`parallel.make_mesh`) the pool step runs under `jax.shard_map` over `data`: each device
steps its B / D slots with no communication (`prune="none"` attends in a loop whose trip count is the
longest filled slot of the device's share; the others are masked).

    fresh = init_cache(cfg, cache_cfg, 1, (H, W), max_frames, query_points=jnp.zeros((N, 2)))
    pool = init_pool(fresh, B, sharding=batch_sharding(mesh))
    run = make_pool_step(cfg, cache_cfg, mesh)
    pool, out = run(params, pool, frames, valid)       # frames [B, H, W, 3] -> out[k] [B, ...]
    pool = reset_slots(pool, done, fresh, queries)     # done bool [B]; queries [B, N, 2] (optional)

Scenes with different numbers of query points share a pool of N points per slot: `pad_queries`
pads a scene's [n, 2] points to [N, 2] and returns the validity mask [N]; the pool step takes the
masks stacked, valid [B, N] bool, and the track head then keeps the padded points out of the real
points' attention (`heads.track`), so a slot's real points get their single-stream outputs; without
the mask (None) padded points change the real points' `vis` / `track_conf` (tiny reference model, 3
points padded to 5: up to 0.02 / 0.03). `mask_tracks` sets the padded points' outputs to NaN.
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

from xsvggt_jax.cache.core import CacheConfig, StreamCache, cache_overflowed
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.stream.mesh import DATA, batch_sharding, check_batch, replicated
from xsvggt_jax.stream.step import check_frame_values, place_cache, step
from xsvggt_jax.errors import InputError

Array = jax.Array

__all__ = ["PoolError", "init_pool", "pool_size", "pool_step", "make_pool_step", "reset_slots", "pad_queries",
           "mask_tracks", "slot_overflowed", "TRACK_KEYS", "SLOT_COMPUTE", "resolve_slot_compute"]

TRACK_KEYS = ("track", "vis", "track_conf")  # outputs with a query-point axis: [B, N, ...]


class PoolError(InputError):
    """A pool used with a cache, frames or query points that do not fit it, or an unknown slot compute."""


AUTO = "auto"


def resolve_slot_compute(mode: str, mesh: Optional[Mesh] = None, backend: Optional[str] = None) -> str:
    """The slot compute that runs for `mode` ("auto" or a `SLOT_COMPUTE` name) with `mesh` on
    `backend` (default: jax's): "auto" is "sequential" on CPU without a mesh (bit-identical to single
    streams), "batched" otherwise. "sequential" with a mesh raises `PoolError`."""
    if mode == AUTO:
        return "sequential" if mesh is None and (backend or jax.default_backend()) == "cpu" else "batched"
    if mode not in SLOT_COMPUTE:
        raise PoolError(f"unknown slot compute {mode!r}; choose from {(AUTO, *SLOT_COMPUTE)}")
    if mode == "sequential" and mesh is not None:
        raise PoolError("sequential slot compute runs on one device; use batched on a mesh")
    return mode


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
              frames: Array, query_valid: Optional[Array] = None, *, heads: bool = True
              ) -> tuple[StreamCache, dict]:
    """One frame for every slot: frames [B, H, W, 3] float in [0, 1]. Returns the next pool and the
    outputs of `step.step` with the slot axis first ([B, H, W, 1] depth, [B, 9] camera_pose,
    [B, N, 2] track, ...). Slot b computes `step` on its own single-stream cache (`jax.vmap`: the
    batched slot compute). query_valid [B, N] bool: each slot's real query points (`pad_queries`);
    the padded ones do not change the real ones' outputs. None: all real. heads=False: aggregator +
    camera head only (outputs: camera_pose), as `step`."""
    _check_inputs(pool, frames, query_valid)

    def one(cache: StreamCache, frame: Array, valid: Optional[Array]):
        cache, out = step(cfg, cache_cfg, params, cache, frame[None], heads=heads,
                          query_valid=None if valid is None else valid[None])
        return cache, jax.tree.map(lambda x: x[0], out)

    return jax.vmap(one)(pool, frames, query_valid)


def _check_inputs(pool: StreamCache, frames, query_valid) -> None:
    b = pool_size(pool)
    if frames.ndim != 4 or frames.shape[0] != b:
        raise PoolError(f"a pool of {b} slots takes frames [B, H, W, 3] with B = {b}, "
                        f"got shape {tuple(frames.shape)}")
    if query_valid is not None:
        n = 0 if pool.track_points is None else pool.track_points.shape[2]
        if tuple(query_valid.shape) != (b, n) or n == 0:
            raise PoolError(f"query_valid must be a bool mask [{b}, {n}] of the pool's query points, "
                            f"got shape {tuple(query_valid.shape)}")


def _batched(cfg: ModelConfig, cache_cfg: CacheConfig, mesh: Optional[Mesh], heads: bool) -> Callable:
    """`pool_step` jitted (pool donated); on a mesh under `shard_map` over `data`."""
    fn = functools.partial(pool_step, cfg, cache_cfg, heads=heads)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(1,))
    data = PartitionSpec(DATA)
    # check_vma=False: the step's attention loops start from constant carries, which the
    # varying-axes check would ask to `pcast`; the body has no collectives to check.
    fn = jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec(), data, data, data), out_specs=data,
                       check_vma=False)
    split = batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(replicated(mesh), split, split, split), out_shardings=split,
                   donate_argnums=(1,))


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_slot(pool: StreamCache, slot: Array, cache: StreamCache) -> StreamCache:
    return jax.tree.map(lambda x, c: jax.lax.dynamic_update_index_in_dim(x, c, slot, 0), pool, cache)


@jax.jit
def _take_slot(pool: StreamCache, slot: Array) -> StreamCache:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, slot, 0, keepdims=False), pool)


@jax.jit
def _stack_outputs(outs: list) -> dict:
    return jax.tree.map(lambda *x: jnp.concatenate(x, 0), *outs)


def _sequential(cfg: ModelConfig, cache_cfg: CacheConfig, mesh: Optional[Mesh], heads: bool) -> Callable:
    """The single-stream step's jitted program over the slots, one call each (see the module doc)."""
    single = jax.jit(functools.partial(step, cfg, cache_cfg, heads=heads), donate_argnums=(1,))

    def run(params: dict, pool: StreamCache, frames: Array, query_valid: Optional[Array]):
        _check_inputs(pool, frames, query_valid)
        pool = place_cache(pool, params, frames)  # committed from the start: no second compile of the step
        outs = []
        for b in range(pool_size(pool)):
            slot = jnp.int32(b)
            valid = None if query_valid is None else query_valid[b:b + 1]
            cache, out = single(params, _take_slot(pool, slot), frames[b:b + 1], query_valid=valid)
            pool = _put_slot(pool, slot, cache)
            outs.append(out)
        return pool, _stack_outputs(outs)

    return run


# how a pool step runs its slots: name -> factory(cfg, cache_cfg, mesh, heads) of a function
# (params, pool, frames, query_valid) -> (pool, outputs); see the module doc
SLOT_COMPUTE: dict[str, Callable] = {"batched": _batched, "sequential": _sequential}


def make_pool_step(cfg: ModelConfig, cache_cfg: CacheConfig, mesh: Optional[Mesh] = None, *,
                   heads: bool = True, slot_compute: str = "batched"
                   ) -> Callable[..., tuple[StreamCache, dict]]:
    """`run(params, pool, frames, query_valid=None)`: one pool step, the pool donated. slot_compute:
    "batched" (`pool_step` jitted; with a mesh: parameters replicated, pool, frames, masks and
    outputs split over `data`, B / D slots a device stepped by `jax.shard_map` without
    communication), "sequential" (one device: the single-stream step per slot, bit-identical to it
    on CPU) or "auto" (`resolve_slot_compute`). The default stays batched: one program over the slots.
    The returned driver checks concrete frames' values and that B splits over the mesh;
    `.jitted(params, pool, frames, query_valid)` is the bare compute, all four arguments positional
    (query_valid may be None; one compile per pool shape and mask presence; the driver's value check
    reads the frames' range back from the device, so a pipelined loop calls `.jitted` with frames
    checked on the host); `.slot_compute` the resolved name."""
    mode = resolve_slot_compute(slot_compute, mesh)
    jitted = SLOT_COMPUTE[mode](cfg, cache_cfg, mesh, heads)

    def run(params: dict, pool: StreamCache, frames: Array,
            query_valid: Optional[Array] = None) -> tuple[StreamCache, dict]:
        if mesh is not None:
            check_batch(mesh, int(frames.shape[0]))
        check_frame_values(frames)
        return jitted(params, pool, frames, None if query_valid is None else jnp.asarray(query_valid, bool))

    run.jitted = jitted
    run.slot_compute = mode
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
