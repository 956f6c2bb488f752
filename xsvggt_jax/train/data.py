"""Training batches as a pure function of a data position, so a resumed run sees the same data.

`batch_at(source, position)` returns the batch consumed by train step `position` (0-based): numpy
arrays with a leading batch axis B and a frame axis S:
  images [B,S,H,W,3] in [0, 1], camera_pose [B,S,9], depth [B,S,H,W,1],
  pts3d_in_other_view [B,S,H,W,3], valid [B,S,H,W] (see `targets.supervised_targets`).

Sources:
* procedural: clip b of batch p is `make_scene(SceneConfig(frames=S, height=H, width=W), seed)` with
  seed = seed0 + p * B + b (training seeds); held-out evaluation scenes use seeds from
  `EVAL_SEED_BASE` on, which no training run of fewer than 10^9 clips reaches.
* a dataset reader (`xsvggt_jax.data.load_dataset`): the sequences are cut into windows of S
  consecutive frames (stride S); clip b of batch p is window (p * B + b) mod #windows. Frames are
  preprocessed to width W ("crop" mode), then centre-cropped to H rows.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from xsvggt_jax.data import load_dataset
from xsvggt_jax.data.base import DataError, Dataset
from xsvggt_jax.data.preprocess import preprocess_frame
from xsvggt_jax.data.procedural import SceneConfig, make_scene
from xsvggt_jax.train.targets import supervised_targets

EVAL_SEED_BASE = 1_000_000_000
TARGET_KEYS = ("images", "camera_pose", "depth", "pts3d_in_other_view", "valid")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where clips come from. dataset: "procedural" or a `load_dataset` name (then root is required);
    batch B, frames S, height H, width W; seed: first procedural training seed."""

    dataset: str = "procedural"
    root: Optional[str] = None
    batch: int = 1
    frames: int = 2
    height: int = 28
    width: int = 42
    seed: int = 0

    def __post_init__(self):
        if min(self.batch, self.frames, self.height, self.width) < 1:
            raise DataError(f"batch, frames, height and width must be positive, got {self}")
        if self.dataset != "procedural" and not self.root:
            raise DataError(f"dataset {self.dataset!r} needs a data folder")

    @property
    def scene_config(self) -> SceneConfig:
        return SceneConfig(frames=self.frames, height=self.height, width=self.width)


def procedural_clip(source: DataSource, seed: int) -> dict[str, np.ndarray]:
    """One procedural clip's targets (`supervised_targets`, without "scale")."""
    scene = make_scene(source.scene_config, seed=seed, num_queries=0)
    t = supervised_targets(scene.images, scene.depth, scene.extrinsics, scene.intrinsics)
    return {k: t[k] for k in TARGET_KEYS}


def _centre_rows(x: np.ndarray, rows: int, name: str) -> tuple[np.ndarray, int]:
    """Centre-crop axis 0 ([H, ...]) to `rows`; returns (crop, rows cut at the top)."""
    if x.shape[0] < rows:
        raise DataError(f"{name}: the preprocessed frame has {x.shape[0]} rows, fewer than --size's {rows}")
    top = (x.shape[0] - rows) // 2
    return x[top:top + rows], top


class ReaderClips:
    """Windows of S consecutive frames of a dataset's sequences (each needs depth, intrinsics and
    extrinsics)."""

    def __init__(self, source: DataSource, dataset: Optional[Dataset] = None):
        self.source = source
        self.dataset = dataset if dataset is not None else load_dataset(source.dataset, source.root)
        self.windows = [(i, start) for i, seq in enumerate(self.dataset)
                        for start in range(0, len(seq) - source.frames + 1, source.frames)]
        if not self.windows:
            raise DataError(f"{source.dataset}: no sequence has {source.frames} frames")
        for i in sorted({i for i, _ in self.windows}):
            seq = self.dataset[i]
            if seq.load_depth is None or seq.intrinsics is None or seq.extrinsics is None:
                raise DataError(f"{seq.name}: training needs depth, intrinsics and extrinsics")

    def clip(self, index: int) -> dict[str, np.ndarray]:
        i, start = self.windows[index % len(self.windows)]
        seq, src = self.dataset[i], self.source
        images, depths, ks = [], [], []
        for f in range(start, start + src.frames):
            image, depth, k = preprocess_frame(seq, f, "crop", target=src.width)
            img, top = _centre_rows(image, src.height, f"{seq.name}/{seq.frame_ids[f]}")
            images.append(img)
            depths.append(_centre_rows(depth, src.height, seq.name)[0])
            k = k.copy()
            k[1, 2] -= top
            ks.append(k)
        t = supervised_targets(np.stack(images), np.stack(depths), seq.extrinsics[start:start + src.frames],
                               np.stack(ks))
        return {k: t[k] for k in TARGET_KEYS}


def make_clip_fn(source: DataSource):
    """clip_fn(index) -> one clip's targets, index = position * B + b."""
    if source.dataset == "procedural":
        return lambda index: procedural_clip(source, source.seed + index)
    return ReaderClips(source).clip


def batch_at(clip_fn, source: DataSource, position: int) -> dict[str, np.ndarray]:
    """The batch of train step `position`: clips position * B .. position * B + B - 1, stacked."""
    clips = [clip_fn(position * source.batch + b) for b in range(source.batch)]
    return {k: np.stack([c[k] for c in clips]) for k in TARGET_KEYS}


def eval_clips(source: DataSource, count: int) -> list[tuple[dict[str, np.ndarray], object]]:
    """Held-out procedural scenes at the training size: [(targets, ProceduralScene)] for seeds
    EVAL_SEED_BASE + k, k < count."""
    out = []
    for k in range(count):
        scene = make_scene(source.scene_config, seed=EVAL_SEED_BASE + k, num_queries=0)
        t = supervised_targets(scene.images, scene.depth, scene.extrinsics, scene.intrinsics)
        out.append(({key: t[key] for key in TARGET_KEYS}, scene))
    return out
