"""`reconstruct-many --offline full|causal`: many scenes through the batch forward (VGGT's way to run).

A scene is one forward over all its frames (causal or full attention across them, as `reconstruct
--offline`), so only scenes of one shape (frames, height, width, query points: `offline_groups`) share
a forward. `run_offline_scenes` runs each group in batches of up to `slots` scenes:

* short scenes: a batch [B, S, H, W, 3] is split along the mesh's `data` axis over the local devices
  (the most that divide B), each device running its own scenes whole: no communication, the program of
  a single-scene run per device;
* a long scene, one that does not fit one device, runs alone with its frames split along `seq` over
  the local devices (the most that divide its frame count; ring attention, `stream.sharded`; no
  tracks). Long: more frames than `frames_per_device` when given (`--max-frames-per-device`), else a
  batch whose compiled program needs more memory than a device has available (XLA's memory analysis
  of the compiled data-parallel program).

Every distinct batch shape compiles once. Readers (`many.reader`) decode the next batch's scenes
while the device runs, and one writer thread writes each scene (`io.scene.write_scene`, its report
recording its input) and publishes it while the next batch runs. A scene that cannot run (a frame
that cannot be read, NaN/Inf outputs, tracks asked of a long scene, a device error) fails alone: the
others go on, as in the streaming driver (`many.driver`), whose summary entries and `Stats` these are.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from xsvggt_jax.attention.dispatch import resolve_attention
from xsvggt_jax.attention.masks import FrameCausal, Full
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.io.outputs import ExportOptions
from xsvggt_jax.io.scene import write_scene
from xsvggt_jax.many.driver import Stats
from xsvggt_jax.many.reader import Reader
from xsvggt_jax.many.scenes import REPORT, Job, pool_key, record_identity, summary_entry
from xsvggt_jax.nn.model import StreamVGGT
from xsvggt_jax.runtime import device_available_bytes
from xsvggt_jax.stream.loop import Progress
from xsvggt_jax.stream.mesh import DATA, SEQ, make_mesh, replicated
from xsvggt_jax.stream.offline import check_finite, offline_result
from xsvggt_jax.stream.sharded import offline_sharded

log = logging.getLogger(__name__)


def offline_groups(jobs: Sequence[Job]) -> dict[tuple[int, int, int, int], list[Job]]:
    """{(frames, H, W, query points): the jobs of that shape} in first-appearance order."""
    groups: dict[tuple, list[Job]] = collections.defaultdict(list)
    for job in jobs:
        groups[(job.source.num_frames, *pool_key(job.source))].append(job)
    return dict(groups)


def _divisor(n: int, most: int) -> int:
    """The largest d <= most dividing n."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


@dataclasses.dataclass(eq=False)
class _Scene:
    """A job with its frames read ([S, H, W, 3] float32) and when it started."""
    job: Job
    frames: np.ndarray
    started: float


@dataclasses.dataclass(eq=False)
class _Program:
    """A compiled forward over a mesh: what `run_offline_scenes` runs a batch with. devices: those a
    scene's frames are split over (1: data parallel); compile_s: its compile time, reported by the
    first forward that runs it (`take_compile_s`)."""
    compiled: object
    params: dict
    sharding: NamedSharding
    attention: str
    devices: int
    compile_s: float

    def take_compile_s(self) -> float:
        seconds, self.compile_s = self.compile_s, 0.0
        return seconds


