"""Writers for reconstruction outputs (point clouds, trajectories, COLMAP models, depth maps, plots).

Pure numpy functions over StreamVGGT predictions with the frame axis first:
`depth` [S,H,W,1], `depth_conf` [S,H,W], `pts3d_in_other_view` [S,H,W,3], `conf` [S,H,W],
`camera_pose` [S,9] (translation 3, quaternion xyzw 4, field of view h, w 2), frame colours
[S,H,W,3] uint8. `io.outputs.write_outputs` writes them all into an output directory; COLMAP is in
`io.colmap`, plots in `io.plots`.

Camera conventions follow upstream VGGT: extrinsics are camera-from-world [R|t] with OpenCV axes
(x right, y down, z forward); intrinsics put the principal point at (W/2, H/2) in pixel-index
coordinates (pixel (x, y) sits at u = x, v = y, no half-pixel offset).

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

from xsvggt_jax.io.fsutil import atomic_write, atomic_write_text
from xsvggt_jax.geometry import quat_to_mat

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

TUM_HEADER = "# timestamp tx ty tz qx qy qz qw"


# --------------------------------------------------------------------------------------------
# cameras


def quat_to_mat_np(q: np.ndarray) -> np.ndarray:
    """Quaternions [..., 4] (x, y, z, w scalar-last; need not be unit) -> rotations [..., 3, 3], float64."""
    return quat_to_mat(np.asarray(q, np.float64))


def mat_to_quat_np(rot: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] (x, y, z, w) with w >= 0.

    Shepperd's method: the component with the largest magnitude (picked from the trace and the
    diagonal) is taken from a square root, the others from off-diagonal sums/differences divided
    by it, so no division by a small number happens (robust at 180-degree rotations)."""
    m = np.asarray(rot, np.float64)
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    tr = m00 + m11 + m22
    with np.errstate(divide="ignore", invalid="ignore"):
        # candidate when w is largest
        w0 = 0.5 * np.sqrt(np.maximum(1.0 + tr, 0.0))
        c0 = np.stack([(m21 - m12) / (4 * w0), (m02 - m20) / (4 * w0), (m10 - m01) / (4 * w0),
                       w0], -1)
        # x largest
        x1 = 0.5 * np.sqrt(np.maximum(1.0 + m00 - m11 - m22, 0.0))
        c1 = np.stack([x1, (m01 + m10) / (4 * x1), (m02 + m20) / (4 * x1),
                       (m21 - m12) / (4 * x1)], -1)
        # y largest
        y2 = 0.5 * np.sqrt(np.maximum(1.0 - m00 + m11 - m22, 0.0))
        c2 = np.stack([(m01 + m10) / (4 * y2), y2, (m12 + m21) / (4 * y2),
                       (m02 - m20) / (4 * y2)], -1)
        # z largest
        z3 = 0.5 * np.sqrt(np.maximum(1.0 - m00 - m11 + m22, 0.0))
        c3 = np.stack([(m02 + m20) / (4 * z3), (m12 + m21) / (4 * z3), z3,
                       (m10 - m01) / (4 * z3)], -1)
    pick = np.argmax(np.stack([tr, m00, m11, m22], -1), -1)
    cands = np.stack([c0, c1, c2, c3], -2)  # [..., 4 candidates, 4]
    q = np.take_along_axis(cands, pick[..., None, None], -2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., 3:4] < 0, -q, q)


