"""One interface for every evaluation / training sequence: procedural scenes and dataset readers.

Conventions (all readers convert to these):
- frames are read lazily, one at a time: `Sequence.rgb(i)` -> uint8 [H, W, 3] as stored on disk,
  `Sequence.image(i)` -> float32 [H, W, 3] in [0, 1] (rgb / 255). Resizing to the model's input
  size is NOT done here: pass `Sequence.pil(i)` to `xsvggt_jax.io.frames.preprocess_image`
  (upstream's `load_and_preprocess_images`), which is what the evaluator feeds the model;
- `intrinsics` [S, 3, 3] float64 belong to the RGB frames at their stored size, pixel (u, v) is the
  integer pixel index (as VGGT's `unproject_depth_map_to_point_map`); `depth_intrinsics` when the
  depth maps have another size (ScanNet), else None (= `intrinsics`);
- `extrinsics` [S, 4, 4] float64 camera-from-world, OpenCV axes (x right, y down, z forward);
  `pose_valid` [S] bool marks frames whose ground-truth pose is missing (NaN / inf in the file);
- `Sequence.depth(i)` -> float32 [H, W] z-depth in metres, 0 where invalid (the dataset's own
  invalid code, NaN, inf and the reader's range limits are all mapped to 0).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from xsvggt_jax.errors import InputError
from xsvggt_jax.geometry import homogeneous, invert_extrinsics


class DataError(InputError):
    """Bad data input: a dataset file or folder that cannot be read (the one-line message names it), an
    unknown dataset or preset, an invalid scene size."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Per-dataset facts the evaluator needs.

    name: registry key; depth_scale: stored depth units per metre (1000 for mm PNGs, 5000 for TUM,
    256 for KITTI, None when stored in metres); max_depth: the protocol's evaluation cap in metres
    (None: no cap); tasks: the protocol tasks this dataset serves ("recon", "video-depth", "pose");
    sampling: one line describing the protocol's frame sampling."""

    name: str
    depth_scale: float | None
    max_depth: float | None
    tasks: tuple[str, ...]
    sampling: str


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: identity equality
class Sequence:
    """One ordered sequence of S frames with ground truth (see the module docstring for conventions).

    load_rgb(i) -> uint8 [H, W, 3]; load_depth(i) -> float32 [H', W'] metres, 0 invalid (None: the
    dataset has no depth); intrinsics / depth_intrinsics [S, 3, 3] or None; extrinsics [S, 4, 4]
    camera-from-world or None; pose_valid [S] bool or None; timestamps [S] seconds or None;
    frame_ids: one stable name per frame (file stem or index)."""

    name: str
    frame_ids: tuple[str, ...]
    load_rgb: Callable[[int], np.ndarray]
    load_depth: Callable[[int], np.ndarray] | None
    intrinsics: np.ndarray | None
    extrinsics: np.ndarray | None
    info: DatasetInfo
    depth_intrinsics: np.ndarray | None = None
    pose_valid: np.ndarray | None = None
    timestamps: np.ndarray | None = None

    def __post_init__(self) -> None:
        s = len(self.frame_ids)
        for field in ("intrinsics", "depth_intrinsics"):
            k = getattr(self, field)
            if k is not None and k.shape != (s, 3, 3):
                raise DataError(f"{self.name}: {field} must be [{s}, 3, 3], got {k.shape}")
        if self.extrinsics is not None and self.extrinsics.shape != (s, 4, 4):
            raise DataError(f"{self.name}: extrinsics must be [{s}, 4, 4], got {self.extrinsics.shape}")
        for field in ("pose_valid", "timestamps"):
            v = getattr(self, field)
            if v is not None and v.shape != (s,):
                raise DataError(f"{self.name}: {field} must be [{s}], got {v.shape}")

    def __len__(self) -> int:
        return len(self.frame_ids)

    def rgb(self, i: int) -> np.ndarray:
        """Frame i as stored: uint8 [H, W, 3]."""
        return self.load_rgb(i)

    def pil(self, i: int) -> Image.Image:
        """Frame i as an RGB PIL image, for `xsvggt_jax.io.frames.preprocess_image`."""
        return Image.fromarray(self.rgb(i), "RGB")

    def image(self, i: int) -> np.ndarray:
        """Frame i as float32 [H, W, 3] in [0, 1] at its stored size."""
        return self.rgb(i).astype(np.float32) / np.float32(255.0)

    def depth(self, i: int) -> np.ndarray:
        """Ground-truth z-depth of frame i: float32 [H', W'] metres, 0 where invalid."""
        if self.load_depth is None:
            raise DataError(f"{self.name}: the {self.info.name} dataset has no depth")
        return self.load_depth(i)

    def images(self) -> np.ndarray:
        """All frames: float32 [S, H, W, 3] in [0, 1] (reads every frame)."""
        return np.stack([self.image(i) for i in range(len(self))])

    def depths(self) -> np.ndarray:
        """All depth maps: float32 [S, H', W'] metres, 0 where invalid (reads every frame)."""
        return np.stack([self.depth(i) for i in range(len(self))])


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: identity equality
class Dataset:
    """Ordered sequences of one dataset, already sampled with the protocol's frame sampling."""

    info: DatasetInfo
    sequences: tuple[Sequence, ...]

    def __len__(self) -> int:
        return len(self.sequences)

    def __iter__(self):
        return iter(self.sequences)

    def __getitem__(self, i: int) -> Sequence:
        return self.sequences[i]