class _Forwards:
    """Compiled forwards by (batch shape, layout), each compiled once; parameters placed once per mesh."""

    def __init__(self, cfg: ModelConfig, params: dict, devices: list, causal: bool):
        self.cfg, self.params, self.devices, self.causal = cfg, params, devices, causal
        self.programs: dict[tuple, _Program] = {}
        self.placed: dict[tuple, dict] = {}
        self.model = StreamVGGT(cfg)

    def _mesh(self, data: int, seq: int):
        mesh = make_mesh(data, seq, self.devices[:data * seq])
        if (data, seq) not in self.placed:
            self.placed[(data, seq)] = jax.device_put(self.params, replicated(mesh))
        return mesh, self.placed[(data, seq)]

    def data_parallel(self, b: int, s: int, h: int, w: int, nq: int) -> _Program:
        """B scenes split along `data` over the most devices that divide B."""
        key = ("data", b, s, h, w, nq)
        if key not in self.programs:
            d = _divisor(b, len(self.devices))
            mesh, params = self._mesh(d, 1)
            sharding = NamedSharding(mesh, P(DATA))
            model, causal = self.model, self.causal
            fn = jax.jit(lambda p, x, q: model.apply({"params": p}, x, q, causal, method=StreamVGGT.offline))
            x = jax.ShapeDtypeStruct((b, s, h, w, 3), jnp.float32, sharding=sharding)
            q = jax.ShapeDtypeStruct((b, nq, 2), jnp.float32, sharding=sharding) if nq else None
            p = self.cfg.tokens_per_frame(h, w)
            impl = resolve_attention("auto", mask=FrameCausal(p) if causal else Full(), dtype=self.cfg.jnp_dtype,
                                     keys=s * p)
            self.programs[key] = self._compile(fn, params, x, q, sharding, impl, 1)
        return self.programs[key]

    def sequence_parallel(self, s: int, h: int, w: int) -> _Program:
        """One scene, its frames split along `seq` over the most devices that divide them (ring attention)."""
        key = ("seq", s, h, w)
        if key not in self.programs:
            n = _divisor(s, len(self.devices))
            mesh, params = self._mesh(1, n)
            sharding = NamedSharding(mesh, P(DATA, SEQ))
            model, causal = self.model, self.causal
            fn = jax.jit(lambda p, x, q: offline_sharded(p, x, mesh, causal, model=model, impl="ring"))
            x = jax.ShapeDtypeStruct((1, s, h, w, 3), jnp.float32, sharding=sharding)
            self.programs[key] = self._compile(fn, params, x, None, sharding, "ring", n)
        return self.programs[key]

    @staticmethod
    def _compile(fn, params, x, q, sharding, impl: str, devices: int) -> _Program:
        t0 = time.perf_counter()
        compiled = fn.lower(params, x, q).compile()
        return _Program(compiled, params, sharding, impl, devices, time.perf_counter() - t0)


def fits_device(program: _Program, device) -> bool:
    """Whether the compiled program's per-device memory (XLA's analysis: temporaries, outputs and the
    inputs besides the parameters, which are already resident) fits what `device` has available;
    True when either is unknown."""
    available = device_available_bytes(device)
    try:
        stats = program.compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend analyses memory
        stats = None
    if stats is None or available is None:
        return True
    params = sum(x.nbytes for x in jax.tree.leaves(program.params))  # replicated: whole on every device
    need = stats.temp_size_in_bytes + stats.output_size_in_bytes + max(stats.argument_size_in_bytes - params, 0)
    return need <= available


def run_offline_scenes(cfg: ModelConfig, params: dict, jobs: Sequence[Job], exports: ExportOptions, *, causal: bool,
                       slots: Optional[int] = None, prefetch: int = 4, frames_per_device: Optional[int] = None,
                       devices=None, progress: Optional[Progress] = None) -> tuple[list[dict], Stats]:
    """Run `jobs` through the offline forward (see the module docstring) and write each scene with
    `exports`. slots: scenes per forward (default: the local devices); prefetch 0: read each batch's
    frames in the main loop, else the next batch's scenes are read ahead by threads; frames_per_device:
    scenes with more frames run sequence parallel (None: when a batch does not fit a device); devices:
    default this process's local devices. Returns a summary entry per job ("done" or "failed") and the
    loop statistics."""
    devices = list(jax.local_devices() if devices is None else devices)
    slots = slots or len(devices)
    forwards = _Forwards(cfg, params, devices, causal)
    groups = offline_groups(jobs)
    batches = [group[i:i + slots] for group in groups.values() for i in range(0, len(group), slots)]
    results: list[dict] = []
    stats = Stats(pools=len(groups))
    writer = ThreadPoolExecutor(1, thread_name_prefix="xsvggt-writer")
    pending: collections.deque[Future] = collections.deque()
    readers: dict[int, Reader] = {}
    t_start = time.perf_counter()
    try:
        for i, batch in enumerate(batches):
            if prefetch > 0:  # the next batch decodes while this one runs
                for job in (batch + (batches[i + 1] if i + 1 < len(batches) else [])):
                    readers.setdefault(id(job), Reader(job.source, job.source.num_frames))
            t0 = time.perf_counter()
            scenes = [sc for job in batch if (sc := _read(job, readers.pop(id(job), None), results)) is not None]
            stats.frame_wait_s += time.perf_counter() - t0
            for run in _forward(forwards, scenes, frames_per_device, results):
                while len(pending) > 1:  # at most one batch queued behind the one being written
                    t0 = time.perf_counter()
                    pending.popleft().result()
                    stats.writer_wait_s += time.perf_counter() - t0
                pending.append(writer.submit(_write, cfg, exports, causal, *run, results=results))
                stats.steps += 1
                stats.frames += sum(len(sc.frames) for sc in run[0])
                if progress is not None:
                    progress.update(sum(len(sc.frames) for sc in run[0]))
        while pending:
            pending.popleft().result()
    finally:
        for r in readers.values():
            r.close()
        writer.shutdown(wait=True, cancel_futures=True)  # a scene being written completes; the rest never start
        stats.total_s += time.perf_counter() - t_start
    return results, stats


