"""TUM RGB-D (incl. TUM-dynamics) and Bonn RGB-D Dynamic readers (both use the TUM file layout).

TUM layout: ROOT/<sequence>/rgb.txt and depth.txt ("timestamp path" lines, '#' comments),
groundtruth.txt ("timestamp tx ty tz qx qy qz qw": camera-to-world), rgb/*.png, depth/*.png (uint16,
5000 per metre, 0 invalid). Pose protocol (MonST3R's prepare_tum, used by upstream's relpose eval):
associate each rgb timestamp with the nearest groundtruth timestamp (greedy, |dt| < 0.02 s), then
take matches[::3][:90]. A prepared sequence (rgb_90/, groundtruth_90.txt, optional depth_90/) is read
as it is. Depth frames are associated with the selected rgb timestamps the same way.

Bonn layout: ROOT/rgbd_bonn_<name>/ as TUM. Video-depth protocol (MonST3R's prepare_bonn): the sorted
rgb/ and depth/ file lists and the groundtruth.txt rows [30:140] (by index, no association), or the
prepared rgb_110/, depth_110/, groundtruth_110.txt. Max depth 70 m.

Either reader also takes ONE sequence folder instead of ROOT (`TUM_FOLDER`, `BONN_FOLDER`).

Intrinsics: the published colour-camera calibration (per freiburg camera for TUM, Bonn's own),
given for 640x480 and scaled to the stored frame size (identity for the real data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xsvggt_jax.data.base import (DataError, Dataset, DatasetInfo, Sequence, SequenceFolder, image_size,
                   indexed_loader, invert_pose, read_png16, read_rgb, require_dir, require_file, scaled_depth,
                   scaled_intrinsics)
from xsvggt_jax.geometry import quat_to_mat, rigid

TUM_DEPTH_SCALE = 5000.0
TUM_STRIDE, TUM_FRAMES, TUM_MAX_DT = 3, 90, 0.02
BONN_SLICE = slice(30, 140)
BONN_SEQUENCES = ("balloon2", "crowd2", "crowd3", "person_tracking2", "synchronous")
TUM_DYNAMICS_SEQUENCES = tuple(f"rgbd_dataset_freiburg3_{a}_{b}" for a in ("sitting", "walking")
                               for b in ("static", "xyz", "halfsphere", "rpy"))
# published calibrations of the colour cameras (fx, fy, cx, cy); ROS default for unknown ones
TUM_INTRINSICS = {"freiburg1": (517.3, 516.5, 318.6, 255.3), "freiburg2": (520.9, 521.0, 325.1, 249.7),
                  "freiburg3": (535.4, 539.2, 320.1, 247.6)}
TUM_DEFAULT_INTRINSICS = (525.0, 525.0, 319.5, 239.5)
BONN_INTRINSICS = (542.822841, 542.576870, 315.593520, 237.756098)

TUM_INFO = DatasetInfo(name="tum", depth_scale=TUM_DEPTH_SCALE, max_depth=None, tasks=("pose",),
                       sampling=f"rgb/groundtruth associated (<{TUM_MAX_DT}s), [::{TUM_STRIDE}][:{TUM_FRAMES}]")
BONN_INFO = DatasetInfo(name="bonn", depth_scale=TUM_DEPTH_SCALE, max_depth=70.0, tasks=("video-depth", "pose"),
                        sampling="sorted frames [30:140] (rgb_110)")
TUM_FOLDER = SequenceFolder("TUM", ("rgb.txt", "rgb_90/"))
BONN_FOLDER = SequenceFolder("Bonn", ("groundtruth.txt", "rgb_110/"))


def _lines(path: Path, what: str):
    """(line number, fields) of each non-comment line of a TUM text file (',' or ' ' separated)."""
    for n, line in enumerate(require_file(path, what).read_text().splitlines(), 1):
        line = line.replace(",", " ").strip()
        if line and not line.startswith("#"):
            yield n, line.split()


def _number(path: Path, n: int, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{path}:{n}: bad {what} {text!r} (not a number)") from None


def read_file_list(path: Path) -> dict[float, list[str]]:
    """A TUM list file ("timestamp value..." lines, '#' comments, ',' or ' ' separated) -> {t: values}."""
    out = {}
    for n, parts in _lines(path, "TUM list"):
        t = _number(path, n, parts[0], "timestamp")
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: timestamp {parts[0]!r} with nothing after it (expected 'timestamp file')")
        out[t] = parts[1:]
    return out


POSE_COLUMNS = ("timestamp", "tx", "ty", "tz", "qx", "qy", "qz", "qw")


def _pose_row(path: Path, n: int, parts: list[str]) -> list[float]:
    """One groundtruth line's fields -> [timestamp, tx ty tz qx qy qz qw]; NaN / inf mark a missing pose,
    a finite quaternion of (near) zero length is refused."""
    if len(parts) != len(POSE_COLUMNS):
        raise DataError(f"{path}:{n}: expected {len(POSE_COLUMNS)} columns ({' '.join(POSE_COLUMNS)}), "
                        f"got {len(parts)}")
    row = [_number(path, n, x, c) for x, c in zip(parts, POSE_COLUMNS)]
    q = np.asarray(row[4:])
    if np.isfinite(q).all() and np.linalg.norm(q) < 1e-6:
        raise DataError(f"{path}:{n}: zero quaternion (qx qy qz qw = {' '.join(parts[4:])}) is not a rotation")
    return row


def read_pose_list(path: Path) -> dict[float, list[float]]:
    """A TUM groundtruth file -> {timestamp: [tx ty tz qx qy qz qw]} (each line checked, see `_pose_row`)."""
    out = {}
    for n, parts in _lines(path, "TUM groundtruth"):
        row = _pose_row(path, n, parts)
        out[row[0]] = row[1:]
    return out


def associate(first: list[float], second: list[float], max_difference: float = TUM_MAX_DT,
              offset: float = 0.0) -> list[tuple[float, float]]:
    """TUM's greedy timestamp association: candidate pairs with |a - (b + offset)| < max_difference,
    taken in order of increasing difference, each timestamp used once; result sorted by `first`."""
    a = np.asarray(first, np.float64)
    b = np.asarray(second, np.float64)
    if a.size == 0 or b.size == 0:
        return []
    diff = np.abs(a[:, None] - (b[None, :] + offset))
    ia, ib = np.nonzero(diff < max_difference)
    order = np.argsort(diff[ia, ib], kind="stable")
    used_a, used_b, matches = set(), set(), []
    for k in order:
        i, j = int(ia[k]), int(ib[k])
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matches.append((first[i], second[j]))
    return sorted(matches)


def tum_rows_to_extrinsics(rows: np.ndarray) -> np.ndarray:
    """TUM pose rows [N, 7] (tx ty tz qx qy qz qw, camera-to-world) -> camera-from-world [N, 4, 4]."""
    return invert_pose(rigid(quat_to_mat(rows[:, 3:7]), rows[:, :3]))


def _tum_depth(path: Path) -> np.ndarray:
    return scaled_depth(read_png16(path), TUM_DEPTH_SCALE)


def _intrinsics(name: str, first_rgb: Path, n: int, table: tuple[float, float, float, float] | None = None
                ) -> np.ndarray:
    """The published calibration (for 640x480) scaled to the stored frame size, repeated [n, 3, 3]."""
    if table is None:
        table = next((v for k, v in TUM_INTRINSICS.items() if k in name), TUM_DEFAULT_INTRINSICS)
    fx, fy, cx, cy = table
    k = scaled_intrinsics(np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]]), image_size(first_rgb), (640, 480))
    return np.repeat(k[None], n, 0)


def _read_pose_rows(path: Path) -> np.ndarray:
    """groundtruth*.txt -> [N, 8] (timestamp, tx ty tz qx qy qz qw)."""
    rows = [_pose_row(path, n, parts) for n, parts in _lines(path, "TUM groundtruth")]
    return np.array(rows, np.float64).reshape(-1, len(POSE_COLUMNS))


def _sorted_pngs(folder: Path) -> list[Path]:
    """The .png files of a frame folder, sorted by name; an empty folder is refused."""
    out = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not out:
        raise DataError(f"{folder}: no .png frames in this folder")
    return out


def _sequence(name: str, rgb: list[Path], depth: list[Path] | None, rows: np.ndarray, info: DatasetInfo,
              intrinsics: np.ndarray) -> Sequence:
    if len(rows) != len(rgb) or (depth is not None and len(depth) != len(rgb)):
        raise DataError(f"{name}: {len(rgb)} images, {len(rows)} poses, "
                        f"{'no' if depth is None else len(depth)} depth maps")
    return Sequence(name=name, frame_ids=tuple(p.stem for p in rgb), load_rgb=indexed_loader(rgb, read_rgb),
                    load_depth=None if depth is None else indexed_loader(depth, _tum_depth),
                    intrinsics=intrinsics, extrinsics=tum_rows_to_extrinsics(rows[:, 1:]), info=info,
                    pose_valid=np.isfinite(rows).all(1), timestamps=rows[:, 0].copy())


def read_tum_sequence(seq_dir: Path, stride: int = TUM_STRIDE, frames: int = TUM_FRAMES) -> Sequence:
    """One TUM sequence with the pose protocol's subset (prepared rgb_90/ when present)."""
    k_name = seq_dir.name
    if (seq_dir / "rgb_90").is_dir():
        rgb = _sorted_pngs(seq_dir / "rgb_90")
        depth = _sorted_pngs(seq_dir / "depth_90") if (seq_dir / "depth_90").is_dir() else None
        rows = _read_pose_rows(seq_dir / "groundtruth_90.txt")
        return _sequence(k_name, rgb, depth, rows, TUM_INFO, _intrinsics(k_name, rgb[0], len(rgb)))
    rgb_list = read_file_list(seq_dir / "rgb.txt")
    gt_list = read_pose_list(seq_dir / "groundtruth.txt")
    matches = associate(list(rgb_list), list(gt_list))[::stride][:frames]
    if not matches:
        raise DataError(f"{seq_dir}: no rgb / groundtruth timestamps within {TUM_MAX_DT}s")
    rgb = [seq_dir / rgb_list[a][0] for a, _ in matches]
    rows = np.array([[b] + gt_list[b] for _, b in matches], np.float64)
    depth = None
    if (seq_dir / "depth.txt").is_file():
        depth_list = read_file_list(seq_dir / "depth.txt")
        pairs = dict(associate([a for a, _ in matches], list(depth_list)))
        missing = [a for a, _ in matches if a not in pairs]
        if missing:
            raise DataError(f"{seq_dir}: no depth frame within {TUM_MAX_DT}s of rgb timestamp {missing[0]:.6f}")
        depth = [seq_dir / depth_list[pairs[a]][0] for a, _ in matches]
    for p in rgb + (depth or []):
        require_file(p, "TUM frame")
    return _sequence(k_name, rgb, depth, rows, TUM_INFO, _intrinsics(k_name, rgb[0], len(rgb)))


