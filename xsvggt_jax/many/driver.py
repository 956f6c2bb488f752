"""The many-scene driver: scenes stream through a pool of B slots with continuous batching.

Scenes are grouped into pools (`group_pools`), run one after another, each compiled once. A pool's
cache is laid out for one frame size, so a scene of another size runs in a pool of its own. Query
points (`query_pools`): "shared" puts every scene of a frame size in one pool of N points a slot (the
most of any of its scenes), a scene's points padded to N and masked out of the real points'
attention (`batch.pad_queries`; its outputs keep its own points only); "split" gives each number of
points its own pool. Padding changes the shapes the track head reduces over, so a padded scene's
`vis` / `track_conf` differ from its single run in the last bits (1-2 ulp on CPU): "auto" splits when
the slots run sequentially (bit-identical to `reconstruct`) and shares when they are batched.

Within a pool (`_Pool`) every step feeds one frame per slot ([B, H, W, 3]) to the jitted pool step,
in three stages: `refill` starts the next scenes in the free slots (`reset_slots` re-initialises a
slot: no recompile, no draining), `gather` takes one frame per slot (idle slots, with no scenes left,
get blank frames whose outputs are dropped), `advance` hands the step's outputs to the writer and
ends the scenes that are complete. The steps run through `stream.loop.stream_steps` (the loop
`reconstruct` and `eval` use), unblocked: the writer waits for the device.

Host work overlaps device work:
* a reader per scene (`reader.Reader`: a thread filling a queue of `prefetch` frames, decoded,
  preprocessed and value-checked) started `lookahead` scenes ahead, so the device does not wait on
  decoding;
* one writer thread (`writer.Writer`) takes each step's outputs (device-to-host copy, per-frame
  memory maps, non-finite checks) and, when a scene ends, writes its exports and report
  (`io.scene.write_scene`) into its staging directory and publishes it (`OutputDir`), while the
  device steps on.
`device_idle_fraction` = time the main loop waited for frames / its total time.

Parity with `xsvggt reconstruct` on CPU (jax 0.10.2, tiny reference model):
* prune "none": a pool's uncompressed cache is sized for its longest scene, but its attention chunks
  are not (`cache.prefix_chunk`), so a shorter scene folds over the same key blocks as in its own
  run: bit-identical.
* B >= 2 with the batched slot compute (`batch.SLOT_COMPUTE`): the vmapped program differs from
  B = 1 from the first frame by up to ~3e-6 (camera_pose; pts3d ~3e-6, derived intrinsics 7.5e-6
  relative): XLA:CPU compiles the batched program with other fusions / reduction orders. So on CPU
  `slot_compute="auto"` steps the slots sequentially with the single-stream step's own program:
  bit-identical at any B.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.io.outputs import ExportOptions
from xsvggt_jax.many.reader import Reader
from xsvggt_jax.many.scenes import Job, pool_key
from xsvggt_jax.many.writer import Active, Writer
from xsvggt_jax.stream.loop import Progress, Stepped, stream_steps
from xsvggt_jax.stream.mesh import batch_sharding, make_mesh, replicated
from xsvggt_jax.stream.pool import PoolError, init_pool, make_pool_step, pad_queries, reset_slots, resolve_slot_compute
from xsvggt_jax.stream.step import place_cache
from xsvggt_jax.weights.quant import describe

log = logging.getLogger(__name__)

QUERY_POOLS = ("auto", "split", "shared")


def resolve_query_pools(mode: str, slot_compute: str) -> str:
    """"split" or "shared" for `mode` (a `QUERY_POOLS` name) under the resolved `slot_compute`: auto
    shares when the slots are batched, splits when they run sequentially (bit-identical to single runs)."""
    if mode not in QUERY_POOLS:
        raise PoolError(f"unknown query pools {mode!r}; choose from {QUERY_POOLS}")
    if mode == "auto":
        return "shared" if slot_compute == "batched" else "split"
    return mode


def resolve_modes(slot_compute: str, query_pools: str, devices: Sequence) -> tuple[Optional[Mesh], str, str]:
    """(the pool's mesh, None on one device; the slot compute; "split" or "shared") of a run over
    `devices`. Raises `PoolError` on a bad choice, before any work."""
    mesh = make_mesh(devices=devices) if len(devices) > 1 else None
    slot_compute = resolve_slot_compute(slot_compute, mesh)
    return mesh, slot_compute, resolve_query_pools(query_pools, slot_compute)


def group_pools(jobs: Sequence[Job], query_pools: str) -> dict[tuple[int, int, int], list[Job]]:
    """{(H, W, N points a slot): the jobs of that pool} in first-appearance order. query_pools:
    "split" (one pool per frame size and point count) or "shared" (one per frame size, N the most
    points of any of its scenes)."""
    by_shape: dict[tuple, list[Job]] = collections.defaultdict(list)
    for job in jobs:
        key = pool_key(job.source)
        by_shape[key if query_pools == "split" else key[:2]].append(job)
    return {(*key[:2], max(pool_key(j.source)[2] for j in group)): group for key, group in by_shape.items()}


@dataclasses.dataclass
class Stats:
    """Time of the main loops: total, waiting for frames, waiting for the writer; steps, frames, pools."""
    total_s: float = 0.0
    frame_wait_s: float = 0.0
    writer_wait_s: float = 0.0
    steps: int = 0
    frames: int = 0
    pools: int = 0

    @property
    def device_idle_fraction(self) -> float:
        return self.frame_wait_s / self.total_s if self.total_s else 0.0


def run_scenes(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, jobs: Sequence[Job], exports: ExportOptions,
               *, slots: int = 1, prefetch: int = 4, lookahead: Optional[int] = None, devices=None,
               progress: Optional[Progress] = None,
               slot_compute: str = "auto", query_pools: str = "auto") -> tuple[list[dict], Stats]:
    """Run `jobs` through pools of `slots` streams (rounded up to a multiple of the devices), each
    scene written with `exports` (`io.scene.write_scene`); returns one summary entry per job (status
    "done" or "failed") and the loop statistics. prefetch: frames read ahead per scene (0: decode in
    the main loop); lookahead: scenes whose readers start before they get a slot (default `slots`).
    devices: the devices of the pool (default: this process's local devices; several: the pool is
    sharded over a `data` mesh). progress: counts the frames stepped. slot_compute: how a pool steps
    its slots (`batch.SLOT_COMPUTE` or "auto": sequential on one CPU device, bit-identical to
    `reconstruct`; batched otherwise). query_pools: whether scenes with different numbers of query
    points share a pool (`QUERY_POOLS`, `resolve_query_pools`)."""
    devices = list(jax.local_devices() if devices is None else devices)
    mesh, slot_compute, query_pools = resolve_modes(slot_compute, query_pools, devices)  # before any work
    params = jax.device_put(params, replicated(mesh) if mesh is not None else devices[0])
    groups = group_pools(jobs, query_pools)
    results: list[dict] = []
    writer = Writer(cfg, cache_cfg, exports, results, weights=describe(params))
    run = _Run(cfg, cache_cfg, params, mesh, slot_compute, query_pools == "shared", slots, prefetch,
               slots if lookahead is None else lookahead, writer, Stats(), progress)
    try:
        for key, group in groups.items():
            _Pool(run, group, key).run()
    except BaseException as e:
        with contextlib.suppress(RuntimeError):  # the writer's own failure is `e`'s cause
            writer.close()
        writer.abort(e)
        raise
    writer.close()
    return results, run.stats


@dataclasses.dataclass(frozen=True, eq=False)
class _Run:
    """What every pool of a `run_scenes` call shares."""
    cfg: ModelConfig
    cache_cfg: CacheConfig
    params: dict
    mesh: Optional[Mesh]
    slot_compute: str
    shared: bool                 # scenes with fewer query points than the pool's are padded and masked
    slots: int
    prefetch: int
    lookahead: int
    writer: Writer
    stats: Stats
    progress: Optional[Progress]


@dataclasses.dataclass(frozen=True, eq=False)
class _Batch:
    """One step's input: a frame per slot [B, H, W, 3] and the scenes' rows (slot, scene, frame
    index, frame [H, W, 3]) that it steps (idle slots have none)."""
    frames: Optional[jax.Array]  # None when every slot is idle (never stepped)
    rows: list


class _Pool:
    """One pool of slots stepping the scenes `group` of pool key (H, W, N points a slot) until all
    have run (see the module docstring): `run` = `refill`, `gather`, the step, `advance`, repeated."""

    def __init__(self, run: _Run, group: list[Job], key: tuple[int, int, int]):
        cfg, cache_cfg, mesh = run.cfg, run.cache_cfg, run.mesh
        self.ctx, self.key = run, key
        h, w, nq = key
        d = 1 if mesh is None else mesh.devices.size
        b_slots = -(-min(run.slots, len(group)) // d) * d
        max_frames = max(job.source.num_frames for job in group)
        self.fresh = init_cache(cfg, cache_cfg, 1, (h, w), max_frames=max_frames,
                                query_points=jnp.zeros((1, nq, 2), jnp.float32) if nq else None)
        if mesh is not None:
            self.fresh = jax.device_put(self.fresh, replicated(mesh))
        self.cache = init_pool(self.fresh, b_slots, sharding=None if mesh is None else batch_sharding(mesh))
        if mesh is None:  # committed like the parameters, as the step's outputs are: one compile
            self.cache = place_cache(self.cache, run.params)
        step = make_pool_step(cfg, cache_cfg, mesh, slot_compute=run.slot_compute)
        self.step = step.jitted
        log.info("pool of %d slots (%s) for %d scenes of %dx%d with %d query points", b_slots, step.slot_compute,
                 len(group), h, w, nq)
        self.pending = collections.deque(group)
        self.readers: dict[int, Reader] = {}
        self.active: list[Optional[Active]] = [None] * b_slots
        self.masked = run.shared and nq > 0  # a shared pool passes each slot's real points: valid [B, N]
        self.valid = np.zeros((b_slots, nq), bool)
        self.blank = np.zeros((h, w, 3), np.float32)

    def run(self) -> None:
        """Step until every scene of the group has ended or failed."""
        stats = self.ctx.stats
        t_start = time.perf_counter()
        try:
            for s in stream_steps(self._dispatch, self._batches(), block=False, progress=self.ctx.progress,
                                  frames=lambda batch: len(batch.rows)):
                self.advance(s)
        finally:
            for r in self.readers.values():
                r.close()
            for a in self.active:
                if a is not None:
                    a.reader.close()
            stats.total_s += time.perf_counter() - t_start
            stats.pools += 1

    def _batches(self) -> Iterator[_Batch]:
        """Each step's input, until no scene is left; a step whose every scene failed is skipped."""
        while True:
            self.refill()
            if not any(self.active):
                return
            batch = self.gather()
            if batch.rows:
                yield batch

    def _hand(self, item: tuple) -> None:
        """Queue `item` for the writer, counting the wait."""
        self.ctx.stats.writer_wait_s += self.ctx.writer.put(item)

    def refill(self) -> None:
        """Free the slots of failed scenes, start the next scenes in free slots (their slots reset),
        and start the readers of the scenes next in line."""
        nq = self.key[2]
        done = np.zeros(len(self.active), bool)
        queries = np.zeros((len(self.active), nq, 2), np.float32)
        for b, a in enumerate(self.active):
            if a is not None and a.failed is not None:
                a.reader.close()
                self.active[b] = a = None
            if a is None and self.pending:
                job = self.pending.popleft()
                a = Active(job, self.readers.pop(id(job), None) or Reader(job.source, self.ctx.prefetch),
                           started=time.perf_counter())
                self._hand(("start", a))
                self.active[b], done[b] = a, True
                if nq:
                    qp = job.source.query_points
                    queries[b], self.valid[b] = pad_queries(np.zeros((0, 2)) if qp is None else qp, nq)
        if self.ctx.prefetch > 0:
            for job in list(self.pending)[:self.ctx.lookahead]:
                if id(job) not in self.readers:
                    self.readers[id(job)] = Reader(job.source, self.ctx.prefetch)
        if done.any():
            self.cache = reset_slots(self.cache, done, self.fresh, jnp.asarray(queries) if nq else None)

    def gather(self) -> _Batch:
        """A frame per slot: each scene's next frame (a scene whose source fails or ends early fails
        and leaves its slot), blank frames for idle slots. The wait counts as the device's idle time."""
        frames, rows = [], []
        t0 = time.perf_counter()
        for b, a in enumerate(self.active):
            frame = None
            if a is not None:
                try:
                    frame = a.reader.get()
                    if frame is None:
                        raise ValueError(f"the source ended after {a.t} of the {a.job.source.num_frames} "
                                         "frames it announced")
                except ValueError as e:
                    a.failed = str(e)
                    self._hand(("fail", a, e))
                    a.reader.close()
                    self.active[b], frame = None, None
            if frame is None:
                frames.append(self.blank)
            else:
                frames.append(frame)
                rows.append((b, a, a.t, frame))
        self.ctx.stats.frame_wait_s += time.perf_counter() - t0
        if not rows:
            return _Batch(None, rows)
        return _Batch(jnp.asarray(np.stack(frames)), rows)  # [B, H, W, 3]

    def _dispatch(self, batch: _Batch):
        self.cache, out = self.step(self.ctx.params, self.cache, batch.frames,
                                    jnp.asarray(self.valid) if self.masked else None)
        return out

    def advance(self, s: Stepped) -> None:
        """Hand the step's outputs to the writer; end the scenes whose last frame it stepped."""
        rows = s.input.rows
        self._hand(("step", s.out, rows, s.dispatched))
        self.ctx.stats.steps += 1
        self.ctx.stats.frames += len(rows)
        for b, a, _, _ in rows:
            a.t += 1
            if a.t == a.job.source.num_frames:
                self._hand(("end", a))
                a.reader.close()
                self.active[b] = None
