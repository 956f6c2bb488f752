"""`reconstruct-many`'s writer: one thread that takes each pool step's outputs (device-to-host copy,
per-frame memory maps, non-finite checks) and, when a scene ends, writes its exports and report
(`io.scene.write_scene`) into its staging directory and publishes it (`io.outdir.OutputDir`), while
the device steps on."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from xsvggt_jax.cache.core import CacheConfig, cache_report, init_cache
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.io.outputs import ExportOptions
from xsvggt_jax.io.scene import write_scene
from xsvggt_jax.many.reader import Reader
from xsvggt_jax.many.scenes import REPORT, Job, pool_key, record_identity, summary_entry
from xsvggt_jax.stream.loop import DeviceClock
from xsvggt_jax.stream.pipeline import NonFiniteError, PredictionStore
from xsvggt_jax.stream.pool import TRACK_KEYS
from xsvggt_jax.stream.result import Reconstruction

log = logging.getLogger(__name__)

_STOP = object()


@dataclasses.dataclass(eq=False)
class Active:
    """A scene in a slot. The main loop steps it (`t`: frames stepped, read by `reader`); the writer
    writes it (`tmp`, `store`, `latency`). `failed`: set by either thread; the main loop frees the
    slot at its next step."""
    job: Job
    reader: Reader
    t: int = 0
    started: float = 0.0
    failed: Optional[str] = None
    stack: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)
    tmp: Optional[Path] = None
    store: Optional[PredictionStore] = None
    latency: list = dataclasses.field(default_factory=list)


class Writer:
    """One thread writing every scene's outputs, in step order; `results` gets a summary entry per
    scene it ends or fails. Items: ("start", a), ("step", outputs, rows, dispatched), ("end", a),
    ("fail", a, error). Scenes it has started and not yet published or failed are in `open`
    (removed by `abort` after an interruption)."""

    def __init__(self, cfg: ModelConfig, cache_cfg: CacheConfig, exports: ExportOptions, results: list,
                 depth: int = 2, weights: Optional[dict] = None):
        self.cfg, self.cache_cfg, self.exports, self.results = cfg, cache_cfg, exports, results
        self.weights = weights  # report.json's record of the weights (`weights.quant.describe`)
        self.queue: queue.Queue = queue.Queue(depth)
        self.open: set[Active] = set()
        self.clock = DeviceClock()
        self.infos: dict[tuple, dict] = {}
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="xsvggt-writer")
        self.thread.start()

    def put(self, item: tuple) -> float:
        """Queue `item`; returns the seconds it waited for room. Raises if the thread died (its queue
        would never drain)."""
        t0 = time.perf_counter()
        while True:
            if self.error is not None:
                raise RuntimeError("the output writer failed") from self.error
            try:
                self.queue.put(item, timeout=0.1)
                return time.perf_counter() - t0
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued, then stop."""
        try:
            self.put(_STOP)
        finally:
            self.thread.join()

    def abort(self, exc: BaseException) -> None:
        """After an interruption (the thread has stopped): remove the unfinished scenes' staging."""
        for a in list(self.open):
            a.stack.__exit__(type(exc), exc, exc.__traceback__)
        self.open.clear()

    def cache_info(self, job: Job) -> dict:
        """What a single-scene run reports: `cache_report` of its own cache, sized for it."""
        src = job.source
        key = (*pool_key(src), src.num_frames if self.cache_cfg.prune == "none" else 0)
        if key not in self.infos:
            qp = jax.ShapeDtypeStruct((1, key[2], 2), jnp.float32) if key[2] else None
            shapes = jax.eval_shape(lambda q: init_cache(self.cfg, self.cache_cfg, 1, key[:2],
                                                         max_frames=src.num_frames, query_points=q), qp)
            self.infos[key] = cache_report(self.cfg, self.cache_cfg, shapes)
        return self.infos[key]

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

    def _start(self, a: Active) -> None:
        self.open.add(a)
        try:
            a.tmp = a.stack.enter_context(a.job.out.staged())
            src = a.job.source
            a.store = PredictionStore(a.tmp / ".work", src.num_frames, src.height, src.width, pool_key(src)[2])
        except (OSError, ValueError) as e:
            self._fail(a, e)

    def _step(self, out: dict, rows: list, dispatched: float) -> None:
        out, seconds = self.clock.wait(out, dispatched, fetch=jax.device_get)  # device time of this step
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

    def _end(self, a: Active) -> None:
        if a not in self.open:
            return
        src = a.job.source
        try:
            a.store.flush()
            info = self.cache_info(a.job)
            result = Reconstruction.streamed(a.store.arrays, a.store.rgb, pool_key(src)[2], a.latency, info,
                                             self.cache_cfg)
            write_scene(a.tmp, result, src, self.exports, self.cfg, weights=self.weights)
            record_identity(a.tmp / REPORT, a.job.scene)  # a re-run skips it only for this very input
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

    def _fail(self, a: Active, error: BaseException) -> None:
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
