"""The many-scene driver: scenes stream through a pool of B slots with continuous batching.

Scenes are grouped into pools (`group_pools`), run one after another, each compiled once. A pool's
cache is laid out for one frame size, so a scene of another size runs in a pool of its own. Query
points (`query_pools`): "shared" puts every scene of a frame size in one pool of N points a slot (the
most of any of its scenes), a scene's points padded to N and masked out of the real points'
attention (`batch.pad_queries`; its outputs keep its own points only); "split" gives each number of
points its own pool. Padding changes the shapes the track head reduces over, so a padded scene's
`vis` / `track_conf` differ from its single run in the last bits (1-2 ulp on CPU): "auto" splits when
the slots run sequentially (bit-identical to `reconstruct`) and shares when they are batched.

Within a pool every step feeds one frame per slot ([B, H, W, 3]) to the jitted pool step; when a
scene ends (or fails), `reset_slots` re-initialises its slot and the next scene starts there at the
next step: no recompile, no draining. Idle slots (no scenes left) get blank frames whose outputs are
dropped.

Host work overlaps device work:
* a reader per scene (a thread filling a queue of `prefetch` frames, decoded, preprocessed and
  value-checked) started `lookahead` scenes ahead, so the device does not wait on decoding;
* one writer thread takes each step's outputs (device-to-host copy, per-frame memory maps,
  non-finite checks) and, when a scene ends, writes its exports and report into its staging
  directory and publishes it (`OutputDir`), while the device steps on.
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
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from xsvggt_jax.stream.pool import (TRACK_KEYS, PoolError, init_pool, make_pool_step, pad_queries, reset_slots,
                     resolve_slot_compute)
from xsvggt_jax.cache.core import CacheConfig, cache_report, init_cache
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.io.frames import FrameSource
from xsvggt_jax.io.outdir import OutputDir
from xsvggt_jax.stream.mesh import batch_sharding, make_mesh, replicated
from xsvggt_jax.stream.pipeline import NonFiniteError, PredictionStore
from xsvggt_jax.stream.step import check_frame_values, place_cache
from xsvggt_jax.many.scenes import Scene, summary_entry

log = logging.getLogger(__name__)

# finish(tmp, source, preds, rgb, latency_s, cache_bytes_per_frame, cache_info, num_queries) writes a
# scene's exports and report into its staging directory `tmp` (the CLI's `write_scene`).
Finish = Callable[..., object]
_STOP = object()


@dataclasses.dataclass
class Job:
    """A scene ready to run: its opened source and its output directory (checked, not yet written)."""
    scene: Scene
    source: FrameSource
    out: OutputDir


QUERY_POOLS = ("auto", "split", "shared")


def pool_key(source: FrameSource) -> tuple[int, int, int]:
    """(H, W, number of query points) of one scene."""
    qp = source.query_points
    return source.height, source.width, 0 if qp is None else len(qp)


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


class _Reader:
    """Frames of one scene, [H, W, 3] float32 each, value-checked; read ahead by a thread into a
    queue of `depth` frames (depth 0: read on demand in the caller's thread)."""

    def __init__(self, source: FrameSource, depth: int):
        self._frames = iter(source)
        self._stop = threading.Event()
        self._queue: Optional[queue.Queue] = None
        if depth > 0:
            self._queue = queue.Queue(depth)
            threading.Thread(target=self._fill, daemon=True, name=f"read {source.name}").start()

    def _next(self):
        frame = next(self._frames, None)
        if frame is not None:
            check_frame_values(frame)
        return frame

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._next()
            except Exception as e:  # handed to the main loop: the scene fails there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is None or isinstance(item, Exception):
                return

    def get(self) -> Optional[np.ndarray]:
        """The next frame, None at the end; raises the source's error."""
        item = self._next() if self._queue is None else self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()


@dataclasses.dataclass(eq=False)
class _Active:
    """A scene in a slot. `t`: frames stepped; the writer fills the rest."""
    job: Job
    reader: _Reader
    t: int = 0
    started: float = 0.0
    failed: Optional[str] = None      # set by either thread; the main loop frees the slot at the next step
    stack: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)
    tmp: Optional[Path] = None
    store: Optional[PredictionStore] = None
    latency: list = dataclasses.field(default_factory=list)


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


