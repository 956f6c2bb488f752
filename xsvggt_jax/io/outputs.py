"""Everything `xsvggt reconstruct` writes from the predictions into an output directory.

    predictions.npz     the predictions [S, ...], extrinsics [S,3,4], intrinsics [S,3,3] (model
                        frame pixels), timestamps [S] (seconds for video, else frame index)
    points.ply          the confident point cloud
    trajectory.txt      TUM trajectory, stamped with `timestamps`
    colmap/             images/ + sparse/0/ for gsplat / nerfstudio (`io.colmap`)
    depth/              depth.npz, 16-bit PNGs and preview/ colour-mapped PNGs
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from xsvggt_jax.geometry import pose_encoding_to_extri_intri, unproject_depth
from xsvggt_jax.io import exports as ex
from xsvggt_jax.io.colmap import DEFAULT_MAX_POINTS, export_colmap
from xsvggt_jax.io.frames import FrameInfo, FrameSource
from xsvggt_jax.io.fsutil import atomic_write
from xsvggt_jax.errors import ConfigError

log = logging.getLogger(__name__)

POINT_SOURCES = ("depth", "pointmap")


class ExportError(ConfigError):
    """An export option out of range; the message names the option."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """points: cloud from unprojected depth or from the point-map head; conf_percentile: keep points
    at least this confidence percentile (0-100); ply_max_pixels: frames are subsampled so the cloud
    draws from at most this many pixels; colmap_max_points: cap of the COLMAP points (random subset);
    colmap_binary: `.bin` instead of `.txt` model files. Checked on construction (before any work)."""

    points: str = "depth"
    conf_percentile: float = 50.0
    ply_max_pixels: int = 20_000_000
    colmap_max_points: int = DEFAULT_MAX_POINTS
    colmap_binary: bool = False

    def __post_init__(self):
        if self.points not in POINT_SOURCES:
            raise ExportError(f"points must be one of {POINT_SOURCES}, got {self.points!r}")
        if not 0.0 <= self.conf_percentile <= 100.0:
            raise ExportError(f"conf percentile must be in [0, 100], got {self.conf_percentile}")
        if self.ply_max_pixels < 1:
            raise ExportError(f"ply max pixels must be positive, got {self.ply_max_pixels}")
        if self.colmap_max_points < 0:
            raise ExportError(f"colmap max points must be >= 0, got {self.colmap_max_points}")


def frame_times(frames_info: Sequence[FrameInfo]) -> np.ndarray:
    """[S] float64: the frames' presentation times (s) when every frame has one, else 0, 1, 2, ..."""
    times = [fi.time for fi in frames_info]
    if times and all(t is not None for t in times):
        return np.asarray(times, np.float64)
    return np.arange(len(times), dtype=np.float64)


def write_outputs(out_dir: Path, preds: Mapping[str, np.ndarray], rgb: np.ndarray, source: FrameSource,
                  options: ExportOptions = ExportOptions()) -> dict:
    """Write the files listed in the module docstring into `out_dir`.

    preds: name -> [S, ...] (needs camera_pose [S,9], depth [S,H,W,1], depth_conf [S,H,W], and for
    `points="pointmap"` pts3d_in_other_view [S,H,W,3], conf [S,H,W]); rgb [S,H,W,3] uint8 the model
    frames' colours; `source` the FrameSource the frames came from (names, original sizes and
    pictures, times). Returns report entries: points, point_frames_step, colmap_images,
    colmap_points, colmap_dropped_frames."""
    out_dir = Path(out_dir)
    hw = (source.height, source.width)
    extr, intr = pose_encoding_to_extri_intri(np.asarray(preds["camera_pose"]), hw)
    s = len(extr)
    if s != source.num_frames or len(rgb) != s:
        raise ValueError(f"{s} predicted frames, {len(rgb)} colour frames, source has {source.num_frames}")
    times = frame_times(source.frames_info)
    arrays = {**{k: np.asarray(v, np.float32) for k, v in preds.items()}, "extrinsics": extr.astype(np.float32),
              "intrinsics": intr.astype(np.float32), "timestamps": times}
    atomic_write(out_dir / "predictions.npz", lambda f: np.savez(f, **arrays))

    step = max(1, int(np.ceil(s * hw[0] * hw[1] / options.ply_max_pixels)))  # bound the cloud's memory
    idx = np.arange(0, s, step)
    if options.points == "depth":
        pts = unproject_depth(np.asarray(preds["depth"][idx]), extr[idx], intr[idx])
        conf = np.asarray(preds["depth_conf"][idx])
    else:
        pts, conf = np.asarray(preds["pts3d_in_other_view"][idx]), np.asarray(preds["conf"][idx])
    xyz, colours = ex.select_points(pts, conf, np.asarray(rgb[idx]), options.conf_percentile)
    ex.write_ply(out_dir / "points.ply", xyz, colours)
    ex.write_tum(out_dir / "trajectory.txt", extr, times)
    colmap = export_colmap(out_dir / "colmap", extr, intr, source.frames_info, source.iter_originals(), xyz,
                           colours, binary=options.colmap_binary, max_points=options.colmap_max_points)
    ex.write_depth(out_dir / "depth", np.asarray(preds["depth"]), np.asarray(preds["depth_conf"]))
    return {"points": int(len(xyz)), "point_frames_step": step, **colmap}
