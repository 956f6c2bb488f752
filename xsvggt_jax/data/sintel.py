"""MPI Sintel reader (video depth and camera pose) and its binary formats.

Layout: ROOT (= training/) final/<seq>/frame_0001.png, depth/<seq>/frame_0001.dpt,
camdata_left/<seq>/frame_0001.cam. `.dpt`: float32 TAG 202021.25, int32 width, int32 height, then
float32 depth [H, W] row-major (little endian). `.cam`: float32 TAG, float64 M [3, 3] (intrinsics),
float64 N [3, 4] (camera-from-world [R | t], OpenCV axes; upstream's pose eval uses it as is).
Protocol: the 14 sequences of upstream's video-depth eval (all frames, final pass); max depth 70.
ONE sequence is given by its frame folder, training/final/<seq> (`SINTEL_FOLDER`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xsvggt_jax.data.base import (DataError, Dataset, DatasetInfo, Sequence, SequenceFolder, indexed_loader, read_rgb,
                                  require_dir, require_file)

TAG_FLOAT = np.float32(202021.25)
SINTEL_SEQUENCES = ("alley_2", "ambush_4", "ambush_5", "ambush_6", "cave_2", "cave_4", "market_2", "market_5",
                    "market_6", "shaman_3", "sleeping_1", "sleeping_2", "temple_2", "temple_3")
SINTEL_INFO = DatasetInfo(name="sintel", depth_scale=None, max_depth=70.0, tasks=("video-depth", "pose"),
                          sampling="14 sequences, every frame, final pass")
SINTEL_FOLDER = SequenceFolder("Sintel", ("*.png",), under="final")


def _check_tag(path: Path, data: bytes) -> None:
    if len(data) < 4 or np.frombuffer(data[:4], "<f4")[0] != TAG_FLOAT:
        raise DataError(f"{path}: wrong tag (expected the float {float(TAG_FLOAT)})")


def read_dpt(path: Path) -> np.ndarray:
    """A Sintel .dpt file -> float32 depth [H, W] (values as stored, no validity handling)."""
    data = require_file(Path(path), "Sintel depth").read_bytes()
    _check_tag(path, data)
    width, height = (int(v) for v in np.frombuffer(data[4:12], "<i4"))
    if width <= 0 or height <= 0 or len(data) != 12 + 4 * width * height:
        raise DataError(f"{path}: header says {width}x{height}, file holds {len(data) - 12} data bytes")
    return np.frombuffer(data[12:], "<f4").reshape(height, width).copy()


def write_dpt(path: Path, depth: np.ndarray) -> None:
    """float32 depth [H, W] -> a Sintel .dpt file (temporary name, renamed when complete)."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W], got {depth.shape}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(np.asarray([TAG_FLOAT], "<f4").tobytes()
                    + np.asarray([depth.shape[1], depth.shape[0]], "<i4").tobytes()
                    + depth.astype("<f4").tobytes())
    tmp.replace(path)


def read_cam(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A Sintel .cam file -> (intrinsics M [3, 3], camera-from-world N [3, 4]) float64."""
    data = require_file(Path(path), "Sintel camera").read_bytes()
    _check_tag(path, data)
    if len(data) != 4 + 8 * 21:
        raise DataError(f"{path}: expected {4 + 8 * 21} bytes, got {len(data)}")
    values = np.frombuffer(data[4:], "<f8")
    return values[:9].reshape(3, 3).copy(), values[9:].reshape(3, 4).copy()


def write_cam(path: Path, intrinsics: np.ndarray, extrinsics: np.ndarray) -> None:
    """(M [3, 3], N [3, 4] camera-from-world) -> a Sintel .cam file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(np.asarray([TAG_FLOAT], "<f4").tobytes()
                    + np.asarray(intrinsics, "<f8").reshape(9).tobytes()
                    + np.asarray(extrinsics, "<f8").reshape(12).tobytes())
    tmp.replace(path)


def _sintel_depth(path: Path) -> np.ndarray:
    d = read_dpt(path)
    return np.where(np.isfinite(d) & (d > 0), d, 0.0).astype(np.float32)


def read_sintel_sequence(root: Path, seq: str) -> Sequence:
    frames = sorted(p for p in require_dir(root / "final" / seq, "Sintel final").iterdir() if p.suffix == ".png")
    if not frames:
        raise DataError(f"{root / 'final' / seq}: no frames")
    depth = [require_file(root / "depth" / seq / f"{p.stem}.dpt", "Sintel depth") for p in frames]
    cams = [read_cam(root / "camdata_left" / seq / f"{p.stem}.cam") for p in frames]
    extr = np.tile(np.eye(4), (len(frames), 1, 1))
    extr[:, :3] = np.stack([c[1] for c in cams])
    return Sequence(name=seq, frame_ids=tuple(p.stem for p in frames), load_rgb=indexed_loader(frames, read_rgb),
                    load_depth=indexed_loader(depth, _sintel_depth), intrinsics=np.stack([c[0] for c in cams]),
                    extrinsics=extr, info=SINTEL_INFO, pose_valid=np.isfinite(extr).all((1, 2)))


def read_sintel(root: str | Path, sequences: tuple[str, ...] | list[str] | None = SINTEL_SEQUENCES) -> Dataset:
    """root: one sequence's frame folder (training/final/<seq>), read alone; or training/: the
    protocol's 14 `sequences` (None: every sequence under final/)."""
    root = require_dir(Path(root), "Sintel training")
    if SINTEL_FOLDER.holds(root):
        return Dataset(info=SINTEL_INFO, sequences=(read_sintel_sequence(root.parent.parent, root.name),))
    if sequences is None:
        sequences = [p.name for p in SINTEL_FOLDER.find(root)]
    elif not SINTEL_FOLDER.inside(root).is_dir():
        raise SINTEL_FOLDER.not_found(root)
    seqs = tuple(read_sintel_sequence(root, s) for s in sequences)
    if not seqs:
        raise DataError(f"{root}: no Sintel sequences")
    return Dataset(info=SINTEL_INFO, sequences=seqs)
