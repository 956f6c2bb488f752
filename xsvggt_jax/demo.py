"""A procedural scene for `xsvggt demo`: textured geometry seen from a moving camera, with exact depth
and poses, rendered by analytic ray casting (numpy; no assets, no downloads)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Scene:
    """images [S, 3, H, W] float32 in [0, 1]; depth [S, H, W] (z in the camera frame);
    extrinsics [S, 3, 4] camera-from-world (OpenCV axes); intrinsics [S, 3, 3];
    query_points [N, 2] (x, y) pixels in frame 0."""

    images: np.ndarray
    depth: np.ndarray
    extrinsics: np.ndarray
    intrinsics: np.ndarray
    query_points: np.ndarray


def _texture(p: np.ndarray, seed: float) -> np.ndarray:
    """A colourful procedural texture of 3D points [..., 3] -> RGB [..., 3] in [0, 1]."""
    check = (np.floor(p[..., 0] * 2) + np.floor(p[..., 1] * 2) + np.floor(p[..., 2] * 2)) % 2
    waves = np.stack([np.sin(p[..., 0] * 3.1 + seed), np.sin(p[..., 1] * 2.3 + 2 * seed),
                      np.sin(p[..., 2] * 4.7 + 3 * seed)], -1)
    return np.clip(0.25 + 0.35 * check[..., None] + 0.2 * waves, 0, 1)


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-from-world [3, 4] for a camera at `eye` looking at `target` (y down, z forward)."""
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, np.array([0.0, -1.0, 0.0]))
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    r = np.stack([x, y, z])  # rows: camera axes in world coordinates
    return np.concatenate([r, -r @ eye[:, None]], 1)


def make_scene(frames: int = 24, height: int = 112, width: int = 154, num_queries: int = 8,
               seed: int = 0) -> Scene:
    """A box-shaped room with two spheres, the camera circling inside it."""
    rng = np.random.default_rng(seed)
    f = 0.9 * width
    intr = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], np.float64)
    spheres = [(np.array([0.6, 0.4, 0.3]), 0.5, 1.0), (np.array([-0.7, 0.6, -0.4]), 0.35, 2.0)]
    half = np.array([3.0, 1.2, 3.0])  # room: |x| < 3, |y| < 1.2 (y down: floor at +1.2), |z| < 3
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    dirs_cam = np.stack([(u + 0.5 - width / 2) / f, (v + 0.5 - height / 2) / f, np.ones_like(u)], -1)

    images, depths, extrs = [], [], []
    for t in range(frames):
        a = 2 * np.pi * t / max(frames, 1) * 0.35
        eye = np.array([1.6 * np.sin(a), -0.1 + 0.1 * np.sin(3 * a), -1.8 * np.cos(a)])
        ext = _look_at(eye, np.array([0.0, 0.3, 0.0]))
        rot = ext[:, :3]
        d = dirs_cam @ rot  # world directions (R^T d), not normalised: z_cam = 1 per unit step
        # room walls: the nearest positive hit of the six axis-aligned planes from inside
        with np.errstate(divide="ignore", invalid="ignore"):
            tw = np.where(d > 0, (half - eye) / d, (-half - eye) / d)
        tw = np.where(np.isfinite(tw) & (tw > 0), tw, np.inf)
        t_hit = tw.min(-1)
        axis = tw.argmin(-1)
        hit = eye + t_hit[..., None] * d
        colour = _texture(hit, seed=float(axis.mean()))
        colour = colour * (0.6 + 0.4 * (axis == 1))[..., None]  # floor/ceiling brighter
        for centre, radius, s in spheres:
            oc = eye - centre
            b = (d * oc).sum(-1)
            a2 = (d * d).sum(-1)
            disc = b * b - a2 * ((oc * oc).sum() - radius ** 2)
            ts = np.where(disc > 0, (-b - np.sqrt(np.maximum(disc, 0))) / a2, np.inf)
            closer = (ts > 0) & (ts < t_hit)
            p = eye + np.where(closer, ts, 0.0)[..., None] * d
            normal = (p - centre) / radius
            shade = 0.5 + 0.5 * np.clip(normal @ np.array([0.3, -0.8, -0.5]), 0, 1)
            colour = np.where(closer[..., None], _texture(p * 3, s) * shade[..., None], colour)
            t_hit = np.where(closer, ts, t_hit)
        images.append(colour.transpose(2, 0, 1))
        depths.append(t_hit)  # |z_cam| = t since d has unit z in the camera frame
        extrs.append(ext)
    qp = np.stack([rng.uniform(8, width - 8, num_queries), rng.uniform(8, height - 8, num_queries)], -1)
    return Scene(np.stack(images).astype(np.float32), np.stack(depths).astype(np.float32),
                 np.stack(extrs).astype(np.float32), np.repeat(intr[None], frames, 0).astype(np.float32),
                 qp.astype(np.float32))
