"""Camera math (`xsvggt_jax.geometry`): the same functions on numpy (float64) and jax (traceable)."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xsvggt_jax import geometry as G

H, W = 12, 16


def _rot_axis_angle(axis, angle) -> np.ndarray:
    axis = np.asarray(axis, np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _random_poses(rng, s: int) -> np.ndarray:
    """Pose encodings [s, 9]: translation, un-normalised quaternion xyzw, fov h, w."""
    t = rng.normal(size=(s, 3))
    q = rng.normal(size=(s, 4))
    fov = rng.uniform(0.6, 1.6, size=(s, 2))
    return np.concatenate([t, q, fov], 1)


def _extr_from(rot: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Camera-from-world [R | -R c] for a camera at world position c."""
    return np.concatenate([rot, -(rot @ center)[:, None]], 1)


# 180-degree rotations (w = 0) and other awkward cases for quaternion extraction
HARD_ROTATIONS = [
    np.eye(3),
    np.diag([1.0, -1.0, -1.0]),
    np.diag([-1.0, 1.0, -1.0]),
    np.diag([-1.0, -1.0, 1.0]),
    _rot_axis_angle([1, 1, 0], math.pi),
    _rot_axis_angle([0.2, -0.5, 1.0], math.pi),
    _rot_axis_angle([0.3, 0.4, -0.1], math.pi - 1e-7),
    _rot_axis_angle([1, 2, 3], 1e-9),
]


# ---------------------------------------------------------------------------- pose encoding


