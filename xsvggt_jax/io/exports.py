"""Writers for reconstruction outputs (point clouds, trajectories, COLMAP models, depth maps, plots).

Pure numpy functions over StreamVGGT predictions with the frame axis first:
`depth` [S,H,W,1], `depth_conf` [S,H,W], `pts3d_in_other_view` [S,H,W,3], `conf` [S,H,W],
`camera_pose` [S,9] (translation 3, quaternion xyzw 4, field of view h, w 2), frame colours
[S,H,W,3] uint8. `io.outputs.write_outputs` writes them all into an output directory; COLMAP is in
`io.colmap`, plots in `io.plots`.

The camera math (pose encoding -> extrinsics / intrinsics, depth unprojection, quaternions) and its
conventions live in `xsvggt_jax.geometry`.

Every file is written atomically: to a temporary file in the destination directory, then
`os.replace`d over the final name, so a reader never sees a partial file.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xsvggt_jax.geometry import check_cameras, invert_extrinsics, mat_to_quat, squeeze_depth
from xsvggt_jax.io.fsutil import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

TUM_HEADER = "# timestamp tx ty tz qx qy qz qw"


# --------------------------------------------------------------------------------------------
# points


def select_points(points: np.ndarray, conf: np.ndarray, colours: np.ndarray,
                  conf_percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """Confident, finite points [S,H,W,3] with conf [S,H,W] and colours [S,H,W,3] uint8 (`to_uint8`
    of the frames) -> (xyz [M,3] float32, rgb [M,3] uint8).

    Keeps conf >= the `conf_percentile`-th percentile (0..100) of the finite confidences and
    conf > 1e-5 (as the VGGT demo), dropping points with a non-finite coordinate."""
    points = np.asarray(points)
    conf = np.asarray(conf)
    if points.ndim != 4 or points.shape[-1] != 3:
        raise ValueError(f"points must be [S,H,W,3], got {points.shape}")
    if conf.shape != points.shape[:-1]:
        raise ValueError(f"conf must be {points.shape[:-1]}, got {conf.shape}")
    if not 0.0 <= conf_percentile <= 100.0:
        raise ValueError(f"conf_percentile must be in [0, 100], got {conf_percentile}")
    rgb = np.asarray(colours)
    if rgb.shape != points.shape or rgb.dtype != np.uint8:
        raise ValueError(f"colours must be uint8 {points.shape}, got {rgb.dtype} {rgb.shape}")
    finite_conf = np.isfinite(conf)
    mask = finite_conf & np.isfinite(points).all(-1) & (conf > 1e-5)
    if finite_conf.any():
        thres = np.percentile(conf[finite_conf], conf_percentile)
        mask &= conf >= thres
    else:
        thres = float("nan")
    xyz = points[mask].astype(np.float32)
    log.info("kept %d of %d points (conf >= %.4g, percentile %g)", len(xyz), mask.size, thres,
             conf_percentile)
    return xyz, rgb[mask]


def write_ply(path: PathLike, xyz: np.ndarray, rgb: np.ndarray) -> Path:
    """Binary little-endian PLY: vertex x, y, z float32 and red, green, blue uchar."""
    from plyfile import PlyData, PlyElement

    xyz = np.asarray(xyz)
    rgb = np.asarray(rgb)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
        raise ValueError(f"xyz and rgb must both be [M,3], got {xyz.shape} and {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8, got {rgb.dtype}")
    vert = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                     ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for n, name in enumerate("xyz"):
        vert[name] = xyz[:, n]
    for n, name in enumerate(("red", "green", "blue")):
        vert[name] = rgb[:, n]
    ply = PlyData([PlyElement.describe(vert, "vertex")], text=False, byte_order="<")
    out = atomic_write(path, ply.write)
    log.info("wrote %d points to %s", len(xyz), out)
    return out


# --------------------------------------------------------------------------------------------
# trajectories


def _fmt(x: float) -> str:
    return f"{float(x):.10g}"


def write_tum(path: PathLike, extr: np.ndarray, timestamps: Sequence[float] | None = None) -> Path:
    """TUM RGB-D trajectory: `timestamp tx ty tz qx qy qz qw` of each camera-to-world pose."""
    extr = np.asarray(extr, np.float64)
    check_cameras(extr)
    s = extr.shape[0]
    if timestamps is None:
        ts = np.arange(s, dtype=np.float64)
    else:
        ts = np.asarray(timestamps, np.float64)
    if ts.shape != (s,):
        raise ValueError(f"need {s} timestamps, got shape {ts.shape}")
    c2w = invert_extrinsics(extr)
    quat = mat_to_quat(c2w[:, :3, :3])
    lines = [TUM_HEADER]
    for n in range(s):
        vals = [*c2w[n, :, 3], *quat[n]]
        lines.append(f"{ts[n]:.6f} " + " ".join(_fmt(v) for v in vals))
    out = atomic_write_text(path, "\n".join(lines) + "\n")
    log.info("wrote %d poses to %s", s, out)
    return out


# --------------------------------------------------------------------------------------------
# depth


def write_depth(directory: PathLike, depth: np.ndarray, conf: np.ndarray | None = None) -> Path:
    """`depth.npz` (depth [S,H,W] float32, depth_conf, scale), `depth_scale.json` and 16-bit PNGs
    `depth_{i:05d}.png` holding round(depth * scale); scale maps the largest finite depth to
    65535 (depth = png / scale). Non-finite or negative depths are written as 0. Colour-mapped
    previews with a depth colour bar go to `preview/` (`write_depth_previews`). Returns `directory`."""
    directory = Path(directory)
    d = squeeze_depth(depth).astype(np.float32)
    if conf is not None:
        conf = np.asarray(conf, np.float32)
        if conf.shape != d.shape:
            raise ValueError(f"depth_conf must be {d.shape}, got {conf.shape}")
    finite = np.isfinite(d)
    dmax = float(d[finite].max()) if finite.any() else 0.0
    scale = 65535.0 / dmax if dmax > 0 else 1.0
    arrays = {"depth": d, "scale": np.float64(scale)}
    if conf is not None:
        arrays["depth_conf"] = conf

    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "depth.npz", lambda f: np.savez(f, **arrays))
    atomic_write_text(directory / "depth_scale.json",
                       json.dumps({"scale": scale, "unit": "depth = png / scale"}, indent=2) + "\n")

    from PIL import Image

    q = np.where(finite & (d > 0), d.astype(np.float64) * scale, 0.0)
    q = np.clip(np.rint(q), 0, 65535).astype("<u2")
    for n in range(len(q)):
        img = Image.fromarray(q[n])  # uint16 -> mode I;16
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write(directory / f"depth_{n:05d}.png", lambda f, b=buf.getvalue(): f.write(b))
    log.info("wrote %d depth maps (scale %.6g) to %s", len(q), scale, directory)
    write_depth_previews(directory / "preview", d)
    return directory


PREVIEW_CMAP = "turbo"
PREVIEW_RANGE_PERCENTILES = (1.0, 99.0)
PREVIEW_SAMPLES = 1_000_000  # depths drawn (evenly) to estimate the colour range of a long stream


def depth_preview_range(depth: np.ndarray) -> tuple[float, float]:
    """(near, far): the 1st and 99th percentiles of the finite positive depths [S,H,W] (estimated
    from at most 1e6 evenly spaced values), shared by every frame's preview; (0, 1) without any."""
    flat = depth.reshape(-1)
    flat = flat[::max(1, flat.size // PREVIEW_SAMPLES)]
    valid = flat[np.isfinite(flat) & (flat > 0)]
    if not valid.size:
        return 0.0, 1.0
    near, far = (float(v) for v in np.percentile(valid, PREVIEW_RANGE_PERCENTILES))
    return near, far if far > near else near + 1.0


def depth_preview(depth: np.ndarray, near: float, far: float) -> np.ndarray:
    """One depth map [H,W] -> RGB uint8 [H, W + bar, 3]: the map colour-mapped (turbo, near blue to far
    red, clipped to [near, far]; invalid depths black) and, at the right, a colour bar labelled with
    the depths (model units) at its top, middle and bottom."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    cmap = colormaps[PREVIEW_CMAP]
    h, w = depth.shape
    valid = np.isfinite(depth) & (depth > 0)
    t = np.clip((np.where(valid, depth, near) - near) / (far - near), 0.0, 1.0)
    rgb = (cmap(t)[..., :3] * 255).round().astype(np.uint8)
    rgb[~valid] = 0
    font = ImageFont.load_default()
    labels = [f"{v:.3g}" for v in (far, (near + far) / 2, near)]
    label_w = max(int(np.ceil(font.getlength(text))) for text in labels) + 4
    bar_w, gap = max(6, w // 32), 4
    canvas = Image.new("RGB", (w + gap + bar_w + label_w, h), (255, 255, 255))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    ramp = (cmap(np.linspace(1.0, 0.0, h))[:, :3] * 255).round().astype(np.uint8)  # far at the top
    canvas.paste(Image.fromarray(np.repeat(ramp[:, None], bar_w, 1)), (w + gap, 0))
    draw = ImageDraw.Draw(canvas)
    x = w + gap + bar_w + 2
    for text, y, anchor in zip(labels, (0, h / 2, h), ("la", "lm", "ld")):
        draw.text((x, y), text, fill=(0, 0, 0), font=font, anchor=anchor)
    return np.asarray(canvas)


def write_depth_previews(directory: PathLike, depth: np.ndarray) -> Path:
    """Colour-mapped previews `depth_{i:05d}.png` of depth [S,H,W(,1)] in `directory`, one colour
    scale for all frames (`depth_preview_range`). Returns `directory`."""
    from PIL import Image

    directory = Path(directory)
    d = squeeze_depth(depth)
    near, far = depth_preview_range(d)
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(len(d)):
        buf = io.BytesIO()
        Image.fromarray(depth_preview(d[n], near, far)).save(buf, format="PNG")
        atomic_write(directory / f"depth_{n:05d}.png", lambda f, b=buf.getvalue(): f.write(b))
    log.info("wrote %d depth previews (colours %.3g..%.3g) to %s", len(d), near, far, directory)
    return directory
