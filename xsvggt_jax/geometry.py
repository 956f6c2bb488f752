"""Pose encoding (absT_quaR_FoV) <-> camera extrinsics / intrinsics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def quat_to_mat(q: Array) -> Array:
    """Quaternions [..., 4] (x, y, z, w; need not be unit) -> rotation matrices [..., 3, 3].

    Works on jax arrays (traceable) and on numpy arrays (computed in numpy, keeping their dtype)."""
    xp = jnp if isinstance(q, jax.Array) else np
    i, j, k, r = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    two_s = 2.0 / xp.sum(q * q, -1)
    m = xp.stack([
        1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
        two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
        two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j),
    ], -1)
    return m.reshape(*q.shape[:-1], 3, 3)


def pose_encoding_to_extri_intri(enc: Array, image_hw: tuple[int, int]) -> tuple[Array, Array]:
    """Pose encoding [..., 9] -> (extrinsics [..., 3, 4] camera-from-world, OpenCV axes;
    intrinsics [..., 3, 3] in pixels with the principal point at the image centre)."""
    h, w = image_hw
    rot = quat_to_mat(enc[..., 3:7])
    extrinsics = jnp.concatenate([rot, enc[..., :3, None]], -1)
    fy = (h / 2.0) / jnp.tan(enc[..., 7] / 2.0)
    fx = (w / 2.0) / jnp.tan(enc[..., 8] / 2.0)
    zero, one = jnp.zeros_like(fx), jnp.ones_like(fx)
    intrinsics = jnp.stack([
        jnp.stack([fx, zero, zero + w / 2.0], -1),
        jnp.stack([zero, fy, zero + h / 2.0], -1),
        jnp.stack([zero, zero, one], -1),
    ], -2)
    return extrinsics, intrinsics