def _read(job: Job, reader: Optional[Reader], results: list) -> Optional[_Scene]:
    """All of a scene's frames, or None when they cannot be read (its failure recorded)."""
    started = time.perf_counter()
    reader = reader or Reader(job.source, 0)
    try:
        frames = []
        for t in range(job.source.num_frames):
            frame = reader.get()
            if frame is None:
                raise ValueError(f"the source ended after {t} of the {job.source.num_frames} frames it announced")
            frames.append(frame)
        return _Scene(job, np.stack(frames), started)
    except ValueError as e:
        _failed(job, e, started, results)
        return None
    finally:
        reader.close()


def _forward(forwards: _Forwards, scenes: list[_Scene], frames_per_device: Optional[int], results: list):
    """Yield (scenes, outputs [B, S, ...] as numpy, device seconds, compile seconds, program) for each
    forward that the batch `scenes` takes: one data-parallel forward, or one sequence-parallel forward
    per scene when they are long. A forward that fails on the device fails its scenes."""
    if not scenes:
        return
    s, h, w = scenes[0].frames.shape[:3]
    nq = pool_key(scenes[0].job.source)[2]
    long = frames_per_device is not None and s > frames_per_device
    try:
        if not long:
            program = forwards.data_parallel(len(scenes), s, h, w, nq)
            long = frames_per_device is None and not fits_device(program, forwards.devices[0])
            if long:
                log.info("%d scenes of %d frames of %dx%d do not fit a device: each runs sequence parallel",
                         len(scenes), s, h, w)
        if long and nq:
            raise ValueError(f"{s} frames do not fit one device, and tracks are not available from the "
                             "frame-sharded forward: give the scene without query points")
    except (ValueError, jax.errors.JaxRuntimeError) as e:
        for sc in scenes:
            _failed(sc.job, e, sc.started, results)
        return
    for group in ([[sc] for sc in scenes] if long else [scenes]):
        try:
            queries = None
            if long:
                program = forwards.sequence_parallel(s, h, w)
            elif nq:
                points = np.stack([sc.job.source.query_points for sc in group]).astype(np.float32)
                queries = jax.device_put(points, program.sharding)
            x = jax.device_put(np.stack([sc.frames for sc in group]), program.sharding)
            t0 = time.perf_counter()
            out = jax.device_get(jax.block_until_ready(program.compiled(program.params, x, queries)))
            yield group, out, time.perf_counter() - t0, program.take_compile_s(), program
        except (ValueError, jax.errors.JaxRuntimeError) as e:
            for sc in group:
                _failed(sc.job, e, sc.started, results)


def _write(cfg: ModelConfig, exports: ExportOptions, causal: bool, scenes: list[_Scene], out: dict, seconds: float,
           compile_s: float, program: _Program, *, results: list) -> None:
    """Write and publish each scene of one forward (in the writer thread); a scene that cannot be
    written fails alone, its staging removed."""
    for b, sc in enumerate(scenes):
        src = sc.job.source
        try:
            preds = {k: np.asarray(v[b], np.float32) for k, v in out.items()}
            check_finite(preds, src.num_frames)
            result = offline_result(preds, sc.frames, src.query_points, causal, compile_s, seconds / len(scenes),
                                    program.attention, program.devices)
            with sc.job.out.staged() as tmp:
                write_scene(tmp, result, src, exports, cfg)
                record_identity(tmp / REPORT, sc.job.scene)
        except (OSError, ValueError) as e:
            _failed(sc.job, e, sc.started, results)
            continue
        elapsed = time.perf_counter() - sc.started
        results.append(summary_entry(sc.job.scene, "done", src.num_frames, elapsed, 0))
        log.info("%s: done, %d frames in %.2f s", sc.job.scene.name, src.num_frames, elapsed)


def _failed(job: Job, error: BaseException, started: float, results: list) -> None:
    results.append(summary_entry(job.scene, "failed", job.source.num_frames, time.perf_counter() - started, None,
                                 str(error)))
    log.warning("%s: failed: %s", job.scene.name, error)