class _Writer:
    """One thread writing every scene's outputs, in step order. Scenes it has started and not yet
    published or failed are in `open` (removed by `abort` after an interruption)."""

    def __init__(self, finish: Finish, cache_info: Callable[[Job], dict], results: list, depth: int = 2):
        self.finish, self.cache_info, self.results = finish, cache_info, results
        self.queue: queue.Queue = queue.Queue(depth)
        self.open: set[_Active] = set()
        self.last: Optional[float] = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="xsvggt-writer")
        self.thread.start()

    def _put(self, item) -> None:
        """Queue `item`; raise if the thread died (its queue would never drain)."""
        while True:
            if self.error is not None:
                raise RuntimeError("the output writer failed") from self.error
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def put(self, item: tuple, stats: Stats) -> None:
        t0 = time.perf_counter()
        self._put(item)
        stats.writer_wait_s += time.perf_counter() - t0

    def close(self) -> None:
        """Write what is queued, then stop."""
        try:
            self._put(_STOP)
        finally:
            self.thread.join()

    def abort(self, exc: BaseException) -> None:
        """After an interruption (the thread has stopped): remove the unfinished scenes' staging."""
        for a in list(self.open):
            a.stack.__exit__(type(exc), exc, exc.__traceback__)
        self.open.clear()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            try:
                getattr(self, "_" + item[0])(*item[1:])
            except BaseException as e:  # a bug, not a scene's fault: stop the run
                self.error = e
                log.exception("the output writer failed")
                return

    def _start(self, a: _Active) -> None:
        self.open.add(a)
        try:
            a.tmp = a.stack.enter_context(a.job.out.staged())
            src = a.job.source
            a.store = PredictionStore(a.tmp / ".work", src.num_frames, src.height, src.width, pool_key(src)[2])
        except (OSError, ValueError) as e:
            self._fail(a, e)

    def _step(self, out: dict, rows: list, dispatched: float) -> None:
        out = jax.device_get(out)  # waits for the device
        now = time.perf_counter()
        seconds = now - max(dispatched, self.last or dispatched)  # device time of this step
        self.last = now
        for b, a, t, frame in rows:
            if a not in self.open:
                continue
            n = pool_key(a.job.source)[2]  # the scene's own points: a shared pool pads them
            row = {k: v[b:b + 1, :n] if k in TRACK_KEYS else v[b:b + 1] for k, v in out.items()
                   if n or k not in TRACK_KEYS}
            bad = a.store.write(t, row, frame)
            a.latency.append(seconds)
            if bad:
                self._fail(a, NonFiniteError(f"the model produced NaN/Inf at frame {t} of "
                                             f"{a.job.source.num_frames} (in {', '.join(bad)})"))

    def _end(self, a: _Active) -> None:
        if a not in self.open:
            return
        src = a.job.source
        try:
            a.store.flush()
            info = self.cache_info(a.job)
            self.finish(a.tmp, src, a.store.arrays, a.store.rgb, a.latency, [info["cache_bytes"]] * src.num_frames,
                        info, pool_key(src)[2])
            a.store = None
            shutil.rmtree(a.tmp / ".work", ignore_errors=True)
            a.stack.close()  # publishes ROOT/<scene>
        except (OSError, ValueError) as e:
            self._fail(a, e)
            return
        self.open.discard(a)
        seconds = time.perf_counter() - a.started
        self.results.append(summary_entry(a.job.scene, "done", src.num_frames, seconds, info["cache_bytes"]))
        log.info("%s: done, %d frames in %.2f s", a.job.scene.name, src.num_frames, seconds)

    def _fail(self, a: _Active, error: BaseException) -> None:
        """Record the scene's error and remove its staging directory (nothing half written)."""
        a.failed = a.failed or str(error)
        if a not in self.open:
            return
        self.open.discard(a)
        a.store = None
        a.stack.__exit__(type(error), error, error.__traceback__)
        self.results.append(summary_entry(a.job.scene, "failed", a.job.source.num_frames,
                                          time.perf_counter() - a.started, None, a.failed))
        log.warning("%s: failed: %s", a.job.scene.name, a.failed)


def run_scenes(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, jobs: Sequence[Job], finish: Finish, *,
               slots: int = 1, prefetch: int = 4, lookahead: Optional[int] = None, devices=None,
               progress: Optional[Callable[[int], None]] = None,
               slot_compute: str = "auto", query_pools: str = "auto") -> tuple[list[dict], Stats]:
    """Run `jobs` through pools of `slots` streams (rounded up to a multiple of the devices); returns
    one summary entry per job (status "done" or "failed") and the loop statistics. prefetch: frames
    read ahead per scene (0: decode in the main loop); lookahead: scenes whose readers start before
    they get a slot (default `slots`). devices: the devices of the pool (default: this process's
    local devices; several: the pool is sharded over a `data` mesh). progress(n): n frames stepped.
    slot_compute: how a pool steps its slots (`batch.SLOT_COMPUTE` or "auto": sequential on one CPU
    device, bit-identical to `reconstruct`; batched otherwise). query_pools: whether scenes with
    different numbers of query points share a pool (`QUERY_POOLS`, `resolve_query_pools`)."""
    devices = list(jax.local_devices() if devices is None else devices)
    mesh, slot_compute, query_pools = resolve_modes(slot_compute, query_pools, devices)  # before any work
    params = jax.device_put(params, replicated(mesh) if mesh is not None else devices[0])
    groups = group_pools(jobs, query_pools)
    results: list[dict] = []
    stats = Stats()
    infos: dict[tuple, dict] = {}

    def cache_info(job: Job) -> dict:  # what a single-scene run reports: its own cache, sized for it
        src = job.source
        key = (*pool_key(src), src.num_frames if cache_cfg.prune == "none" else 0)
        if key not in infos:
            qp = jax.ShapeDtypeStruct((1, key[2], 2), jnp.float32) if key[2] else None
            shapes = jax.eval_shape(lambda q: init_cache(cfg, cache_cfg, 1, key[:2], max_frames=src.num_frames,
                                                         query_points=q), qp)
            infos[key] = cache_report(cfg, cache_cfg, shapes)
        return infos[key]

    writer = _Writer(finish, cache_info, results)
    try:
        for key, group in groups.items():
            _run_pool(cfg, cache_cfg, params, group, key, slots, prefetch,
                      slots if lookahead is None else lookahead, mesh, writer, stats, progress, slot_compute,
                      shared=query_pools == "shared")
    except BaseException as e:
        with contextlib.suppress(RuntimeError):  # the writer's own failure is `e`'s cause
            writer.close()
        writer.abort(e)
        raise
    writer.close()
    return results, stats