# ----------------------------------------------------------------------------------------------
# helpers shared by the readers
# ----------------------------------------------------------------------------------------------

def _load_at(paths: tuple[Path, ...], read: Callable[[Path], np.ndarray], i: int) -> np.ndarray:
    return read(paths[i])


def indexed_loader(paths, read: Callable[[Path], np.ndarray]) -> Callable[[int], np.ndarray]:
    """A lazy frame loader: i -> read(paths[i]) (picklable, reads nothing now)."""
    return functools.partial(_load_at, tuple(paths), read)


def read_rgb(path: Path) -> np.ndarray:
    """An 8-bit colour image file -> uint8 [H, W, 3] (palette / grey / alpha converted to RGB)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def read_png16(path: Path) -> np.ndarray:
    """A 16-bit single-channel PNG -> uint16 [H, W]."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read depth image ({e})") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: depth image must have one channel, got shape {arr.shape}")
    return arr.astype(np.uint16)


def write_png16(path: Path, arr: np.ndarray) -> None:
    """uint16 [H, W] -> a 16-bit greyscale PNG (Pillow mode I;16), written under a temporary name
    and renamed when complete."""
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.dtype != np.uint16:
        raise ValueError(f"write_png16 needs uint16 [H, W], got {arr.dtype} {arr.shape}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")  # uint16 -> mode I;16
    tmp.replace(path)


def scaled_depth(raw: np.ndarray, scale: float, invalid: int | None = None, near: float = 0.0,
                 far: float = np.inf) -> np.ndarray:
    """Stored integer depth [H, W] -> float32 metres = raw / scale, 0 where raw == 0, raw == invalid,
    or the depth falls outside (near, far]."""
    d = raw.astype(np.float64) / scale
    bad = (raw == 0) | ~np.isfinite(d) | (d < near) | (d > far)
    if invalid is not None:
        bad |= raw == invalid
    return np.where(bad, 0.0, d).astype(np.float32)


def invert_pose(pose: np.ndarray) -> np.ndarray:
    """Rigid transforms [..., 4, 4] (or [..., 3, 4]) -> their inverses [..., 4, 4] float64;
    a non-finite input (a missing pose) stays non-finite."""
    with np.errstate(invalid="ignore", over="ignore"):
        return homogeneous(invert_extrinsics(pose))


def scaled_intrinsics(k: np.ndarray, size: tuple[int, int], ref_size: tuple[int, int]) -> np.ndarray:
    """Intrinsics [3, 3] given for a (W, H) = ref_size image -> the same camera at `size` (W, H)."""
    sx, sy = size[0] / ref_size[0], size[1] / ref_size[1]
    return np.diag([sx, sy, 1.0]) @ k


def image_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image file, from its header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


@dataclasses.dataclass(frozen=True)
class SequenceFolder:
    """What makes a folder one sequence of a dataset, so that every reader takes either ONE sequence
    folder or a root of them (`find`).

    dataset: the name in messages ("TUM"); marks: entries a sequence folder holds, any one suffices:
    a file name ("rgb.txt"), a folder name with a trailing "/" ("rgb_90/") or a file glob ("*.png");
    under: where a root keeps its sequence folders when not directly inside it (Sintel training/final/,
    KITTI val_selection_cropped/image_gathered/; a sequence folder given alone must then sit in a folder
    of that name, as it does in the dataset)."""

    dataset: str
    marks: tuple[str, ...]
    under: str | None = None

    @property
    def pattern(self) -> str:
        """The marks as one phrase: "rgb.txt or rgb_90/"."""
        return " or ".join(self.marks)

    def holds(self, path: Path) -> bool:
        """Whether `path` is one sequence folder."""
        if self.under is not None and path.parent.name != self.under:
            return False
        return path.is_dir() and any(_holds(path, m) for m in self.marks)

    def inside(self, root: Path) -> Path:
        """The folder of a root whose subfolders are its sequences."""
        return root / self.under if self.under else root

    def find(self, path: str | Path, every: bool = False, also: str = "") -> tuple[Path, ...]:
        """(path,) when `path` is one sequence folder, else the sequence folders in `inside(path)`, sorted
        by name (every=True: all its subfolders, each then read as a sequence and refused if it is not
        one); when there are none, `not_found(path, also)`."""
        path = require_dir(Path(path), self.dataset)
        if self.holds(path):
            return (path,)
        inside = self.inside(path)
        found = sorted((p for p in inside.iterdir() if p.is_dir() and (every or self.holds(p))),
                       key=lambda p: p.name) if inside.is_dir() else []
        if not found:
            raise self.not_found(path, also)
        return tuple(found)

    def not_found(self, path: Path, also: str = "") -> DataError:
        """The error for a folder that neither is a sequence folder nor holds any; `also`: other layouts
        the reader looked for, as a phrase."""
        where = f" (as {self.under}/<sequence>)" if self.under else ""
        return DataError(f"{path}: no {self.dataset} sequences found: looked for {self.pattern} in {path}{where} "
                         f"and in each folder of {self.inside(path)}{also}")


def _holds(folder: Path, mark: str) -> bool:
    if mark.endswith("/"):
        return (folder / mark[:-1]).is_dir()
    if any(c in mark for c in "*?["):
        return any(p.is_file() for p in folder.glob(mark))
    return (folder / mark).is_file()


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    return path
