"""Camera math, written once for numpy and jax: pose encoding <-> extrinsics / intrinsics, quaternions
<-> rotation matrices, rigid transforms, depth unprojection.

Conventions follow upstream VGGT: extrinsics are camera-from-world [R|t] [..., 3, 4] with OpenCV axes
(x right, y down, z forward); intrinsics [..., 3, 3] put the principal point at (W/2, H/2) in
pixel-index coordinates (pixel (x, y) sits at u = x, v = y, no half-pixel offset); quaternions are
(x, y, z, w), scalar last; the pose encoding (absT_quaR_FoV) is [..., 9]: translation (3), quaternion
(4), field of view along H and along W (radians).

Every function computes in the array namespace of its input: jax arrays (tracers included) stay jax,
traceable, in their own dtype; anything else is computed in numpy in float64 (the host-side precision
of the exports, the evaluation and the training targets).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # np.ndarray or jax.Array


def _c_order(xp, a: Array) -> Array:
    """numpy results in C order (a later matmul's BLAS path, and so its last bit, depends on the
    layout, which `concatenate` carries over from its inputs)."""
    return np.ascontiguousarray(a) if xp is np else a


def _namespace(*arrays) -> tuple[Any, tuple]:
    """(xp, arrays): jnp and the arrays as they are when any is a jax array, else np and the arrays
    as float64 numpy arrays."""
    if any(isinstance(a, jax.Array) for a in arrays):
        return jnp, tuple(jnp.asarray(a) for a in arrays)
    return np, tuple(np.asarray(a, np.float64) for a in arrays)


# --------------------------------------------------------------------------------------------
# rotations


def quat_to_mat(q: Array) -> Array:
    """Quaternions [..., 4] (x, y, z, w; need not be unit) -> rotation matrices [..., 3, 3]."""
    xp, (q,) = _namespace(q)
    i, j, k, r = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    two_s = 2.0 / xp.sum(q * q, -1)
    m = xp.stack([
        1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
        two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
        two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j),
    ], -1)
    return m.reshape(*q.shape[:-1], 3, 3)


def mat_to_quat(rot: Array) -> Array:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] (x, y, z, w) with w >= 0.

    Shepperd's method: the component with the largest magnitude (picked from the trace and the
    diagonal) is taken from a square root, the others from off-diagonal sums/differences divided
    by it, so no division by a small number happens (robust at 180-degree rotations)."""
    xp, (m,) = _namespace(rot)
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    tr = m00 + m11 + m22
    with np.errstate(divide="ignore", invalid="ignore"):
        # candidate when w is largest
        w0 = 0.5 * xp.sqrt(xp.maximum(1.0 + tr, 0.0))
        c0 = xp.stack([(m21 - m12) / (4 * w0), (m02 - m20) / (4 * w0), (m10 - m01) / (4 * w0),
                       w0], -1)
        # x largest
        x1 = 0.5 * xp.sqrt(xp.maximum(1.0 + m00 - m11 - m22, 0.0))
        c1 = xp.stack([x1, (m01 + m10) / (4 * x1), (m02 + m20) / (4 * x1),
                       (m21 - m12) / (4 * x1)], -1)
        # y largest
        y2 = 0.5 * xp.sqrt(xp.maximum(1.0 - m00 + m11 - m22, 0.0))
        c2 = xp.stack([(m01 + m10) / (4 * y2), y2, (m12 + m21) / (4 * y2),
                       (m02 - m20) / (4 * y2)], -1)
        # z largest
        z3 = 0.5 * xp.sqrt(xp.maximum(1.0 - m00 - m11 + m22, 0.0))
        c3 = xp.stack([(m02 + m20) / (4 * z3), (m12 + m21) / (4 * z3), z3,
                       (m10 - m01) / (4 * z3)], -1)
    pick = xp.argmax(xp.stack([tr, m00, m11, m22], -1), -1)
    cands = xp.stack([c0, c1, c2, c3], -2)  # [..., 4 candidates, 4]
    q = xp.take_along_axis(cands, pick[..., None, None], -2)[..., 0, :]
    q = q / xp.linalg.norm(q, axis=-1, keepdims=True)
    return xp.where(q[..., 3:4] < 0, -q, q)


# --------------------------------------------------------------------------------------------
# rigid transforms


def rigid(rot: Array, trans: Array) -> Array:
    """Rotations [..., 3, 3] and translations [..., 3] -> [R | t] [..., 3, 4]."""
    xp, (rot, trans) = _namespace(rot, trans)
    return _c_order(xp, xp.concatenate([rot, trans[..., None]], -1))


def homogeneous(pose: Array) -> Array:
    """Rigid transforms [..., 3, 4] (or [..., 4, 4], whose last row is ignored) -> [..., 4, 4] with
    the last row [0, 0, 0, 1]."""
    xp, (pose,) = _namespace(pose)
    last = xp.broadcast_to(xp.asarray([0.0, 0.0, 0.0, 1.0], pose.dtype), (*pose.shape[:-2], 1, 4))
    return _c_order(xp, xp.concatenate([pose[..., :3, :], last], -2))


def invert_extrinsics(extr: Array) -> Array:
    """Camera-from-world [..., 3, 4] (or [..., 4, 4]) -> world-from-camera [..., 3, 4] (R^T, -R^T t)."""
    xp, (extr,) = _namespace(extr)
    rot_t = xp.swapaxes(extr[..., :3, :3], -1, -2)
    t = -(rot_t @ extr[..., :3, 3:4])
    return xp.concatenate([rot_t, t], -1)


