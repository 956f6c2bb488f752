"""7-Scenes and Neural RGB-D (NRGBD) readers for the 3D-reconstruction protocol (keyframes of a
full sequence; upstream StreamVGGT `src/eval/mv_recon/data.py` with `kf_every` 200 / 500).

7-Scenes layout: ROOT/<scene>/TestSplit.txt (lines "sequence2"), ROOT/<scene>/seq-02/
frame-000000.color.png, frame-000000.depth.proj.png (uint16 mm, 65535 invalid; the depth registered to
the colour camera, as upstream reads it; plain .depth.png is used when no .proj file exists) and
frame-000000.pose.txt (4x4 camera-to-world). Intrinsics fx = fy = 525, (cx, cy) = (320, 240) for
640x480 (upstream's SimpleRecon values), scaled to the stored size. Without .proj files the raw depth
is read with `depth_intrinsics` fx = fy = 585 (the dataset's KinectFusion default for the depth
camera), and a warning: the raw depth is not registered to the colour frames.

NRGBD layout: ROOT/<scene>/images/img{i}.png, depth/depth{i}.png (uint16 mm), poses.txt (4 lines
per frame, camera-to-world in OpenGL axes; a line with "nan" marks a missing pose). Intrinsics
fx = fy = 554.2562584220408, (cx, cy) = (320, 240) for 640x480, scaled to the stored size.
Both: depth beyond 10 m or below 1 mm is invalid (as upstream). Either reader also takes ONE sequence
folder instead of ROOT: a 7-Scenes scene folder (its split's sequences) or seq-XX folder (that
sequence), an NRGBD scene folder (`SEVEN_SCENES_FOLDER`, `seven_scenes_scene_folder`, `NRGBD_FOLDER`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from xsvggt_jax.data.base import (DataError, Dataset, DatasetInfo, Sequence, SequenceFolder, image_size, indexed_loader,
                   invert_pose, read_png16, read_rgb, require_dir, require_file, scaled_depth, scaled_intrinsics)

log = logging.getLogger(__name__)

SEVEN_SCENES_KF_EVERY = 200
NRGBD_KF_EVERY = 500
_REF_SIZE = (640, 480)
SEVEN_SCENES_K = np.array([[525.0, 0, 320], [0, 525.0, 240], [0, 0, 1]])
SEVEN_SCENES_DEPTH_K = np.array([[585.0, 0, 320], [0, 585.0, 240], [0, 0, 1]])  # raw .depth.png only
NRGBD_K = np.array([[554.2562584220408, 0, 320], [0, 554.2562584220408, 240], [0, 0, 1]])
_NEAR, _FAR = 1e-3, 10.0

SEVEN_SCENES_INFO = DatasetInfo(name="7scenes", depth_scale=1000.0, max_depth=_FAR, tasks=("recon",),
                                sampling=f"test split, every {SEVEN_SCENES_KF_EVERY}th frame")
NRGBD_INFO = DatasetInfo(name="nrgbd", depth_scale=1000.0, max_depth=_FAR, tasks=("recon",),
                         sampling=f"every min({NRGBD_KF_EVERY}, S // 2)th frame")
SEVEN_SCENES_SPLITS = {"test": "TestSplit.txt", "train": "TrainSplit.txt"}
SEVEN_SCENES_FOLDER = SequenceFolder("7-Scenes", ("frame-*.color.png",))  # one seq-XX folder
NRGBD_FOLDER = SequenceFolder("NRGBD", ("images/",))


def seven_scenes_scene_folder(split_file: str) -> SequenceFolder:
    """A 7-Scenes scene folder: it holds the split file (a root's subfolders are all read as scenes)."""
    return SequenceFolder("7-Scenes", (split_file,))


def _mm_depth(path: Path, invalid: int | None) -> np.ndarray:
    return scaled_depth(read_png16(path), 1000.0, invalid=invalid, near=_NEAR, far=_FAR)


def _seven_scenes_sequence(seq_dir: Path, name: str, kf_every: int) -> Sequence:
    num = sum(1 for p in seq_dir.iterdir() if "color" in p.name)  # upstream counts "color" files
    if num == 0:
        raise DataError(f"{seq_dir}: no frame-*.color.png files")
    ids = tuple(f"{i:06d}" for i in range(num))[::kf_every]
    rgb = tuple(require_file(seq_dir / f"frame-{i}.color.png", "7-Scenes colour") for i in ids)
    depth = [seq_dir / f"frame-{i}.depth.proj.png" for i in ids]
    depth_k = None
    if not all(p.is_file() for p in depth):
        # the raw depth is in the (uncalibrated) depth camera: KinectFusion's default intrinsics
        log.warning("%s: no .depth.proj.png files, using the raw .depth.png (depth camera, not registered "
                    "to the colour frames)", seq_dir)
        depth = [require_file(seq_dir / f"frame-{i}.depth.png", "7-Scenes depth") for i in ids]
        depth_k = scaled_intrinsics(SEVEN_SCENES_DEPTH_K, image_size(depth[0]), _REF_SIZE)
        depth_k = np.repeat(depth_k[None], len(ids), 0)
    c2w = np.stack([_read_matrix(require_file(seq_dir / f"frame-{i}.pose.txt", "7-Scenes pose"), 4)
                    for i in ids])
    k = scaled_intrinsics(SEVEN_SCENES_K, image_size(rgb[0]), _REF_SIZE)
    return Sequence(name=name, frame_ids=ids, load_rgb=indexed_loader(rgb, read_rgb),
                    load_depth=indexed_loader(depth, functools.partial(_mm_depth, invalid=65535)),
                    intrinsics=np.repeat(k[None], len(ids), 0), extrinsics=invert_pose(c2w),
                    info=SEVEN_SCENES_INFO, depth_intrinsics=depth_k, pose_valid=np.isfinite(c2w).all((1, 2)))


def _read_matrix(path: Path, rows: int) -> np.ndarray:
    try:
        m = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a matrix ({e})") from None
    if m.shape != (rows, 4):
        raise DataError(f"{path}: expected a {rows}x4 matrix, got {m.shape}")
    return m


def read_7scenes(root: str | Path, split: str = "test", kf_every: int = SEVEN_SCENES_KF_EVERY,
                 scenes: list[str] | None = None) -> Dataset:
    """All sequences of `split` ("test": TestSplit.txt, "train": TrainSplit.txt) of every scene under
    root (or the named `scenes`), keyframes every `kf_every` frames, in sorted scene order. root may
    also be one scene folder (its split's sequences) or one seq-XX folder (that sequence alone)."""
    root = require_dir(Path(root), "7-Scenes")
    split_file = SEVEN_SCENES_SPLITS.get(split)
    if split_file is None:
        raise DataError(f"7-Scenes split must be 'test' or 'train', got {split!r}")
    if SEVEN_SCENES_FOLDER.holds(root):
        seq = _seven_scenes_sequence(root, f"{root.parent.name}/{root.name}", kf_every)
        return Dataset(info=SEVEN_SCENES_INFO, sequences=(seq,))
    scene_folder = seven_scenes_scene_folder(split_file)
    if scenes is not None and not scene_folder.holds(root):
        dirs = tuple(root / s for s in scenes)
    else:
        seq_folder = f", or for {SEVEN_SCENES_FOLDER.pattern} in it (a seq-XX folder)"
        dirs = scene_folder.find(root, every=True, also=seq_folder)
    seqs = []
    for scene_dir in dirs:
        lines = require_file(scene_dir / split_file, "7-Scenes split").read_text().split()
        for line in lines:
            digits = "".join(c for c in line if c.isdigit())
            if not digits:
                raise DataError(f"{scene_dir / split_file}: no sequence number in {line!r}")
            seq = f"seq-{int(digits):02d}"
            seqs.append(_seven_scenes_sequence(require_dir(scene_dir / seq, "7-Scenes sequence"),
                                               f"{scene_dir.name}/{seq}", kf_every))
    if not seqs:
        raise DataError(f"{root}: no 7-Scenes sequences found")
    return Dataset(info=SEVEN_SCENES_INFO, sequences=tuple(seqs))


def read_nrgbd_poses(path: Path) -> np.ndarray:
    """poses.txt -> camera-to-world [N, 4, 4] in OpenGL axes; NaN for a missing pose."""
    lines = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    if len(lines) % 4:
        raise DataError(f"{path}: {len(lines)} lines, not a multiple of 4")
    out = np.empty((len(lines) // 4, 4, 4))
    for k in range(len(out)):
        block = lines[4 * k:4 * k + 4]
        if any("nan" in ln.lower() for _, ln in block):
            out[k] = np.nan
            continue
        for r, (n, ln) in enumerate(block):
            fields = ln.split()
            if len(fields) != 4:
                raise DataError(f"{path}:{n}: pose {k} row {r}: expected 4 numbers, got {len(fields)}")
            try:
                out[k, r] = [float(x) for x in fields]
            except ValueError:
                raise DataError(f"{path}:{n}: pose {k} row {r}: not a number in {ln.strip()!r}") from None
    return out


def gl_to_cv(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world [..., 4, 4] with OpenGL camera axes (y up, z back) -> OpenCV axes."""
    return c2w * np.array([1.0, -1.0, -1.0, 1.0])


def read_nrgbd(root: str | Path, kf_every: int = NRGBD_KF_EVERY, scenes: list[str] | None = None) -> Dataset:
    """Every scene folder under root (or the named `scenes`), keyframes every min(kf_every, S // 2);
    root may also be one scene folder (holding images/), read alone."""
    root = require_dir(Path(root), "NRGBD")
    if scenes is not None and not NRGBD_FOLDER.holds(root):
        dirs = tuple(root / s for s in scenes)
    else:
        dirs = NRGBD_FOLDER.find(root, every=True)
    seqs = []
    for d in dirs:
        scene = d.name
        num = len(list(require_dir(d / "images", "NRGBD images").iterdir()))  # upstream counts all files
        step = max(1, min(kf_every, num // 2))
        idx = list(range(num))[::step]
        c2w_all = read_nrgbd_poses(require_file(d / "poses.txt", "NRGBD poses"))
        if len(c2w_all) < num:
            raise DataError(f"{d / 'poses.txt'}: {len(c2w_all)} poses for {num} images")
        rgb = tuple(require_file(d / "images" / f"img{i}.png", "NRGBD image") for i in idx)
        depth = tuple(require_file(d / "depth" / f"depth{i}.png", "NRGBD depth") for i in idx)
        c2w = gl_to_cv(c2w_all[idx])
        k = scaled_intrinsics(NRGBD_K, image_size(rgb[0]), _REF_SIZE)
        seqs.append(Sequence(name=scene, frame_ids=tuple(str(i) for i in idx),
                             load_rgb=indexed_loader(rgb, read_rgb),
                             load_depth=indexed_loader(depth, functools.partial(_mm_depth, invalid=None)),
                             intrinsics=np.repeat(k[None], len(idx), 0), extrinsics=invert_pose(c2w),
                             info=NRGBD_INFO, pose_valid=np.isfinite(c2w).all((1, 2))))
    if not seqs:
        raise DataError(f"{root}: no NRGBD scenes found")
    return Dataset(info=NRGBD_INFO, sequences=tuple(seqs))
