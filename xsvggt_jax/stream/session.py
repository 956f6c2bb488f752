"""`StreamSession`: the push API. A program that has frames one at a time (a robot, a capture
thread, `xsvggt live`) pushes them and gets each frame's outputs back:

    session = StreamSession(params, cfg, CacheConfig(prune="xstream"), frame_hw=(84, 112))
    out = session.push(frame)          # [H, W, 3] float in [0, 1] -> {"depth": [H, W, 1], ...} on the device
    save_state(path, session.state, meta)   # the cache pytree (orbax, `io.state`)
    recon = session.result()           # the `Reconstruction` that `xsvggt reconstruct` writes (`io.scene`)
    session.reset()                    # a new stream, same compiled step

The step is `step.make_step`'s jitted step, shared by every session of the same model and cache
configuration in the process (`_driver`), so sessions, resets and `warmup` compile it once per frame
size and number of query points. Every method holds one lock: a capture thread may push while another
thread reads `state` or `result()`.

Recording (`record=True`, the default) keeps each frame's outputs and colours on the host, in memory
or, with `work_dir`, appended to files there (memory stays flat over a long stream); `result()` hands
them out as [S, ...] arrays. A frame whose outputs are not finite raises `NonFiniteError` (as
`reconstruct` does) after the cache has moved on.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.cache.core import CacheConfig, StreamCache, cache_report, init_cache
from xsvggt_jax.config import ModelConfig, check_frame_size
from xsvggt_jax.errors import ConfigError, InputError
from xsvggt_jax.io.rgb import to_uint8_rgb
from xsvggt_jax.stream.pipeline import OUTPUT_SHAPES, TRACK_KEYS, NonFiniteError, filled_bytes
from xsvggt_jax.stream.result import Reconstruction, stream_timing
from xsvggt_jax.stream.step import check_cache, make_step

WARMUP_VALUE = 0.5  # the grey frame `warmup` steps a throwaway cache with


class SessionError(InputError):
    """A frame or state the session cannot take, or a result asked of an empty or unrecorded stream."""


@functools.lru_cache(maxsize=8)
def _driver(cfg: ModelConfig, cache_cfg: CacheConfig):
    """One `make_step` driver per configuration: its jit cache is what compiles once."""
    return make_step(cfg, cache_cfg)


class _Recorder:
    """Per-frame host outputs [...] and colours [H, W, 3] uint8, in memory or appended to raw files
    under `directory`; `arrays()` -> name -> [S, ...] (memory maps for files)."""

    def __init__(self, directory: Optional[Path]):
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.frames = 0
        self.meta: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.memory: dict[str, list[np.ndarray]] = {}

    def append(self, values: dict[str, np.ndarray]) -> None:
        for k, v in values.items():
            v = np.ascontiguousarray(v)
            self.meta.setdefault(k, (v.shape, v.dtype))
            if self.directory is None:
                self.memory.setdefault(k, []).append(v)
            else:
                with open(self.directory / f"{k}.raw", "ab") as f:
                    f.write(v.tobytes())
        self.frames += 1

    def arrays(self) -> dict[str, np.ndarray]:
        if self.directory is None:
            return {k: np.stack(v) for k, v in self.memory.items()}
        return {k: np.memmap(self.directory / f"{k}.raw", dtype, "r", shape=(self.frames, *shape))
                for k, (shape, dtype) in self.meta.items()}

    def clear(self) -> None:
        if self.directory is not None:
            for k in self.meta:
                (self.directory / f"{k}.raw").unlink(missing_ok=True)
        self.frames, self.meta, self.memory = 0, {}, {}


class StreamSession:
    """One stream that frames are pushed into (see the module docstring).

    params, cfg: the model (`pretrained.load`, `weights.loading.load_model`); cache_cfg: the streaming
    cache; frame_hw: (H, W) of every frame; query_points: [N, 2] pixels of frame 0 to track (outputs
    then include track / vis / track_conf); max_frames: the capacity of an uncompressed cache
    (prune="none"; required there, ignored when pruning); record / work_dir: see the module docstring.
    """

    def __init__(self, params: Any, cfg: ModelConfig, cache_cfg: CacheConfig, frame_hw: tuple[int, int], *,
                 query_points: Optional[np.ndarray] = None, max_frames: Optional[int] = None,
                 record: bool = True, work_dir: Optional[Path] = None):
        frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
        if not cache_cfg.pruned and not max_frames:
            raise ConfigError("an uncompressed cache (prune 'none') keeps every frame: give max_frames (its "
                              "capacity), or a pruning policy (e.g. prune='xstream')")
        self.cfg, self.cache_cfg, self.frame_hw, self.max_frames = cfg, cache_cfg, frame_hw, max_frames
        self.params, self.record = params, record
        self._step = _driver(cfg, cache_cfg)
        self._lock = threading.RLock()
        self._recorder = _Recorder(work_dir) if record else None
        self.compile_seconds: Optional[float] = None
        self.reset(query_points)

    # ------------------------------------------------------------------------------------ stream
    def _fresh(self) -> StreamCache:
        qp = None if self.query_points is None else jnp.asarray(self.query_points, jnp.float32)[None]
        return init_cache(self.cfg, self.cache_cfg, 1, self.frame_hw, max_frames=self.max_frames, query_points=qp)

    def reset(self, query_points: Optional[np.ndarray] = None) -> None:
        """Start a new stream (tracking `query_points`, if given): an empty cache, nothing recorded."""
        with self._lock:
            qp = None if query_points is None else np.asarray(query_points, np.float32)
            if qp is not None and (qp.ndim != 2 or qp.shape[1] != 2 or not len(qp)):
                raise SessionError(f"query points must be [N, 2] with N >= 1, got shape {qp.shape}")
            check_frame_size(self.cfg, *self.frame_hw, tracks=qp is not None)
            self.query_points = qp
            self._cache = self._fresh()
            self.frames = 0
            self._latency: list[float] = []
            self._filled: list[int] = []
            self._info = cache_report(self.cfg, self.cache_cfg, self._cache)
            if self._recorder is not None:
                self._recorder.clear()

    def _as_frame(self, frame) -> jax.Array:
        shape = tuple(np.shape(frame))
        if shape[:1] == (1,) and len(shape) == 4:
            shape = shape[1:]
        if shape != (*self.frame_hw, 3):
            raise SessionError(f"a frame must be [H, W, 3] = [{self.frame_hw[0]}, {self.frame_hw[1]}, 3] "
                               f"(float in [0, 1]), got shape {tuple(np.shape(frame))}")
        return jnp.asarray(frame).reshape(1, *shape)

    def warmup(self) -> float:
        """Compile the step (if this process has not yet) by stepping a throwaway cache with a grey
        frame; the stream is untouched. Returns the seconds it took."""
        with self._lock:
            start = time.perf_counter()
            frame = jnp.full((1, *self.frame_hw, 3), WARMUP_VALUE, jnp.float32)
            jax.block_until_ready(self._step(self.params, self._fresh(), frame))
            self.compile_seconds = time.perf_counter() - start
            return self.compile_seconds

    def push(self, frame) -> dict:
        """Step the stream with `frame` ([H, W, 3] or [1, H, W, 3] float in [0, 1], numpy or jax) and
        return its outputs (upstream's names, no batch axis; device arrays, ready when recording)."""
        x = self._as_frame(frame)
        with self._lock:
            start = time.perf_counter()
            self._cache, out = self._step(self.params, self._cache, x)
            out = {k: v[0] for k, v in out.items()}
            if self._recorder is not None:
                self._store(out, x[0])
            else:
                jax.block_until_ready(out)
            self._latency.append(time.perf_counter() - start)
            self.frames += 1
            return out

    def _store(self, out: dict, frame: jax.Array) -> None:
        keys = [k for k in OUTPUT_SHAPES if self.query_points is not None or k not in TRACK_KEYS]
        values = {k: np.asarray(out[k], np.float32) for k in keys}
        bad = [k for k, v in values.items() if not np.isfinite(v).all()]
        values["rgb"] = to_uint8_rgb(np.asarray(frame))
        self._recorder.append(values)
        self._filled.append(filled_bytes(self._cache))
        if bad:
            raise NonFiniteError(f"the model produced NaN/Inf at frame {self.frames} (in {', '.join(bad)}): "
                                 "check the weights (and the input)")

    # ------------------------------------------------------------------------------------- state
    @property
    def state(self) -> StreamCache:
        """A copy of the cache pytree now (the step donates its own): save it with orbax
        (`io.state.save_state`); assign a restored one to continue that stream."""
        with self._lock:
            return jax.tree.map(jnp.copy, self._cache)

    @state.setter
    def state(self, cache: StreamCache) -> None:
        check_cache(self.cache_cfg, cache)
        if tuple(cache.frame_hw) != self.frame_hw:
            raise SessionError(f"the state was built for {cache.frame_hw[0]}x{cache.frame_hw[1]} frames, this "
                               f"session takes {self.frame_hw[0]}x{self.frame_hw[1]}")
        with self._lock:
            self._cache = jax.tree.map(jnp.copy, cache)

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache allocates (fixed for the stream)."""
        return int(self._info["cache_bytes"])

    @property
    def filled_bytes(self) -> int:
        """Bytes of the cache in use now (`pipeline.filled_bytes`)."""
        with self._lock:
            return filled_bytes(self._cache)

    def result(self) -> Reconstruction:
        """The frames pushed since the last reset as `reconstruct`'s typed result (`io.scene.write_scene`
        writes it): predictions [S, ...], colours, latency (dispatch to outputs on the host) and cache
        bytes per frame; compile_seconds from `warmup` when it ran."""
        with self._lock:
            if self._recorder is None:
                raise SessionError("this session does not record its frames (record=False): no result")
            if not self.frames:
                raise SessionError("no frame has been pushed since the last reset: no result")
            arrays = self._recorder.arrays()
            rgb = arrays.pop("rgb")
            nq = 0 if self.query_points is None else len(self.query_points)
            result = Reconstruction.streamed(arrays, rgb, nq, list(self._latency), dict(self._info), self.cache_cfg,
                                             filled_bytes=list(self._filled))
            if self.compile_seconds is None:
                return result
            timing = stream_timing([self.compile_seconds, *self._latency])
            return dataclasses.replace(result, compile_seconds=timing["compile_seconds"],
                                       seconds_per_frame=timing["seconds_per_frame"],
                                       total_seconds=float(sum(self._latency)))