def pose_to_extri_intri_np(pose: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pose encoding [..., 9] -> (extrinsics [..., 3, 4] camera-from-world, intrinsics [..., 3, 3]).

    numpy twin of `xsvggt_jax.geometry.pose_encoding_to_extri_intri` (float64 arithmetic)."""
    pose = np.asarray(pose, np.float64)
    if pose.shape[-1] != 9:
        raise ValueError(f"pose encoding must end in 9 values, got shape {pose.shape}")
    h, w = hw
    rot = quat_to_mat_np(pose[..., 3:7])
    extr = np.concatenate([rot, pose[..., :3, None]], -1)
    with np.errstate(divide="ignore"):  # a zero field of view (untrained model) gives an infinite focal
        fy = (h / 2.0) / np.tan(pose[..., 7] / 2.0)
        fx = (w / 2.0) / np.tan(pose[..., 8] / 2.0)
    intr = np.zeros(pose.shape[:-1] + (3, 3), np.float64)
    intr[..., 0, 0] = fx
    intr[..., 1, 1] = fy
    intr[..., 0, 2] = w / 2.0
    intr[..., 1, 2] = h / 2.0
    intr[..., 2, 2] = 1.0
    return extr, intr


def invert_extrinsics(extr: np.ndarray) -> np.ndarray:
    """Camera-from-world [..., 3, 4] -> world-from-camera [..., 3, 4] (R^T, -R^T t)."""
    extr = np.asarray(extr, np.float64)
    rot_t = np.swapaxes(extr[..., :3, :3], -1, -2)
    t = -(rot_t @ extr[..., :3, 3:4])
    return np.concatenate([rot_t, t], -1)


def _check_cameras(extr: np.ndarray, intr: np.ndarray | None = None) -> None:
    if extr.ndim != 3 or extr.shape[1:] != (3, 4):
        raise ValueError(f"extrinsics must be [S,3,4], got {extr.shape}")
    if intr is not None and intr.shape != (extr.shape[0], 3, 3):
        raise ValueError(f"intrinsics must be [{extr.shape[0]},3,3], got {intr.shape}")


# --------------------------------------------------------------------------------------------
# points


def _squeeze_depth(depth: np.ndarray) -> np.ndarray:
    depth = np.asarray(depth)
    if depth.ndim == 4 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 3:
        raise ValueError(f"depth must be [S,H,W,1] or [S,H,W], got {depth.shape}")
    return depth


def unproject_depth(depth: np.ndarray, extr: np.ndarray, intr: np.ndarray) -> np.ndarray:
    """Depth maps [S,H,W,1] -> world points [S,H,W,3] float32.

    camera point = depth * K^-1 [u, v, 1] with u = x, v = y the pixel index (as VGGT's
    `unproject_depth_map_to_point_map`), world = R^T (camera - t)."""
    d = _squeeze_depth(depth).astype(np.float64)
    extr = np.asarray(extr, np.float64)
    intr = np.asarray(intr, np.float64)
    s, h, w = d.shape
    _check_cameras(extr, intr)
    if extr.shape[0] != s:
        raise ValueError(f"{s} depth maps but {extr.shape[0]} cameras")
    v, u = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    pix = np.stack([u, v, np.ones_like(u)], -1)  # [H,W,3]
    rays = np.einsum("sij,hwj->shwi", np.linalg.inv(intr), pix)
    cam = rays * d[..., None]
    rot, t = extr[:, :3, :3], extr[:, :3, 3]
    # R^T (cam - t) as row vectors: (cam - t) @ R
    world = np.einsum("shwi,sij->shwj", cam - t[:, None, None, :], rot)
    return world.astype(np.float32)


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
    _check_cameras(extr)
    s = extr.shape[0]
    if timestamps is None:
        ts = np.arange(s, dtype=np.float64)
    else:
        ts = np.asarray(timestamps, np.float64)
    if ts.shape != (s,):
        raise ValueError(f"need {s} timestamps, got shape {ts.shape}")
    c2w = invert_extrinsics(extr)
    quat = mat_to_quat_np(c2w[:, :3, :3])
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
    d = _squeeze_depth(depth).astype(np.float32)
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
    d = _squeeze_depth(depth)
    near, far = depth_preview_range(d)
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(len(d)):
        buf = io.BytesIO()
        Image.fromarray(depth_preview(d[n], near, far)).save(buf, format="PNG")
        atomic_write(directory / f"depth_{n:05d}.png", lambda f, b=buf.getvalue(): f.write(b))
    log.info("wrote %d depth previews (colours %.3g..%.3g) to %s", len(d), near, far, directory)
    return directory
