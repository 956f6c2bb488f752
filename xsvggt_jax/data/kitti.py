"""KITTI depth (depth_selection/val_selection_cropped) reader for the video-depth protocol.

Depth PNGs are uint16, depth = value / 256 m, 0 invalid (sparse LiDAR ground truth). Two layouts
under ROOT (= val_selection_cropped):
- gathered (what upstream's video-depth eval reads; MonST3R's prepare_kitti, first 110 frames per
  drive): image_gathered/<drive>_sync_<cam>/<frame>.png and groundtruth_depth_gathered/<same>/<frame>.png;
- flat (the official download): image/<drive>_sync_image_<frame>_image_<cam>.png,
  groundtruth_depth/<drive>_sync_groundtruth_depth_<frame>_image_<cam>.png and
  intrinsics/<drive>_sync_image_<frame>_image_<cam>.txt (9 numbers, K row-major); frames are grouped
  into one sequence per <drive>_sync_<cam>, sorted by frame number.
The gathered layout is used when present; its intrinsics are looked up in intrinsics/ (None when
that folder lacks them). KITTI has no poses here. ONE gathered sequence is given by its image folder,
ROOT/image_gathered/<seq> (`KITTI_FOLDER`); the flat layout has no folder per sequence.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from xsvggt_jax.data.base import (DataError, Dataset, DatasetInfo, Sequence, SequenceFolder, indexed_loader, read_png16,
                   read_rgb, require_dir, require_file, scaled_depth)

KITTI_DEPTH_SCALE = 256.0
KITTI_INFO = DatasetInfo(name="kitti", depth_scale=KITTI_DEPTH_SCALE, max_depth=None, tasks=("video-depth",),
                         sampling="every frame of each drive (gathered: the first 110)")
KITTI_FOLDER = SequenceFolder("KITTI", ("*.png",), under="image_gathered")
_FLAT_PATTERN = "image/<drive>_sync_image_<frame>_image_<cam>.png"
_FLAT = re.compile(r"(?P<drive>.+_sync)_(?P<kind>image|groundtruth_depth)_(?P<frame>\d+)_image_(?P<cam>\d+)\.png")


def _kitti_depth(path: Path) -> np.ndarray:
    return scaled_depth(read_png16(path), KITTI_DEPTH_SCALE)


def _read_k(path: Path) -> np.ndarray:
    try:
        values = np.loadtxt(path, dtype=np.float64).reshape(-1)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    if values.size != 9:
        raise DataError(f"{path}: expected 9 numbers (K row-major), got {values.size}")
    return values.reshape(3, 3)


def _intrinsics_file(root: Path, drive: str, frame: str, cam: str) -> Path:
    return root / "intrinsics" / f"{drive}_image_{frame}_image_{cam}.txt"


def _split_seq(seq: str) -> tuple[str, str]:
    m = re.fullmatch(r"(.+_sync)_(\d+)", seq)
    if m is None:
        raise DataError(f"KITTI sequence folder {seq!r} is not named <drive>_sync_<camera>")
    return m.group(1), m.group(2)


def _make(seq: str, frames: list[str], rgb: list[Path], depth: list[Path], k_files: list[Path]) -> Sequence:
    intr = None
    if k_files and all(p.is_file() for p in k_files):
        intr = np.stack([_read_k(p) for p in k_files])
    return Sequence(name=seq, frame_ids=tuple(frames), load_rgb=indexed_loader(rgb, read_rgb),
                    load_depth=indexed_loader(depth, _kitti_depth), intrinsics=intr, extrinsics=None, info=KITTI_INFO)


def _gathered(root: Path, seq_dirs: tuple[Path, ...]) -> list[Sequence]:
    seqs = []
    for seq_dir in seq_dirs:
        drive, cam = _split_seq(seq_dir.name)
        rgb = sorted(p for p in seq_dir.iterdir() if p.suffix == ".png")
        depth = [require_file(root / "groundtruth_depth_gathered" / seq_dir.name / p.name, "KITTI depth") for p in rgb]
        frames = [p.stem for p in rgb]
        seqs.append(_make(seq_dir.name, frames, rgb, depth,
                          [_intrinsics_file(root, drive, f, cam) for f in frames]))
    return seqs


def _flat(root: Path) -> list[Sequence]:
    groups: dict[str, list[tuple[str, Path]]] = {}
    for p in require_dir(root / "image", "KITTI image").iterdir():
        m = _FLAT.fullmatch(p.name)
        if m is None or m["kind"] != "image":
            continue
        groups.setdefault(f"{m['drive']}_{m['cam']}", []).append((m["frame"], p))
    seqs = []
    for seq in sorted(groups):
        drive, cam = _split_seq(seq)
        items = sorted(groups[seq], key=lambda fp: int(fp[0]))
        frames = [f for f, _ in items]
        depth = [require_file(root / "groundtruth_depth" / f"{drive}_groundtruth_depth_{f}_image_{cam}.png",
                              "KITTI depth") for f in frames]
        seqs.append(_make(seq, frames, [p for _, p in items], depth,
                          [_intrinsics_file(root, drive, f, cam) for f in frames]))
    return seqs


def read_kitti(root: str | Path) -> Dataset:
    """root: one gathered sequence folder (image_gathered/<seq>), read alone; or val_selection_cropped:
    every drive in it (gathered layout if image_gathered/ exists, else the flat one)."""
    root = require_dir(Path(root), "KITTI val_selection_cropped")
    if KITTI_FOLDER.holds(root):
        seqs = _gathered(root.parent.parent, (root,))
    elif KITTI_FOLDER.inside(root).is_dir():
        seqs = _gathered(root, KITTI_FOLDER.find(root))
    else:
        seqs = _flat(root) if (root / "image").is_dir() else []
    if not seqs:
        raise KITTI_FOLDER.not_found(root, also=f", or for {_FLAT_PATTERN} (the flat layout)")
    return Dataset(info=KITTI_INFO, sequences=tuple(seqs))