def check_cameras(extr: np.ndarray, intr: np.ndarray | None = None) -> None:
    """Raise ValueError unless extrinsics are [S,3,4] (and intrinsics, when given, [S,3,3])."""
    if extr.ndim != 3 or extr.shape[1:] != (3, 4):
        raise ValueError(f"extrinsics must be [S,3,4], got {extr.shape}")
    if intr is not None and intr.shape != (extr.shape[0], 3, 3):
        raise ValueError(f"intrinsics must be [{extr.shape[0]},3,3], got {intr.shape}")


# --------------------------------------------------------------------------------------------
# pose encoding


def pose_encoding_to_extri_intri(enc: Array, image_hw: tuple[int, int]) -> tuple[Array, Array]:
    """Pose encoding [..., 9] -> (extrinsics [..., 3, 4] camera-from-world, OpenCV axes;
    intrinsics [..., 3, 3] in pixels with the principal point at the image centre). A zero field of
    view (an untrained model) gives an infinite focal length."""
    xp, (enc,) = _namespace(enc)
    if enc.shape[-1] != 9:
        raise ValueError(f"pose encoding must end in 9 values, got shape {enc.shape}")
    h, w = image_hw
    extrinsics = rigid(quat_to_mat(enc[..., 3:7]), enc[..., :3])
    with np.errstate(divide="ignore"):
        fy = (h / 2.0) / xp.tan(enc[..., 7] / 2.0)
        fx = (w / 2.0) / xp.tan(enc[..., 8] / 2.0)
    zero, one = xp.zeros_like(fx), xp.ones_like(fx)
    intrinsics = xp.stack([
        xp.stack([fx, zero, zero + w / 2.0], -1),
        xp.stack([zero, fy, zero + h / 2.0], -1),
        xp.stack([zero, zero, one], -1),
    ], -2)
    return extrinsics, intrinsics


def extri_intri_to_pose_encoding(extrinsics: Array, intrinsics: Array, image_hw: tuple[int, int]) -> Array:
    """Extrinsics [..., 3, 4] (camera-from-world) and intrinsics [..., 3, 3] -> pose encoding [..., 9]:
    translation, quaternion (x, y, z, w; w >= 0), FoV_h = 2 atan(H / (2 fy)), FoV_w = 2 atan(W / (2 fx))
    (the inverse of `pose_encoding_to_extri_intri`)."""
    xp, (e, k) = _namespace(extrinsics, intrinsics)
    h, w = image_hw
    fov_h = 2.0 * xp.arctan((h / 2.0) / k[..., 1, 1])
    fov_w = 2.0 * xp.arctan((w / 2.0) / k[..., 0, 0])
    return xp.concatenate([e[..., :3, 3], mat_to_quat(e[..., :3, :3]), fov_h[..., None], fov_w[..., None]], -1)


# --------------------------------------------------------------------------------------------
# depth


def squeeze_depth(depth: Array) -> Array:
    """Depth maps [S,H,W,1] or [S,H,W] -> [S,H,W] (ValueError on any other shape)."""
    if not isinstance(depth, jax.Array):
        depth = np.asarray(depth)
    if depth.ndim == 4 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 3:
        raise ValueError(f"depth must be [S,H,W,1] or [S,H,W], got {depth.shape}")
    return depth


def camera_points(depth: Array, intrinsics: Array) -> Array:
    """Z-depth [..., H, W] with intrinsics [..., 3, 3] -> camera-space points [..., H, W, 3]:
    depth * K^-1 [u, v, 1] with u = x, v = y the pixel index (as VGGT's
    `unproject_depth_map_to_point_map`)."""
    xp, (depth, intrinsics) = _namespace(depth, intrinsics)
    h, w = depth.shape[-2:]
    v, u = xp.meshgrid(xp.arange(h, dtype=depth.dtype), xp.arange(w, dtype=depth.dtype), indexing="ij")
    pix = xp.stack([u, v, xp.ones_like(u)], -1)  # [H,W,3]
    rays = xp.einsum("...ij,hwj->...hwi", xp.linalg.inv(intrinsics), pix)
    return rays * depth[..., None]


def camera_to_world(points: Array, extrinsics: Array) -> Array:
    """Points [S, H, W, 3] in the cameras of camera-from-world extrinsics [S, 3, 4] -> world points
    R^T (x - t) [S, H, W, 3]."""
    xp, (points, extrinsics) = _namespace(points, extrinsics)
    rot, t = extrinsics[:, :3, :3], extrinsics[:, :3, 3]
    # R^T (x - t) as row vectors: (x - t) @ R
    return xp.einsum("shwi,sij->shwj", points - t[:, None, None, :], rot)


def unproject_depth(depth: Array, extr: Array, intr: Array) -> Array:
    """Depth maps [S,H,W,1] (or [S,H,W]) with extrinsics [S,3,4] and intrinsics [S,3,3] -> world points
    [S,H,W,3] float32 (`camera_points`, then `camera_to_world`)."""
    xp, (d, extr, intr) = _namespace(depth, extr, intr)
    d = squeeze_depth(d)
    check_cameras(extr, intr)
    if extr.shape[0] != d.shape[0]:
        raise ValueError(f"{d.shape[0]} depth maps but {extr.shape[0]} cameras")
    return camera_to_world(camera_points(d, intr), extr).astype(xp.float32)