def read_tum(root: str | Path, sequences: list[str] | None = None) -> Dataset:
    """root: one sequence folder (holding rgb.txt or rgb_90/), read alone; or a folder of them: every
    such folder in it (or the named `sequences`; for TUM-dynamics pass `TUM_DYNAMICS_SEQUENCES`), in
    sorted order (`sequences` applies to a folder of them only)."""
    root = require_dir(Path(root), "TUM")
    if sequences is None or TUM_FOLDER.holds(root):
        dirs = TUM_FOLDER.find(root)
    else:
        dirs = tuple(require_dir(root / s, "TUM sequence") for s in sequences)
    if not dirs:
        raise DataError(f"{root}: no TUM sequences requested")
    return Dataset(info=TUM_INFO, sequences=tuple(read_tum_sequence(d) for d in dirs))


def _bonn_window(path: Path, items, what: str):
    """items[30:140], refused when the sequence is shorter than the protocol's window."""
    if len(items) < BONN_SLICE.stop:
        raise DataError(f"{path}: {len(items)} {what}, the Bonn protocol takes [{BONN_SLICE.start}:{BONN_SLICE.stop}] "
                        f"and needs at least {BONN_SLICE.stop}")
    return items[BONN_SLICE]


def read_bonn_sequence(seq_dir: Path) -> Sequence:
    """One Bonn sequence, frames [30:140] (prepared rgb_110/ when present)."""
    if (seq_dir / "rgb_110").is_dir():
        rgb = _sorted_pngs(seq_dir / "rgb_110")
        depth = _sorted_pngs(require_dir(seq_dir / "depth_110", "Bonn depth_110"))
        rows = _read_pose_rows(seq_dir / "groundtruth_110.txt")
    else:
        rgb = _bonn_window(seq_dir / "rgb", _sorted_pngs(require_dir(seq_dir / "rgb", "Bonn rgb")), "frames")
        depth = _bonn_window(seq_dir / "depth", _sorted_pngs(require_dir(seq_dir / "depth", "Bonn depth")),
                             "depth maps")
        gt = seq_dir / "groundtruth.txt"
        rows = _bonn_window(gt, _read_pose_rows(gt), "poses")
    k = _intrinsics(seq_dir.name, rgb[0], len(rgb), BONN_INTRINSICS)
    return _sequence(seq_dir.name, rgb, depth, rows, BONN_INFO, k)


def read_bonn(root: str | Path, sequences: tuple[str, ...] | list[str] = BONN_SEQUENCES) -> Dataset:
    """root: one sequence folder (holding groundtruth.txt or rgb_110/), read alone; or a folder of
    them: the protocol's `sequences` (its rgbd_bonn_<name> folders)."""
    root = require_dir(Path(root), "Bonn")
    if BONN_FOLDER.holds(root):
        return Dataset(info=BONN_INFO, sequences=(read_bonn_sequence(root),))
    dirs = [root / f"rgbd_bonn_{s}" for s in sequences]
    if dirs and not any(d.is_dir() for d in dirs):
        raise BONN_FOLDER.not_found(root, also=f" named {', '.join(d.name for d in dirs)}")
    seqs = tuple(read_bonn_sequence(require_dir(d, "Bonn sequence")) for d in dirs)
    if not seqs:
        raise DataError(f"{root}: no Bonn sequences requested")
    return Dataset(info=BONN_INFO, sequences=seqs)
