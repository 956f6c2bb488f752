"""The streaming reconstruction driver behind `xsvggt reconstruct` / `xsvggt demo`.

Frames come from a lazy `FrameSource`; every frame goes through the jitted `step` (in
`loop.stream_steps`, the loop `eval` and `reconstruct-many` share); per-frame outputs are written
into memory-mapped `.npy` files (a 10,000-frame stream never sits in memory; their blocks are
reserved up front, so a full disk is an OSError, not a SIGBUS). Every frame's outputs are checked to be
finite (`NonFiniteError` at the first frame that is not). With a state directory the stream is
checkpointed every K frames and can be resumed: the resumed outputs are bit-identical to an
uninterrupted run, and a resume with another input, weights or configuration is refused.

`cache_memory_bytes` / `check_cache_memory` size the cache before it is allocated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.cache.core import CacheConfig, cache_report, init_cache, stored_slots, tree_bytes
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.io.fsutil import format_bytes, preallocate
from xsvggt_jax.io.rgb import to_uint8_rgb
from xsvggt_jax.io.state import CHECKPOINT, OUTPUTS, FrameDigest, StateError, load_state, read_meta, save_state
from xsvggt_jax.runtime import device_available_bytes
from xsvggt_jax.stream.loop import Progress, SingleStream, stream_steps
from xsvggt_jax.stream.result import Reconstruction
from xsvggt_jax.stream.step import make_step
from xsvggt_jax.errors import ResourceError, XsvggtError

log = logging.getLogger(__name__)

OUTPUT_SHAPES = {  # per frame, for H x W frames and N queries
    "pts3d_in_other_view": lambda h, w, n: (h, w, 3), "conf": lambda h, w, n: (h, w),
    "depth": lambda h, w, n: (h, w, 1), "depth_conf": lambda h, w, n: (h, w),
    "camera_pose": lambda h, w, n: (9,),
    "track": lambda h, w, n: (n, 2), "vis": lambda h, w, n: (n,), "track_conf": lambda h, w, n: (n,),
}
TRACK_KEYS = ("track", "vis", "track_conf")
# what a resumed run must share with the checkpoint (the CLI's `meta`), in the order they are reported
RESUME_KEYS = ("weights", "model", "dtype", "precision", "cache", "frames", "height", "width", "queries")


class NonFiniteError(XsvggtError, ValueError):
    """The model produced NaN or Inf (e.g. from NaN weights): the stream stops at that frame."""


class CacheMemoryError(ResourceError):
    """The cache would not fit in the memory available to the device."""


def cache_memory_bytes(cfg: ModelConfig, cache_cfg: CacheConfig, hw: tuple[int, int], num_frames: int,
                       num_queries: int) -> int:
    """Bytes `init_cache` would allocate for this stream (computed abstractly: nothing is allocated)."""
    qp = jax.ShapeDtypeStruct((1, num_queries, 2), jnp.float32) if num_queries else None
    shapes = jax.eval_shape(lambda q: init_cache(cfg, cache_cfg, 1, hw, max_frames=num_frames, query_points=q), qp)
    return tree_bytes(shapes)


def check_cache_memory(cfg: ModelConfig, cache_cfg: CacheConfig, hw: tuple[int, int], num_frames: int,
                       num_queries: int, available: Optional[int] = None) -> int:
    """Raise CacheMemoryError when the cache needs more than the device has available; returns the bytes."""
    need = cache_memory_bytes(cfg, cache_cfg, hw, num_frames, num_queries)
    available = device_available_bytes() if available is None else available
    if available is not None and need > available:
        what = (f"the uncompressed cache for {num_frames} frames" if cache_cfg.prune == "none"
                else f"the cache (budget {cache_cfg.budget} tokens per layer)")
        hint = ("pass --prune xstream --cache-size N to keep N tokens per layer (e.g. 2048), or fewer frames"
                if cache_cfg.prune == "none" else "lower --cache-size or add --quant kcvt")
        raise CacheMemoryError(f"{what} of {hw[0]}x{hw[1]} needs {format_bytes(need)}, but only "
                               f"{format_bytes(available)} is available on {jax.devices()[0].platform}: {hint}")
    return need


def prediction_bytes(num_frames: int, hw: tuple[int, int], num_queries: int) -> int:
    """Bytes of the per-frame memory maps of a stream (predictions float32 + colours uint8)."""
    h, w = hw
    floats = sum(int(np.prod(OUTPUT_SHAPES[k](h, w, num_queries))) for k in OUTPUT_SHAPES
                 if num_queries or k not in TRACK_KEYS)
    return num_frames * (4 * floats + 3 * h * w)


class PredictionStore:
    """Per-frame outputs in `<directory>/<name>.npy` memory maps, [frames, ...] float32."""

    def __init__(self, directory: Path, frames: int, height: int, width: int, queries: int, reopen: bool = False):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        keys = [k for k in OUTPUT_SHAPES if queries or k not in TRACK_KEYS]
        self.arrays = {}
        for k in keys:
            path = self.directory / f"{k}.npy"
            shape = (frames, *OUTPUT_SHAPES[k](height, width, queries))
            if reopen:
                arr = self._reopen(path, shape)
            else:
                arr = self._create(path, np.float32, shape)
            self.arrays[k] = arr
        # the frames' colours (uint8), for coloured point clouds; not a prediction
        rgb_path, rgb_shape = self.directory / "rgb.u8.npy", (frames, height, width, 3)
        self.rgb = (self._reopen(rgb_path, rgb_shape) if reopen else self._create(rgb_path, np.uint8, rgb_shape))

    @staticmethod
    def _create(path: Path, dtype, shape) -> np.memmap:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        preallocate(path)  # ENOSPC now, not SIGBUS at the first write into a hole
        return arr

    @staticmethod
    def _reopen(path: Path, shape) -> np.memmap:
        try:
            arr = np.lib.format.open_memmap(path, mode="r+")
        except (OSError, ValueError) as e:
            raise StateError(f"the saved outputs are damaged or missing ({path}: {e})") from e
        if arr.shape != tuple(shape):
            raise StateError(f"{path} has shape {arr.shape}, expected {tuple(shape)}")
        return arr

    def write(self, t: int, out: dict, frame: np.ndarray) -> list[str]:
        """Store frame t's outputs ([1, ...] each) and colours; returns the names of non-finite outputs."""
        bad = []
        for k, arr in self.arrays.items():
            value = np.asarray(out[k][0], np.float32)
            if not np.isfinite(value).all():
                bad.append(k)
            arr[t] = value
        self.rgb[t] = to_uint8_rgb(frame)
        return bad

    def flush(self) -> None:
        for arr in (*self.arrays.values(), self.rgb):
            arr.flush()


