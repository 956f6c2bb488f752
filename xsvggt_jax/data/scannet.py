"""ScanNet (v2, exported with the ScanNet SensReader) reader for the camera-pose protocol.

Exported layout: ROOT/<scene>/color/<i>.jpg, depth/<i>.png (uint16 mm, 0 invalid), pose/<i>.txt
(4x4 camera-to-world; rows of -inf mark a lost track), intrinsic/intrinsic_color.txt and
intrinsic_depth.txt (4x4, the upper-left 3x3 is K). Protocol (MonST3R's prepare_scannet, read by
upstream's relpose eval): frames sorted by their integer name, [:270:3] (90 frames). A prepared scene
(color_90/frame_XXXX.jpg, depth_90/, pose_90.txt: one camera-to-world matrix per line, 16 numbers)
is read as it is; intrinsics always come from intrinsic/. ONE scene folder may be given instead of ROOT
(`SCANNET_FOLDER`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xsvggt_jax.data.base import (DataError, Dataset, DatasetInfo, Sequence, SequenceFolder, indexed_loader,
                   invert_pose, read_png16, read_rgb, require_dir, require_file, scaled_depth)

SCANNET_FRAMES, SCANNET_STRIDE = 90, 3
SCANNET_INFO = DatasetInfo(name="scannet", depth_scale=1000.0, max_depth=None, tasks=("pose",),
                           sampling=f"frames sorted by index, [:{SCANNET_FRAMES * SCANNET_STRIDE}:{SCANNET_STRIDE}]")
SCANNET_FOLDER = SequenceFolder("ScanNet", ("color/", "color_90/"))


def _read_k(path: Path) -> np.ndarray:
    try:
        m = np.loadtxt(require_file(path, "ScanNet intrinsic"), dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    if m.shape not in ((4, 4), (3, 3)):
        raise DataError(f"{path}: expected a 4x4 or 3x3 matrix, got {m.shape}")
    return m[:3, :3]


def _numeric(folder: Path, suffix: str) -> list[Path]:
    files = [p for p in require_dir(folder, "ScanNet").iterdir() if p.suffix.lower() == suffix]
    try:
        return sorted(files, key=lambda p: int(p.stem))
    except ValueError:
        raise DataError(f"{folder}: file names must be frame numbers (0{suffix}, 1{suffix}, ...)") from None


def _read_pose(path: Path) -> np.ndarray:
    try:
        m = np.loadtxt(require_file(path, "ScanNet pose"), dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    if m.shape != (4, 4):
        raise DataError(f"{path}: expected a 4x4 matrix, got {m.shape}")
    return m


def _mm_depth(path: Path) -> np.ndarray:
    return scaled_depth(read_png16(path), 1000.0)


def read_scannet_scene(scene_dir: Path, frames: int = SCANNET_FRAMES, stride: int = SCANNET_STRIDE) -> Sequence:
    """One exported (or prepared) scene with the pose protocol's 90-frame subset."""
    if (scene_dir / "color_90").is_dir():
        rgb = sorted(p for p in (scene_dir / "color_90").iterdir() if p.suffix.lower() == ".jpg")
        depth = sorted(p for p in require_dir(scene_dir / "depth_90", "ScanNet depth_90").iterdir()
                       if p.suffix.lower() == ".png")
        try:
            flat = np.loadtxt(require_file(scene_dir / "pose_90.txt", "ScanNet pose_90"), dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise DataError(f"{scene_dir / 'pose_90.txt'}: {e}") from None
        if flat.shape[1] != 16:
            raise DataError(f"{scene_dir / 'pose_90.txt'}: expected 16 numbers per line, got {flat.shape[1]}")
        c2w = flat.reshape(-1, 4, 4)
    else:
        rgb = _numeric(scene_dir / "color", ".jpg")[:frames * stride:stride]
        depth = [scene_dir / "depth" / f"{p.stem}.png" for p in rgb]
        c2w = np.stack([_read_pose(scene_dir / "pose" / f"{p.stem}.txt") for p in rgb]) if rgb else np.zeros((0, 4, 4))
        for p in depth:
            require_file(p, "ScanNet depth")
    if not rgb or len(depth) != len(rgb) or len(c2w) != len(rgb):
        raise DataError(f"{scene_dir}: {len(rgb)} colour frames, {len(depth)} depth maps, {len(c2w)} poses")
    n = len(rgb)
    valid = np.isfinite(c2w).all((1, 2))
    k_rgb = _read_k(scene_dir / "intrinsic" / "intrinsic_color.txt")
    k_depth = _read_k(scene_dir / "intrinsic" / "intrinsic_depth.txt")
    return Sequence(name=scene_dir.name, frame_ids=tuple(p.stem for p in rgb), load_rgb=indexed_loader(rgb, read_rgb),
                    load_depth=indexed_loader(depth, _mm_depth), intrinsics=np.repeat(k_rgb[None], n, 0),
                    depth_intrinsics=np.repeat(k_depth[None], n, 0),
                    extrinsics=invert_pose(c2w),
                    info=SCANNET_INFO, pose_valid=valid)


def read_scannet(root: str | Path, scenes: list[str] | None = None) -> Dataset:
    """root: one scene folder (holding color/ or color_90/), read alone; or a folder of them: every
    scene folder in it (or the named `scenes`), sorted."""
    root = require_dir(Path(root), "ScanNet")
    if scenes is None or SCANNET_FOLDER.holds(root):
        dirs = SCANNET_FOLDER.find(root)
    else:
        dirs = tuple(require_dir(root / s, "ScanNet scene") for s in scenes)
    if not dirs:
        raise DataError(f"{root}: no ScanNet scenes requested")
    return Dataset(info=SCANNET_INFO, sequences=tuple(read_scannet_scene(d) for d in dirs))
