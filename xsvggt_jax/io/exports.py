"""Writers for reconstruction outputs (point clouds, trajectories, COLMAP models, depth maps, plots).

Pure numpy functions over StreamVGGT predictions with the frame axis first:
`depth` [S,H,W,1], `depth_conf` [S,H,W], `pts3d_in_other_view` [S,H,W,3], `conf` [S,H,W],
`camera_pose` [S,9] (translation 3, quaternion xyzw 4, field of view h, w 2), `images` [S,3,H,W]
in [0, 1].

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
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from ..pose import quat_to_mat

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

TUM_HEADER = "# timestamp tx ty tz qx qy qz qw"


# --------------------------------------------------------------------------------------------
# atomic writes


def _atomic_write(path: PathLike, writer: Callable[[IO[bytes]], None]) -> Path:
    """Call `writer` on a binary temp file beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; give the usual permissions of a data file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _atomic_write_text(path: PathLike, text: str) -> Path:
    data = text.encode("utf-8")
    return _atomic_write(path, lambda f: f.write(data))


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

    numpy twin of `xsvggt_jax.pose.pose_encoding_to_extri_intri` (float64 arithmetic)."""
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


def images_to_rgb(images: np.ndarray) -> np.ndarray:
    """Images [S,3,H,W] in [0, 1] -> colours [S,H,W,3] uint8."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [S,3,H,W], got {images.shape}")
    rgb = np.nan_to_num(np.moveaxis(images, 1, -1).astype(np.float64), nan=0.0)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def select_points(points: np.ndarray, conf: np.ndarray, images: np.ndarray,
                  conf_percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """Confident, finite points -> (xyz [M,3] float32, rgb [M,3] uint8).

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
    rgb = images_to_rgb(images)
    if rgb.shape[:-1] != points.shape[:-1]:
        raise ValueError(f"images {np.shape(images)} do not match points {points.shape}")
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
    out = _atomic_write(path, ply.write)
    log.info("wrote %d points to %s", len(xyz), out)
    return out


# --------------------------------------------------------------------------------------------
# trajectories and COLMAP


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
    out = _atomic_write_text(path, "\n".join(lines) + "\n")
    log.info("wrote %d poses to %s", s, out)
    return out


def write_colmap_text(directory: PathLike, extr: np.ndarray, intr: np.ndarray,
                      hw: tuple[int, int], xyz: np.ndarray, rgb: np.ndarray,
                      image_names: Sequence[str]) -> Path:
    """COLMAP text model (cameras.txt, images.txt, points3D.txt) in `directory`.

    One PINHOLE camera per frame (camera id = image id = frame index + 1) with the intrinsics as
    given (VGGT's principal point W/2, H/2 is written unchanged); the image pose is the
    camera-from-world extrinsic (COLMAP's convention) with a Hamilton quaternion qw first. Images
    have no 2D points and the 3D points have empty tracks with error 0. Returns `directory`."""
    directory = Path(directory)
    extr = np.asarray(extr, np.float64)
    intr = np.asarray(intr, np.float64)
    _check_cameras(extr, intr)
    s = extr.shape[0]
    h, w = (int(v) for v in hw)
    names = [str(n) for n in image_names]
    if len(names) != s:
        raise ValueError(f"{s} cameras but {len(names)} image names")
    for n in names:
        if not n or any(c.isspace() for c in n):
            raise ValueError(f"COLMAP image names cannot be empty or contain whitespace: {n!r}")
    if len(set(names)) != s:
        raise ValueError("image names must be unique")
    xyz = np.asarray(xyz, np.float64)
    rgb = np.asarray(rgb)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
        raise ValueError(f"xyz and rgb must both be [M,3], got {xyz.shape} and {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8, got {rgb.dtype}")

    cams = ["# Camera list with one line of data per camera:",
            "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
            f"# Number of cameras: {s}"]
    for n in range(s):
        k = intr[n]
        params = " ".join(_fmt(v) for v in (k[0, 0], k[1, 1], k[0, 2], k[1, 2]))
        cams.append(f"{n + 1} PINHOLE {w} {h} {params}")

    quat = mat_to_quat_np(extr[:, :3, :3])  # xyzw
    imgs = ["# Image list with two lines of data per image:",
            "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
            "#   POINTS2D[] as (X, Y, POINT3D_ID)",
            f"# Number of images: {s}, mean observations per image: 0"]
    for n in range(s):
        qx, qy, qz, qw = quat[n]
        vals = " ".join(_fmt(v) for v in (qw, qx, qy, qz, *extr[n, :, 3]))
        imgs.append(f"{n + 1} {vals} {n + 1} {names[n]}")
        imgs.append("")

    pts = ["# 3D point list with one line of data per point:",
           "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
           f"# Number of points: {len(xyz)}, mean track length: 0"]
    for n in range(len(xyz)):
        x, y, z = xyz[n]
        r, g, b = (int(c) for c in rgb[n])
        pts.append(f"{n + 1} {_fmt(x)} {_fmt(y)} {_fmt(z)} {r} {g} {b} 0")

    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(directory / "cameras.txt", "\n".join(cams) + "\n")
    _atomic_write_text(directory / "images.txt", "\n".join(imgs) + "\n")
    _atomic_write_text(directory / "points3D.txt", "\n".join(pts) + "\n")
    log.info("wrote COLMAP model (%d images, %d points) to %s", s, len(xyz), directory)
    return directory


# --------------------------------------------------------------------------------------------
# depth and plots


def write_depth(directory: PathLike, depth: np.ndarray, conf: np.ndarray | None = None) -> Path:
    """`depth.npz` (depth [S,H,W] float32, depth_conf, scale), `depth_scale.json` and 16-bit PNGs
    `depth_{i:05d}.png` holding round(depth * scale); scale maps the largest finite depth to
    65535 (depth = png / scale). Non-finite or negative depths are written as 0. Returns
    `directory`."""
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
    _atomic_write(directory / "depth.npz", lambda f: np.savez(f, **arrays))
    _atomic_write_text(directory / "depth_scale.json",
                       json.dumps({"scale": scale, "unit": "depth = png / scale"}, indent=2) + "\n")

    from PIL import Image

    q = np.where(finite & (d > 0), d.astype(np.float64) * scale, 0.0)
    q = np.clip(np.rint(q), 0, 65535).astype("<u2")
    for n in range(len(q)):
        img = Image.fromarray(q[n])  # uint16 -> mode I;16
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        _atomic_write(directory / f"depth_{n:05d}.png", lambda f, b=buf.getvalue(): f.write(b))
    log.info("wrote %d depth maps (scale %.6g) to %s", len(q), scale, directory)
    return directory


def plot_stream(path: PathLike, latency_s: np.ndarray, cache_bytes: np.ndarray) -> Path:
    """PNG with two panels over frame index: per-frame latency (ms) and cache size (MB, 1e6 B).

    Renders with the Agg canvas through `matplotlib.figure.Figure`, so it works headless and
    leaves pyplot's global backend (and any open figures) alone."""
    # No matplotlib.use("Agg"): the explicit Agg canvas below needs no global backend, and
    # switching it after pyplot is imported would close the caller's open figures.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lat = np.asarray(latency_s, np.float64).reshape(-1) * 1e3
    cache = np.asarray(cache_bytes, np.float64).reshape(-1) / 1e6
    if lat.shape != cache.shape:
        raise ValueError(f"latency {lat.shape} and cache {cache.shape} lengths differ")
    frames = np.arange(len(lat))

    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax_l, ax_c = fig.subplots(2, 1, sharex=True)
    ax_l.plot(frames, lat, marker=".", lw=1)
    ax_l.set_ylabel("latency (ms)")
    ax_l.set_title("per-frame latency")
    ax_l.grid(alpha=0.3)
    ax_c.plot(frames, cache, marker=".", lw=1, color="tab:orange")
    ax_c.set_ylabel("cache (MB)")
    ax_c.set_xlabel("frame")
    ax_c.set_title("KV cache size")
    ax_c.grid(alpha=0.3)
    fig.tight_layout()

    def _save(f):
        fig.savefig(f, format="png")

    out = _atomic_write(path, _save)
    log.info("wrote stream plot (%d frames) to %s", len(lat), out)
    return out
