"""COLMAP export laid out for Gaussian-splatting / NeRF tools (gsplat, nerfstudio).

    colmap/images/<name>          the input images at their original size (hard links, else copies;
                                  video and .npz frames are written as files)
    colmap/sparse/0/cameras.{txt,bin}, images.{txt,bin}, points3D.{txt,bin}

as VGGT's `demo_colmap.py` does: the images keep their own names, every image has its own PINHOLE
camera whose intrinsics are mapped back from the model frame to the original image (undoing the
resize, centre crop and padding of the preprocessing), the points are a capped random subset of the
confident point cloud with empty tracks. gsplat reads it with `--data_dir OUTDIR/colmap`.

Frames whose camera is unusable (a non-finite pose, or a field of view <= 0 giving an infinite or
negative focal length, which COLMAP's `Camera::VerifyParams` rejects) are left out of the model with
a warning.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from xsvggt_jax.geometry import check_cameras, mat_to_quat
from xsvggt_jax.io.exports import PathLike, _fmt
from xsvggt_jax.io.frames import FrameInfo
from xsvggt_jax.io.fsutil import atomic_write

log = logging.getLogger(__name__)

PINHOLE_ID = 1  # COLMAP's CameraModelId of PINHOLE (params fx, fy, cx, cy)
DEFAULT_MAX_POINTS = 100_000


def valid_cameras(extr: np.ndarray, intr: np.ndarray) -> np.ndarray:
    """[S] bool: finite extrinsics [S,3,4] and intrinsics [S,3,3] with positive finite focal lengths."""
    extr, intr = np.asarray(extr, np.float64), np.asarray(intr, np.float64)
    finite = np.isfinite(extr).all((1, 2)) & np.isfinite(intr).all((1, 2))
    with np.errstate(invalid="ignore"):
        return finite & (intr[:, 0, 0] > 0) & (intr[:, 1, 1] > 0)


def colmap_names(names: Sequence[str]) -> list[str]:
    """Image names usable in both COLMAP formats: whitespace (which the text format cannot hold)
    becomes `_`; a clash after that gets a `-<n>` suffix before the extension."""
    out, seen = [], set()
    for name in names:
        clean = re.sub(r"\s", "_", str(name)) or "image"
        stem, ext = os.path.splitext(clean)
        n = 1
        while clean in seen:
            clean, n = f"{stem}-{n}{ext}", n + 1
        seen.add(clean)
        out.append(clean)
    return out


def _check_model(extr, intr, sizes, names, xyz, rgb) -> None:
    check_cameras(extr, intr)
    s = len(extr)
    if len(sizes) != s or len(names) != s:
        raise ValueError(f"{s} cameras but {len(sizes)} sizes and {len(names)} image names")
    for n in names:
        if not n or any(c.isspace() for c in n):
            raise ValueError(f"COLMAP image names cannot be empty or contain whitespace: {n!r}")
    if len(set(names)) != s:
        raise ValueError("image names must be unique")
    bad = ~valid_cameras(extr, intr)
    if bad.any():
        raise ValueError(f"cameras {np.flatnonzero(bad).tolist()} have non-finite values or focal lengths <= 0")
    if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
        raise ValueError(f"xyz and rgb must both be [M,3], got {xyz.shape} and {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8, got {rgb.dtype}")


def _text_model(extr, intr, sizes, names, xyz, rgb) -> dict[str, bytes]:
    s = len(extr)
    cams = ["# Camera list with one line of data per camera:",
            "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
            f"# Number of cameras: {s}"]
    for n, ((w, h), k) in enumerate(zip(sizes, intr)):
        params = " ".join(_fmt(v) for v in (k[0, 0], k[1, 1], k[0, 2], k[1, 2]))
        cams.append(f"{n + 1} PINHOLE {w} {h} {params}")
    quat = mat_to_quat(extr[:, :3, :3])  # xyzw
    imgs = ["# Image list with two lines of data per image:",
            "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
            "#   POINTS2D[] as (X, Y, POINT3D_ID)",
            f"# Number of images: {s}, mean observations per image: 0"]
    for n in range(s):
        qx, qy, qz, qw = quat[n]
        vals = " ".join(_fmt(v) for v in (qw, qx, qy, qz, *extr[n, :, 3]))
        imgs += [f"{n + 1} {vals} {n + 1} {names[n]}", ""]
    pts = ["# 3D point list with one line of data per point:",
           "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
           f"# Number of points: {len(xyz)}, mean track length: 0"]
    pts += [f"{n + 1} {_fmt(x)} {_fmt(y)} {_fmt(z)} {r} {g} {b} 0"
            for n, ((x, y, z), (r, g, b)) in enumerate(zip(xyz.tolist(), rgb.tolist()))]
    return {name: ("\n".join(lines) + "\n").encode()
            for name, lines in (("cameras.txt", cams), ("images.txt", imgs), ("points3D.txt", pts))}


def _binary_model(extr, intr, sizes, names, xyz, rgb) -> dict[str, bytes]:
    """COLMAP's binary format (little-endian; see colmap/scene/reconstruction_io_binary)."""
    s = len(extr)
    cams = io.BytesIO()
    cams.write(struct.pack("<Q", s))
    for n, ((w, h), k) in enumerate(zip(sizes, intr)):
        cams.write(struct.pack("<IiQQ4d", n + 1, PINHOLE_ID, w, h, k[0, 0], k[1, 1], k[0, 2], k[1, 2]))
    quat = mat_to_quat(extr[:, :3, :3])
    imgs = io.BytesIO()
    imgs.write(struct.pack("<Q", s))
    for n in range(s):
        qx, qy, qz, qw = quat[n]
        imgs.write(struct.pack("<I7dI", n + 1, qw, qx, qy, qz, *extr[n, :, 3], n + 1))
        imgs.write(names[n].encode() + b"\0" + struct.pack("<Q", 0))  # name, no 2D points
    rec = np.zeros(len(xyz), np.dtype([("id", "<u8"), ("xyz", "<f8", 3), ("rgb", "u1", 3), ("error", "<f8"),
                                       ("track", "<u8")]))
    rec["id"] = np.arange(1, len(xyz) + 1)
    rec["xyz"], rec["rgb"] = xyz, rgb
    pts = struct.pack("<Q", len(xyz)) + rec.tobytes()
    return {"cameras.bin": cams.getvalue(), "images.bin": imgs.getvalue(), "points3D.bin": pts}