def _run_pool(cfg, cache_cfg, params, group: list[Job], key: tuple, slots: int, prefetch: int, lookahead: int,
              mesh, writer: _Writer, stats: Stats, progress, slot_compute: str, shared: bool) -> None:
    h, w, nq = key
    d = 1 if mesh is None else mesh.devices.size
    b_slots = -(-min(slots, len(group)) // d) * d
    max_frames = max(job.source.num_frames for job in group)
    fresh = init_cache(cfg, cache_cfg, 1, (h, w), max_frames=max_frames,
                       query_points=jnp.zeros((1, nq, 2), jnp.float32) if nq else None)
    if mesh is not None:
        fresh = jax.device_put(fresh, replicated(mesh))
    pool = init_pool(fresh, b_slots, sharding=None if mesh is None else batch_sharding(mesh))
    if mesh is None:  # committed like the parameters, as the step's outputs are: one compile
        pool = place_cache(pool, params)
    run = make_pool_step(cfg, cache_cfg, mesh, slot_compute=slot_compute)
    step = run.jitted
    log.info("pool of %d slots (%s) for %d scenes of %dx%d with %d query points", b_slots, run.slot_compute,
             len(group), h, w, nq)
    pending = collections.deque(group)
    readers: dict[int, _Reader] = {}

    def reader_for(job: Job) -> _Reader:
        return readers.pop(id(job), None) or _Reader(job.source, prefetch)

    def read_ahead() -> None:
        if prefetch > 0:
            for job in list(pending)[:lookahead]:
                if id(job) not in readers:
                    readers[id(job)] = _Reader(job.source, prefetch)

    active: list[Optional[_Active]] = [None] * b_slots
    masked = shared and nq > 0  # a shared pool passes each slot's real points: valid [B, N]
    valid = np.zeros((b_slots, nq), bool)
    blank = np.zeros((h, w, 3), np.float32)
    t_start = time.perf_counter()
    try:
        while True:
            done = np.zeros(b_slots, bool)
            queries = np.zeros((b_slots, nq, 2), np.float32)
            for b in range(b_slots):
                if active[b] is not None and active[b].failed is not None:
                    active[b].reader.close()
                    active[b] = None
                if active[b] is None and pending:
                    job = pending.popleft()
                    a = _Active(job, reader_for(job), started=time.perf_counter())
                    writer.put(("start", a), stats)
                    active[b], done[b] = a, True
                    if nq:
                        queries[b], valid[b] = pad_queries(
                            np.zeros((0, 2)) if job.source.query_points is None else job.source.query_points, nq)
            read_ahead()
            if not any(active):
                break
            if done.any():
                pool = reset_slots(pool, done, fresh, jnp.asarray(queries) if nq else None)
            frames, rows = [], []
            t0 = time.perf_counter()
            for b, a in enumerate(active):
                frame = None
                if a is not None:
                    try:
                        frame = a.reader.get()
                        if frame is None:
                            raise ValueError(f"the source ended after {a.t} of the {a.job.source.num_frames} "
                                             "frames it announced")
                    except ValueError as e:
                        a.failed = str(e)
                        writer.put(("fail", a, e), stats)
                        a.reader.close()
                        active[b], frame = None, None
                if frame is None:
                    frames.append(blank)
                else:
                    frames.append(frame)
                    rows.append((b, a, a.t, frame))
            stats.frame_wait_s += time.perf_counter() - t0
            if not rows:
                continue
            batch = jnp.asarray(np.stack(frames))  # [B, H, W, 3]
            dispatched = time.perf_counter()
            pool, out = step(params, pool, batch, jnp.asarray(valid) if masked else None)
            writer.put(("step", out, rows, dispatched), stats)
            stats.steps += 1
            stats.frames += len(rows)
            if progress is not None:
                progress(len(rows))
            for b, a, _, _ in rows:
                a.t += 1
                if a.t == a.job.source.num_frames:
                    writer.put(("end", a), stats)
                    a.reader.close()
                    active[b] = None
    finally:
        for r in readers.values():
            r.close()
        for a in active:
            if a is not None:
                a.reader.close()
        stats.total_s += time.perf_counter() - t_start
        stats.pools += 1
