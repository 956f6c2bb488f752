"""The streaming reconstruction driver behind `xsvggt reconstruct` / `xsvggt demo`.

Frames come from a lazy `FrameSource`; every frame goes through the jitted `step`; per-frame outputs
are written into memory-mapped `.npy` files (a 10,000-frame stream never sits in memory). With a state
directory the stream is checkpointed every K frames and can be resumed: the resumed outputs are
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .cache import CacheConfig, cache_report, init_cache
from .config import ModelConfig
from .io.state import StateError, load_state, read_meta, save_state
from .step import make_step

log = logging.getLogger(__name__)

OUTPUT_SHAPES = {  # per frame, for H x W frames and N queries
    "pts3d_in_other_view": lambda h, w, n: (h, w, 3), "conf": lambda h, w, n: (h, w),
    "depth": lambda h, w, n: (h, w, 1), "depth_conf": lambda h, w, n: (h, w),
    "camera_pose": lambda h, w, n: (9,),
    "track": lambda h, w, n: (n, 2), "vis": lambda h, w, n: (n,), "track_conf": lambda h, w, n: (n,),
}
TRACK_KEYS = ("track", "vis", "track_conf")


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
                arr = np.lib.format.open_memmap(path, mode="r+")
                if arr.shape != shape:
                    raise StateError(f"{path} has shape {arr.shape}, expected {shape}")
            else:
                arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            self.arrays[k] = arr
        # the frames' colours (uint8), for coloured point clouds; not a prediction
        rgb_path, rgb_shape = self.directory / "rgb.u8.npy", (frames, height, width, 3)
        self.rgb = (np.lib.format.open_memmap(rgb_path, mode="r+") if reopen else
                    np.lib.format.open_memmap(rgb_path, mode="w+", dtype=np.uint8, shape=rgb_shape))

    def write(self, t: int, out: dict, frame: np.ndarray) -> None:
        for k, arr in self.arrays.items():
            arr[t] = np.asarray(out[k][0], np.float32)
        self.rgb[t] = np.clip(np.rint(frame.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)

    def flush(self) -> None:
        for arr in (*self.arrays.values(), self.rgb):
            arr.flush()


@dataclasses.dataclass
class StreamRun:
    predictions: dict          # name -> [S, ...] float32 (memory maps)
    rgb: np.ndarray            # [S, H, W, 3] uint8 frame colours (memory map)
    latency_s: list            # per frame, device-synchronised (the first includes compilation)
    cache_bytes: list          # per frame
    cache_info: dict           # cache_report of the final cache
    frames: int


def _progress(total: Optional[int], quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="frame", dynamic_ncols=True, leave=True)


def stream_frames(cfg: ModelConfig, cache_cfg: CacheConfig, params: dict, frames: Iterable[np.ndarray],
                  num_frames: int, hw: tuple[int, int], query_points: Optional[np.ndarray], work_dir: Path, *,
                  state_dir: Optional[Path] = None, save_every: int = 0, resume: bool = False,
                  quiet: bool = True, meta: Optional[dict] = None) -> StreamRun:
    """Run `num_frames` frames ([3, H, W] float32 each) through the streaming step.

    Outputs go to memory maps under `work_dir` (or `state_dir/outputs` when checkpointing, so they
    survive an interruption). `resume=True` continues from `state_dir`.
    """
    h, w = hw
    nq = 0 if query_points is None else len(query_points)
    qp = None if query_points is None else jnp.asarray(query_points, jnp.float32)[None]
    fresh = lambda: init_cache(cfg, cache_cfg, 1, hw, max_frames=num_frames, query_points=qp)
    meta = dict(meta or {})
    out_dir = (state_dir / "outputs") if state_dir is not None else work_dir
    start, latency, nbytes = 0, [], []
    if resume:
        if state_dir is None:
            raise StateError("resume needs a state directory")
        saved = read_meta(state_dir / "checkpoint")
        for key in ("model", "cache", "frames", "height", "width", "queries"):
            if key in meta and saved.get(key) != meta[key]:
                raise StateError(f"{state_dir} was saved with {key}={saved.get(key)!r}, this run has {meta[key]!r}")
        cache, saved = load_state(state_dir / "checkpoint", fresh())
        start, latency, nbytes = saved["frames_done"], saved["latency_s"], saved["cache_bytes"]
        store = PredictionStore(out_dir, num_frames, h, w, nq, reopen=True)
        log.info("resuming %s at frame %d of %d", state_dir, start, num_frames)
    else:
        cache = fresh()
        store = PredictionStore(out_dir, num_frames, h, w, nq)
    step_fn = make_step(cfg, cache_cfg)
    info = cache_report(cfg, cache_cfg, cache)  # every array has a fixed shape: the bytes never change
    bar = _progress(num_frames, quiet)
    if bar is not None:
        bar.update(start)
    frames = iter(frames)
    for _ in range(start):  # sources are lazy: skipping decodes, but keeps nothing
        next(frames)
    t = start
    for frame in frames:
        if t >= num_frames:
            raise ValueError(f"the source yielded more than the {num_frames} frames it announced")
        t0 = time.perf_counter()
        cache, out = step_fn(params, cache, jnp.asarray(frame.transpose(1, 2, 0))[None])
        out = jax.block_until_ready(out)
        latency.append(time.perf_counter() - t0)
        store.write(t, out, frame)
        nbytes.append(info["cache_bytes"])
        t += 1
        if bar is not None:
            bar.set_postfix(fill=f"{int(cache.global_len)} tok", cache=f"{info['cache_bytes'] / 2**20:.1f} MB",
                            refresh=False)
            bar.update(1)
        if state_dir is not None and save_every and (t % save_every == 0) and t < num_frames:
            store.flush()
            save_state(state_dir / "checkpoint", cache,
                       {**meta, "frames_done": t, "latency_s": latency, "cache_bytes": nbytes})
    if bar is not None:
        bar.close()
    if t != num_frames:
        raise ValueError(f"the source ended after {t} of the {num_frames} frames it announced")
    store.flush()
    return StreamRun(store.arrays, store.rgb, latency, nbytes, info, t)
