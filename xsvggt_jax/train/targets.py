"""Ground-truth training targets in the model's output conventions (numpy, host side).

VGGT's training normalisation (training/train_utils/normalization.py, mode "mean"): every camera is
expressed relative to the first one (E_i' = E_i E_0^-1, so frame 0 gets the identity), the world
points are moved into frame 0's camera, and translations, points and depths are divided by one
scale per sequence: the mean distance of the valid points from frame 0's camera centre. The pose
encoding is VGGT's absT_quaR_FoV: [t (3), quaternion xyzw of R (4), FoV_h, FoV_w], with
FoV_h = 2 atan(H / (2 fy)) and FoV_w = 2 atan(W / (2 fx)) (the inverse of
`xsvggt_jax.geometry.pose_encoding_to_extri_intri`, `geometry.extri_intri_to_pose_encoding`).
"""

from __future__ import annotations

import numpy as np

from xsvggt_jax.data.base import DataError
from xsvggt_jax.geometry import camera_points, camera_to_world, extri_intri_to_pose_encoding, homogeneous

SCALE_MIN = 1e-6  # a sequence whose valid points all sit at the camera centre cannot be normalised


def relative_to_first(extrinsics: np.ndarray) -> np.ndarray:
    """Camera-from-world extrinsics [S, 3, 4] -> the same cameras with frame 0's camera as the world:
    E_i E_0^-1 [S, 3, 4] float64 (frame 0 becomes [I | 0])."""
    e = homogeneous(extrinsics)
    return (e @ np.linalg.inv(e[0]))[:, :3]


def supervised_targets(images: np.ndarray, depth: np.ndarray, extrinsics: np.ndarray,
                       intrinsics: np.ndarray, valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One clip's inputs and normalised ground truth.

    images [S, H, W, 3] in [0, 1]; depth [S, H, W] z-depth (<= 0 or non-finite: invalid);
    extrinsics [S, 3, 4] camera-from-world; intrinsics [S, 3, 3]; valid [S, H, W] bool or None.
    Returns float32 arrays (bool for valid): images [S, H, W, 3], camera_pose [S, 9],
    depth [S, H, W, 1], pts3d_in_other_view [S, H, W, 3] (frame 0's camera coordinates), valid
    [S, H, W]; plus "scale" [] the divisor applied to translations, depths and points.
    """
    s, h, w, _ = images.shape
    depth = np.asarray(depth, np.float64)
    ok = np.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok &= np.asarray(valid, bool)
    if not ok.any():
        raise DataError("a training clip has no valid depth pixel")
    depth = np.where(ok, depth, 0.0)
    rel = relative_to_first(extrinsics)                                    # [S, 3, 4]
    cam = camera_points(depth, intrinsics)                                 # [S, H, W, 3]
    pts0 = camera_to_world(cam, rel)                                       # camera i -> frame 0
    scale = float(np.mean(np.linalg.norm(pts0[ok], axis=-1)))
    if not scale > SCALE_MIN:
        raise DataError(f"a training clip's points have mean distance {scale:g} from the first camera")
    rel_scaled = rel.copy()
    rel_scaled[:, :, 3] /= scale
    return {
        "images": np.asarray(images, np.float32),
        "camera_pose": extri_intri_to_pose_encoding(rel_scaled, intrinsics, (h, w)).astype(np.float32),
        "depth": (depth / scale)[..., None].astype(np.float32),
        "pts3d_in_other_view": np.where(ok[..., None], pts0 / scale, 0.0).astype(np.float32),
        "valid": ok,
        "scale": np.float32(scale),
    }