def test_pose_numpy_is_float64_and_matches_jax():
    pose = _random_poses(np.random.default_rng(0), 7).astype(np.float32)
    extr, intr = G.pose_encoding_to_extri_intri(pose, (H, W))
    assert isinstance(extr, np.ndarray) and extr.dtype == intr.dtype == np.float64
    extr_j, intr_j = G.pose_encoding_to_extri_intri(jnp.asarray(pose), (H, W))
    assert isinstance(extr_j, jax.Array) and extr_j.dtype == jnp.float32
    assert extr.shape == (7, 3, 4) and intr.shape == (7, 3, 3)
    np.testing.assert_allclose(extr, np.asarray(extr_j), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(intr, np.asarray(intr_j), rtol=1e-6, atol=1e-6)
    # rotations are orthonormal even for an un-normalised quaternion
    rot = extr[:, :, :3]
    np.testing.assert_allclose(rot @ np.swapaxes(rot, 1, 2), np.broadcast_to(np.eye(3), rot.shape),
                               atol=1e-12)
    with pytest.raises(ValueError, match="9 values"):
        G.pose_encoding_to_extri_intri(pose[:, :8], (H, W))


def test_intrinsics_from_fov():
    pose = np.array([[0, 0, 0, 0, 0, 0, 1, math.pi / 2, 2 * math.atan(0.5)]])
    _, intr = G.pose_encoding_to_extri_intri(pose, (H, W))
    np.testing.assert_allclose(intr[0], [[W, 0, W / 2], [0, H / 2, H / 2], [0, 0, 1]], atol=1e-12)


def test_zero_field_of_view_gives_an_infinite_focal_without_a_warning():
    pose = np.array([[0, 0, 0, 0, 0, 0, 1, 0.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, intr = G.pose_encoding_to_extri_intri(pose, (H, W))
    assert np.isinf(intr[0, 1, 1]) and np.isfinite(intr[0, 0, 0])


@pytest.mark.parametrize("xp", [np, jnp])
def test_pose_encoding_round_trip(xp):
    """extri_intri_to_pose_encoding inverts pose_encoding_to_extri_intri (quaternion normalised, w >= 0)."""
    enc = _random_poses(np.random.default_rng(4), 6)
    extr, intr = G.pose_encoding_to_extri_intri(xp.asarray(enc, xp.float32), (H, W + 6))
    back = np.asarray(G.extri_intri_to_pose_encoding(extr, intr, (H, W + 6)))
    q = enc[:, 3:7] / np.linalg.norm(enc[:, 3:7], axis=1, keepdims=True)
    want = np.concatenate([enc[:, :3], q * np.where(q[:, 3:] < 0, -1, 1), enc[:, 7:]], 1)
    np.testing.assert_allclose(back, want, atol=1e-5 if xp is jnp else 1e-6)


# ---------------------------------------------------------------------------- rotations


@pytest.mark.parametrize("rot", HARD_ROTATIONS + [
    G.quat_to_mat(q) for q in np.random.default_rng(1).normal(size=(20, 4))])
def test_mat_to_quat_round_trip(rot):
    q = G.mat_to_quat(rot)
    assert q.shape == (4,)
    assert abs(np.linalg.norm(q) - 1) < 1e-12
    assert q[3] >= 0
    np.testing.assert_allclose(G.quat_to_mat(q), rot, atol=1e-9)


def test_mat_to_quat_batched():
    qs = np.random.default_rng(2).normal(size=(3, 5, 4))
    qs /= np.linalg.norm(qs, axis=-1, keepdims=True)
    qs *= np.where(qs[..., 3:] < 0, -1, 1)
    np.testing.assert_allclose(G.mat_to_quat(G.quat_to_mat(qs)), qs, atol=1e-12)


def test_quaternions_under_jit_match_numpy():
    rots = np.stack(HARD_ROTATIONS)
    got = jax.jit(G.mat_to_quat)(jnp.asarray(rots, jnp.float32))
    assert isinstance(got, jax.Array)
    np.testing.assert_allclose(np.asarray(got), G.mat_to_quat(rots), atol=1e-6)
    q = np.random.default_rng(5).normal(size=(4, 4))
    np.testing.assert_allclose(np.asarray(jax.jit(G.quat_to_mat)(jnp.asarray(q, jnp.float32))), G.quat_to_mat(q),
                               atol=1e-6)


# ---------------------------------------------------------------------------- rigid transforms


@pytest.mark.parametrize("xp", [np, jnp])
def test_invert_extrinsics_and_homogeneous(xp):
    extr = np.stack([_extr_from(r, c) for r, c in zip(HARD_ROTATIONS, np.random.default_rng(8).normal(size=(8, 3)))])
    e4 = G.homogeneous(xp.asarray(extr))
    inv4 = G.homogeneous(G.invert_extrinsics(xp.asarray(extr)))
    assert e4.shape == (8, 4, 4) and isinstance(e4, jax.Array) == (xp is jnp)
    np.testing.assert_allclose(np.asarray(e4 @ inv4), np.broadcast_to(np.eye(4), (8, 4, 4)), atol=1e-6)
    # a [4, 4] input: its last row is ignored
    np.testing.assert_allclose(np.asarray(G.invert_extrinsics(e4)), np.asarray(inv4[:, :3]), atol=1e-12)
    np.testing.assert_allclose(np.asarray(G.rigid(xp.asarray(extr[:, :, :3]), xp.asarray(extr[:, :, 3]))), extr,
                               atol=1e-12)


# ---------------------------------------------------------------------------- points


def test_unproject_fronto_parallel_plane():
    """Identity-rotation camera at c, plane z = c_z + 5: every pixel has depth 5."""
    c = np.array([1.0, 2.0, 3.0])
    extr = _extr_from(np.eye(3), c)[None]
    fx, fy = 20.0, 18.0
    intr = np.array([[[fx, 0, W / 2], [0, fy, H / 2], [0, 0, 1]]])
    depth = np.full((1, H, W, 1), 5.0, np.float32)
    pts = G.unproject_depth(depth, extr, intr)
    assert pts.shape == (1, H, W, 3) and pts.dtype == np.float32
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)  # pixel index, no +0.5 (as VGGT)
    want = np.stack([c[0] + 5 * (x - W / 2) / fx, c[1] + 5 * (y - H / 2) / fy,
                     np.full_like(x, c[2] + 5)], -1)
    np.testing.assert_allclose(pts[0], want, atol=1e-5)
    # the principal point pixel lies on the optical axis
    np.testing.assert_allclose(pts[0, H // 2, W // 2], c + [0, 0, 5], atol=1e-6)


def test_unproject_tilted_plane_general_camera():
    """Rotated cameras looking at the plane n.X = d0: depths by ray casting, points must lie on
    the plane and reproject to their own pixel; the jax path gives the same points."""
    rng = np.random.default_rng(3)
    n, d0 = np.array([0.1, -0.2, 1.0]) / np.linalg.norm([0.1, -0.2, 1.0]), 4.0
    s = 3
    rots = np.stack([_rot_axis_angle(rng.normal(size=3), 0.3 * rng.uniform()) for _ in range(s)])
    centers = rng.normal(scale=0.3, size=(s, 3))
    extr = np.stack([_extr_from(r, c) for r, c in zip(rots, centers)])
    intr = np.array([[[22.0, 0, W / 2], [0, 21.0, H / 2], [0, 0, 1]]] * s)
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    pix = np.stack([x, y, np.ones_like(x)], -1)
    depth = np.empty((s, H, W, 1))
    for i in range(s):
        ray_cam = pix @ np.linalg.inv(intr[i]).T  # z = 1 in camera, so lambda is the depth
        ray_world = ray_cam @ rots[i]  # R^T r as row vectors
        depth[i, ..., 0] = (d0 - n @ centers[i]) / (ray_world @ n)
    assert (depth > 0).all()
    pts = G.unproject_depth(depth, extr, intr).astype(np.float64)
    np.testing.assert_allclose(pts @ n, d0, atol=1e-5)
    cam = np.einsum("sij,shwj->shwi", extr[:, :, :3], pts) + extr[:, None, None, :, 3]
    np.testing.assert_allclose(cam[..., 2], depth[..., 0], rtol=1e-5)
    proj = np.einsum("sij,shwj->shwi", intr, cam)
    want_pix = np.broadcast_to(pix[..., :2], (s, H, W, 2))
    np.testing.assert_allclose(proj[..., :2] / proj[..., 2:], want_pix, atol=1e-4)
    pts_j = jax.jit(G.unproject_depth)(*(jnp.asarray(a, jnp.float32) for a in (depth, extr, intr)))
    assert isinstance(pts_j, jax.Array) and pts_j.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(pts_j), pts, atol=1e-4)


def test_unproject_accepts_squeezed_depth_and_checks_shapes():
    extr = np.tile(_extr_from(np.eye(3), np.zeros(3)), (2, 1, 1))
    intr = np.tile(np.array([[10.0, 0, 8], [0, 10, 6], [0, 0, 1]]), (2, 1, 1))
    d = np.ones((2, H, W), np.float32)
    np.testing.assert_array_equal(G.unproject_depth(d, extr, intr),
                                  G.unproject_depth(d[..., None], extr, intr))
    with pytest.raises(ValueError):
        G.unproject_depth(d[:1], extr, intr)
    with pytest.raises(ValueError, match="extrinsics must be"):
        G.unproject_depth(d, extr[:, :2], intr)
    with pytest.raises(ValueError, match="depth must be"):
        G.unproject_depth(d[0], extr, intr)