def filled_bytes(cache) -> int:
    """Bytes of the cache's layer slots holding tokens (each layer group's bytes x fill level / slots),
    plus its other arrays: what an uncompressed cache has used so far out of its allocation."""
    total = tree_bytes(cache)
    for layers, length in ((cache.global_kv, cache.global_len), (cache.camera_kv, cache.camera_len)):
        if layers:
            b, slots = tree_bytes(layers), stored_slots(layers[0])
            total -= b - b * min(int(length), slots) // slots
    return total


def _check_resumable(state_dir: Path, saved: dict, meta: dict) -> None:
    differ = [k for k in RESUME_KEYS if k in meta and saved.get(k) != meta[k]]
    if differ:
        raise StateError(f"cannot resume from {state_dir}: it was saved with other {', '.join(differ)} "
                         "than this run (resume with the same input, weights and options)")


def stream_frames(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, frames: Iterable[np.ndarray],
                  num_frames: int, hw: tuple[int, int], query_points: Optional[np.ndarray], work_dir: Path, *,
                  state_dir: Optional[Path] = None, save_every: int = 0, resume: bool = False,
                  quiet: bool = True, meta: Optional[dict] = None, attention: str = "auto") -> Reconstruction:
    """Run `num_frames` frames ([H, W, 3] float32 each) through the streaming step.

    Outputs go to memory maps under `work_dir` (or `state_dir/outputs` when checkpointing, so they
    survive an interruption). `resume=True` continues from `state_dir` after checking that `meta`'s
    RESUME_KEYS and the content of the frames it skips match the checkpoint's. Returns the
    `Reconstruction` (mode "stream"; latency, allocated and filled cache bytes per frame, the resumed
    frames' from the checkpoint). Raises StateError (resume refused / damaged state) and
    NonFiniteError (NaN/Inf outputs). attention: the cached layers' attention (`step`'s option).
    """
    h, w = hw
    nq = 0 if query_points is None else len(query_points)
    qp = None if query_points is None else jnp.asarray(query_points, jnp.float32)[None]
    fresh = lambda: init_cache(cfg, cache_cfg, 1, hw, max_frames=num_frames, query_points=qp)
    meta = dict(meta or {})
    out_dir = (state_dir / OUTPUTS) if state_dir is not None else work_dir
    start, latency, nbytes, filled = 0, [], [], []
    digest = FrameDigest()
    frames = iter(frames)
    if resume:
        if state_dir is None:
            raise StateError("resume needs a state directory")
        saved = read_meta(state_dir / CHECKPOINT)
        _check_resumable(state_dir, saved, meta)
        start = saved["frames_done"]
        for t in range(start):  # sources are lazy: skipping decodes (and hashes), but keeps nothing
            frame = next(frames, None)
            if frame is None:
                raise StateError(f"cannot resume from {state_dir}: the input ended after {t} frames")
            digest.update(frame)
        if digest.hexdigest() != saved.get("input_digest"):
            raise StateError(f"cannot resume from {state_dir}: the input's first {start} frames differ from "
                             "the frames that were checkpointed (another input, or other --resize/--stride/--fps)")
        store = PredictionStore(out_dir, num_frames, h, w, nq, reopen=True)
        cache, saved = load_state(state_dir / CHECKPOINT, fresh())
        latency, nbytes = list(saved["latency_s"]), list(saved["cache_bytes"])
        filled = list(saved.get("filled_bytes", nbytes))
        log.info("resuming %s at frame %d of %d", state_dir, start, num_frames)
    else:
        store = PredictionStore(out_dir, num_frames, h, w, nq)
        cache = fresh()
    stream = SingleStream(make_step(cfg, cache_cfg, attention=attention), params, cache)
    info = cache_report(cfg, cache_cfg, cache)  # every array has a fixed shape: the bytes never change
    progress = Progress(num_frames, quiet, done=start, postfix=lambda: {
        "fill": f"{int(stream.cache.global_len)} tok", "cache": f"{info['cache_bytes'] / 2**20:.1f} MB"})
    t = start
    for s in stream_steps(stream, _announced(frames, start, num_frames), progress=progress):
        latency.append(s.seconds)
        bad = store.write(t, s.out, s.input)
        if bad:
            raise NonFiniteError(f"the model produced NaN/Inf at frame {t} of {num_frames} (in {', '.join(bad)}): "
                                 "check the weights (and the input); no outputs were written")
        digest.update(s.input)
        nbytes.append(info["cache_bytes"])
        filled.append(filled_bytes(stream.cache))
        t += 1
        if state_dir is not None and save_every and (t % save_every == 0) and t < num_frames:
            store.flush()
            save_state(state_dir / CHECKPOINT, stream.cache, {**meta, "frames_done": t, "latency_s": latency,
                                                              "cache_bytes": nbytes, "filled_bytes": filled,
                                                              "input_digest": digest.hexdigest()})
    progress.close()
    if t != num_frames:
        raise ValueError(f"the source ended after {t} of the {num_frames} frames it announced")
    store.flush()
    return Reconstruction.streamed(store.arrays, store.rgb, nq, latency, info, cache_cfg, filled_bytes=filled,
                                   cache_bytes=nbytes)


def _announced(frames: Iterator[np.ndarray], start: int, num_frames: int) -> Iterator[np.ndarray]:
    """`frames` (frame `start` on), refusing one more than the `num_frames` the source announced."""
    for t, frame in enumerate(frames, start):
        if t >= num_frames:
            raise ValueError(f"the source yielded more than the {num_frames} frames it announced")
        yield frame