def write_colmap_model(directory: PathLike, extr: np.ndarray, intr: np.ndarray, sizes: Sequence[tuple[int, int]],
                       names: Sequence[str], xyz: np.ndarray, rgb: np.ndarray, *, binary: bool = False) -> Path:
    """A COLMAP model (cameras, images, points3D; `.txt` or `.bin`) in `directory`.

    extr [S,3,4] camera-from-world (COLMAP's image pose, written with a Hamilton quaternion qw
    first), intr [S,3,3] of images of `sizes` [(width, height)] * S: one PINHOLE camera per image
    (camera id = image id = position + 1). xyz [M,3], rgb [M,3] uint8: points with empty tracks and
    error 0. Every camera must be valid (`valid_cameras`). Returns `directory`."""
    directory = Path(directory)
    extr, intr = np.asarray(extr, np.float64), np.asarray(intr, np.float64)
    xyz, rgb = np.asarray(xyz, np.float64), np.asarray(rgb)
    sizes = [(int(w), int(h)) for w, h in sizes]
    names = [str(n) for n in names]
    _check_model(extr, intr, sizes, names, xyz, rgb)
    files = (_binary_model if binary else _text_model)(extr, intr, sizes, names, xyz, rgb)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write(directory / name, lambda f, d=data: f.write(d))
    log.info("wrote COLMAP %s model (%d images, %d points) to %s", "binary" if binary else "text", len(extr),
             len(xyz), directory)
    return directory


def _place_image(original: Path | np.ndarray, dest: Path) -> None:
    """Hard-link (else copy) an original file to `dest`, or encode pixels [h,w,3] uint8 by dest's suffix."""
    if isinstance(original, np.ndarray):
        from PIL import Image

        buf = io.BytesIO()
        fmt = "JPEG" if dest.suffix.lower() in (".jpg", ".jpeg") else "PNG"
        Image.fromarray(original).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        atomic_write(dest, lambda f: f.write(buf.getvalue()))
        return
    def copy(f):
        with open(original, "rb") as src:
            shutil.copyfileobj(src, f)

    try:
        os.link(original, dest)
    except OSError:  # another file system, or links not allowed: copy
        atomic_write(dest, copy)


def export_colmap(directory: PathLike, extr: np.ndarray, intr: np.ndarray, frames_info: Sequence[FrameInfo],
                  originals: Iterable[Path | np.ndarray], xyz: np.ndarray, rgb: np.ndarray, *,
                  binary: bool = False, max_points: int = DEFAULT_MAX_POINTS, seed: int = 0) -> dict:
    """Write `directory/images/` and `directory/sparse/0/` (see the module docstring).

    extr [S,3,4], intr [S,3,3] of the model frames; `frames_info` [S] maps them back to the
    original images, `originals` [S] (`FrameSource.iter_originals()`) supplies the pictures. At most
    `max_points` of xyz [M,3] / rgb [M,3] are kept (a uniform random subset, `seed`). Returns
    {"colmap_images", "colmap_points", "colmap_dropped_frames" (frame indices)}."""
    directory = Path(directory)
    extr, intr = np.asarray(extr, np.float64), np.asarray(intr, np.float64)
    check_cameras(extr, intr)
    if len(frames_info) != len(extr):
        raise ValueError(f"{len(extr)} cameras but {len(frames_info)} frame infos")
    if max_points < 0:
        raise ValueError(f"max_points must be >= 0, got {max_points}")
    keep = valid_cameras(extr, intr)
    dropped = np.flatnonzero(~keep).tolist()
    if dropped:
        log.warning("COLMAP export: %d of %d frames left out, their cameras are unusable (non-finite pose or "
                    "field of view <= 0): frames %s", len(dropped), len(extr), dropped[:20])
    names = colmap_names([fi.name for fi in frames_info])
    xyz, rgb = np.asarray(xyz), np.asarray(rgb)
    if len(xyz) > max_points:
        pick = np.sort(np.random.default_rng(seed).choice(len(xyz), max_points, replace=False))
        xyz, rgb = xyz[pick], rgb[pick]
    images_dir = directory / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    n_placed = 0
    for i, original in enumerate(originals):
        if i >= len(keep):
            raise ValueError(f"more originals than the {len(keep)} frames")
        if keep[i]:
            _place_image(original, images_dir / names[i])
            n_placed += 1
    if n_placed != int(keep.sum()):
        raise ValueError(f"{n_placed} originals for {int(keep.sum())} kept frames")
    idx = np.flatnonzero(keep)
    intr_orig = np.array([frames_info[i].intrinsics_to_original(intr[i]) for i in idx]).reshape(-1, 3, 3)
    write_colmap_model(directory / "sparse" / "0", extr[idx], intr_orig,
                       [(frames_info[i].width, frames_info[i].height) for i in idx], [names[i] for i in idx],
                       xyz, rgb, binary=binary)
    return {"colmap_images": int(len(idx)), "colmap_points": int(len(xyz)), "colmap_dropped_frames": dropped}
