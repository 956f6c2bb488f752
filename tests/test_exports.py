"""Exports of reconstruction outputs: synthetic arrays only, no model, no reference data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from xsvggt_jax.io import exports as E

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


def _tmp_leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- cameras


def test_pose_np_matches_jax():
    import jax.numpy as jnp

    from xsvggt_jax.pose import pose_encoding_to_extri_intri

    pose = _random_poses(np.random.default_rng(0), 7).astype(np.float32)
    extr, intr = E.pose_to_extri_intri_np(pose, (H, W))
    extr_j, intr_j = pose_encoding_to_extri_intri(jnp.asarray(pose), (H, W))
    assert extr.shape == (7, 3, 4) and intr.shape == (7, 3, 3)
    np.testing.assert_allclose(extr, np.asarray(extr_j), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(intr, np.asarray(intr_j), rtol=1e-6, atol=1e-6)
    # rotations are orthonormal even for an un-normalised quaternion
    rot = extr[:, :, :3]
    np.testing.assert_allclose(rot @ np.swapaxes(rot, 1, 2), np.broadcast_to(np.eye(3), rot.shape),
                               atol=1e-12)


def test_intrinsics_from_fov():
    pose = np.array([[0, 0, 0, 0, 0, 0, 1, math.pi / 2, 2 * math.atan(0.5)]])
    _, intr = E.pose_to_extri_intri_np(pose, (H, W))
    np.testing.assert_allclose(intr[0], [[W, 0, W / 2], [0, H / 2, H / 2], [0, 0, 1]], atol=1e-12)


@pytest.mark.parametrize("rot", HARD_ROTATIONS + [
    E.quat_to_mat_np(q) for q in np.random.default_rng(1).normal(size=(20, 4))])
def test_mat_to_quat_round_trip(rot):
    q = E.mat_to_quat_np(rot)
    assert q.shape == (4,)
    assert abs(np.linalg.norm(q) - 1) < 1e-12
    assert q[3] >= 0
    np.testing.assert_allclose(E.quat_to_mat_np(q), rot, atol=1e-9)


def test_mat_to_quat_batched():
    qs = np.random.default_rng(2).normal(size=(3, 5, 4))
    qs /= np.linalg.norm(qs, axis=-1, keepdims=True)
    qs *= np.where(qs[..., 3:] < 0, -1, 1)
    np.testing.assert_allclose(E.mat_to_quat_np(E.quat_to_mat_np(qs)), qs, atol=1e-12)


# ---------------------------------------------------------------------------- points


def test_unproject_fronto_parallel_plane():
    """Identity-rotation camera at c, plane z = c_z + 5: every pixel has depth 5."""
    c = np.array([1.0, 2.0, 3.0])
    extr = _extr_from(np.eye(3), c)[None]
    fx, fy = 20.0, 18.0
    intr = np.array([[[fx, 0, W / 2], [0, fy, H / 2], [0, 0, 1]]])
    depth = np.full((1, H, W, 1), 5.0, np.float32)
    pts = E.unproject_depth(depth, extr, intr)
    assert pts.shape == (1, H, W, 3) and pts.dtype == np.float32
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)  # pixel index, no +0.5 (as VGGT)
    want = np.stack([c[0] + 5 * (x - W / 2) / fx, c[1] + 5 * (y - H / 2) / fy,
                     np.full_like(x, c[2] + 5)], -1)
    np.testing.assert_allclose(pts[0], want, atol=1e-5)
    # the principal point pixel lies on the optical axis
    np.testing.assert_allclose(pts[0, H // 2, W // 2], c + [0, 0, 5], atol=1e-6)


def test_unproject_tilted_plane_general_camera():
    """Rotated cameras looking at the plane n.X = d0: depths by ray casting, points must lie on
    the plane and reproject to their own pixel."""
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
    pts = E.unproject_depth(depth, extr, intr).astype(np.float64)
    np.testing.assert_allclose(pts @ n, d0, atol=1e-5)
    cam = np.einsum("sij,shwj->shwi", extr[:, :, :3], pts) + extr[:, None, None, :, 3]
    np.testing.assert_allclose(cam[..., 2], depth[..., 0], rtol=1e-5)
    proj = np.einsum("sij,shwj->shwi", intr, cam)
    want_pix = np.broadcast_to(pix[..., :2], (s, H, W, 2))
    np.testing.assert_allclose(proj[..., :2] / proj[..., 2:], want_pix, atol=1e-4)


def test_unproject_accepts_squeezed_depth_and_checks_shapes():
    extr = np.tile(_extr_from(np.eye(3), np.zeros(3)), (2, 1, 1))
    intr = np.tile(np.array([[10.0, 0, 8], [0, 10, 6], [0, 0, 1]]), (2, 1, 1))
    d = np.ones((2, H, W), np.float32)
    np.testing.assert_array_equal(E.unproject_depth(d, extr, intr),
                                  E.unproject_depth(d[..., None], extr, intr))
    with pytest.raises(ValueError):
        E.unproject_depth(d[:1], extr, intr)


def test_select_points_percentile_and_filters():
    s = 2
    rng = np.random.default_rng(4)
    pts = rng.normal(size=(s, H, W, 3)).astype(np.float32)
    conf = np.arange(s * H * W, dtype=np.float32).reshape(s, H, W) + 1.0  # all distinct, > 1e-5
    images = rng.uniform(size=(s, 3, H, W)).astype(np.float32)
    xyz, rgb = E.select_points(pts, conf, images, 50.0)
    thres = np.percentile(conf, 50.0)
    mask = conf >= thres
    assert xyz.dtype == np.float32 and rgb.dtype == np.uint8
    assert xyz.shape == (mask.sum(), 3) and rgb.shape == xyz.shape
    np.testing.assert_array_equal(xyz, pts[mask])
    want_rgb = np.clip(np.rint(np.moveaxis(images, 1, -1) * 255), 0, 255).astype(np.uint8)[mask]
    np.testing.assert_array_equal(rgb, want_rgb)

    # percentile 0 keeps everything usable; non-finite points and conf <= 1e-5 are dropped
    pts[0, 0, 0] = [np.nan, 0, 0]
    pts[0, 0, 1] = [0, np.inf, 0]
    conf[1, 2, 3] = 0.0
    conf[1, 2, 4] = np.nan
    xyz, rgb = E.select_points(pts, conf, images, 0.0)
    assert len(xyz) == s * H * W - 4
    assert np.isfinite(xyz).all()

    # percentile 100 keeps the single most confident point
    xyz, _ = E.select_points(pts, conf, images, 100.0)
    np.testing.assert_array_equal(xyz, pts[1, -1, -1][None])

    with pytest.raises(ValueError):
        E.select_points(pts, conf, images, 101.0)
    with pytest.raises(ValueError):
        E.select_points(pts, conf, np.moveaxis(images, 1, -1), 0.0)


def test_write_ply_round_trip(tmp_path):
    from plyfile import PlyData

    rng = np.random.default_rng(5)
    xyz = rng.normal(size=(100, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(100, 3)).astype(np.uint8)
    out = E.write_ply(tmp_path / "cloud.ply", xyz, rgb)
    assert out == tmp_path / "cloud.ply"
    assert out.read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    ply = PlyData.read(str(out))
    v = ply["vertex"]
    assert [p.name for p in v.properties] == ["x", "y", "z", "red", "green", "blue"]
    assert v.data.dtype["x"] == np.dtype("<f4") and v.data.dtype["red"] == np.dtype("u1")
    np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], 1), xyz)
    np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], 1), rgb)
    assert _tmp_leftovers(tmp_path) == []

    empty = E.write_ply(tmp_path / "empty.ply", np.zeros((0, 3), np.float32),
                        np.zeros((0, 3), np.uint8))
    assert PlyData.read(str(empty))["vertex"].count == 0
    with pytest.raises(ValueError):
        E.write_ply(tmp_path / "bad.ply", xyz, rgb.astype(np.float32))


# ---------------------------------------------------------------------------- trajectories


def _parse_tum(path: Path):
    lines = path.read_text().splitlines()
    assert lines[0] == "# timestamp tx ty tz qx qy qz qw"
    rows = np.array([[float(v) for v in ln.split()] for ln in lines[1:]])
    assert rows.shape[1] == 8
    return rows[:, 0], rows[:, 1:4], rows[:, 4:8]


def test_write_tum_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    extr_rand, _ = E.pose_to_extri_intri_np(_random_poses(rng, 5), (H, W))
    extr_hard = np.stack([_extr_from(r, rng.normal(size=3)) for r in HARD_ROTATIONS])
    extr = np.concatenate([extr_rand, extr_hard])
    out = E.write_tum(tmp_path / "traj.txt", extr)
    ts, t, q = _parse_tum(out)
    np.testing.assert_array_equal(ts, np.arange(len(extr), dtype=np.float64))
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-8)
    assert (q[:, 3] >= 0).all()
    rot_wc = E.quat_to_mat_np(q)
    rot_cw = extr[:, :, :3]
    np.testing.assert_allclose(rot_wc, np.swapaxes(rot_cw, 1, 2), atol=1e-5)
    np.testing.assert_allclose(t, -np.einsum("sji,sj->si", rot_cw, extr[:, :, 3]), atol=1e-5)
    # camera centre: the inverted pose maps the camera origin to the world position c
    c = rng.normal(size=3)
    E.write_tum(tmp_path / "one.txt", _extr_from(_rot_axis_angle([0, 1, 0], 2.0), c)[None], [12.5])
    ts, t, _ = _parse_tum(tmp_path / "one.txt")
    assert ts.tolist() == [12.5]
    np.testing.assert_allclose(t[0], c, atol=1e-8)
    assert _tmp_leftovers(tmp_path) == []
    with pytest.raises(ValueError):
        E.write_tum(tmp_path / "bad.txt", extr, timestamps=[0.0])


# ---------------------------------------------------------------------------- COLMAP


def _colmap_inputs():
    rng = np.random.default_rng(7)
    s = 4
    extr, intr = E.pose_to_extri_intri_np(_random_poses(rng, s), (H, W))
    extr[-1] = _extr_from(np.diag([-1.0, 1.0, -1.0]), rng.normal(size=3))  # 180-degree case
    xyz = rng.normal(size=(30, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(30, 3)).astype(np.uint8)
    names = [f"frame_{i:05d}.png" for i in range(s)]
    return extr, intr, xyz, rgb, names


def _parse_colmap_strict(d: Path):
    """A strict reader of the subset of COLMAP's text format that we write."""
    def data_lines(name, header):
        lines = (d / name).read_text().split("\n")
        assert lines[-1] == ""  # trailing newline
        lines = lines[:-1]
        assert lines[:len(header)] == header
        return lines[len(header):]

    cams = {}
    cam_lines = data_lines("cameras.txt", ["# Camera list with one line of data per camera:",
                                            "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"])
    assert cam_lines[0].startswith("# Number of cameras: ")
    for ln in cam_lines[1:]:
        f = ln.split(" ")
        assert len(f) == 8 and f[1] == "PINHOLE"
        cams[int(f[0])] = (int(f[2]), int(f[3]), np.array([float(v) for v in f[4:]]))
    assert int(cam_lines[0].split(": ")[1]) == len(cams)

    imgs = {}
    img_lines = data_lines("images.txt", [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)"])
    assert img_lines[0].startswith("# Number of images: ")
    body = img_lines[1:]
    assert len(body) % 2 == 0
    for ln, pts2d in zip(body[::2], body[1::2]):
        f = ln.split(" ")
        assert len(f) == 10 and pts2d == ""
        qw, qx, qy, qz, tx, ty, tz = (float(v) for v in f[1:8])
        imgs[int(f[0])] = (np.array([qx, qy, qz, qw]), np.array([tx, ty, tz]), int(f[8]), f[9])

    pts = {}
    pt_lines = data_lines("points3D.txt", [
        "# 3D point list with one line of data per point:",
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)"])
    assert pt_lines[0].startswith("# Number of points: ")
    for ln in pt_lines[1:]:
        f = ln.split(" ")
        assert len(f) == 8  # empty track
        rgb = [int(v) for v in f[4:7]]
        assert all(0 <= c <= 255 for c in rgb)
        pts[int(f[0])] = (np.array([float(v) for v in f[1:4]]), np.array(rgb), float(f[7]))
    return cams, imgs, pts


def test_write_colmap_text_strict_format(tmp_path):
    extr, intr, xyz, rgb, names = _colmap_inputs()
    d = E.write_colmap_text(tmp_path / "sparse", extr, intr, (H, W), xyz, rgb, names)
    assert sorted(p.name for p in d.iterdir()) == ["cameras.txt", "images.txt", "points3D.txt"]
    cams, imgs, pts = _parse_colmap_strict(d)
    assert sorted(cams) == sorted(imgs) == [1, 2, 3, 4]
    for i in range(len(extr)):
        w, h, params = cams[i + 1]
        assert (w, h) == (W, H)
        k = intr[i]
        np.testing.assert_allclose(params, [k[0, 0], k[1, 1], k[0, 2], k[1, 2]], rtol=1e-9)
        q, t, cam_id, name = imgs[i + 1]
        assert cam_id == i + 1 and name == names[i]
        assert q[3] >= 0
        np.testing.assert_allclose(E.quat_to_mat_np(q), extr[i, :, :3], atol=1e-8)
        np.testing.assert_allclose(t, extr[i, :, 3], atol=1e-8)
    assert sorted(pts) == list(range(1, len(xyz) + 1))
    got_xyz = np.stack([pts[j + 1][0] for j in range(len(xyz))])
    np.testing.assert_allclose(got_xyz, xyz, rtol=1e-7, atol=1e-7)
    np.testing.assert_array_equal(np.stack([pts[j + 1][1] for j in range(len(xyz))]), rgb)
    assert all(p[2] == 0.0 for p in pts.values())
    assert _tmp_leftovers(d) == []


def test_write_colmap_text_pycolmap(tmp_path):
    pycolmap = pytest.importorskip("pycolmap")
    extr, intr, xyz, rgb, names = _colmap_inputs()
    d = E.write_colmap_text(tmp_path / "sparse", extr, intr, (H, W), xyz, rgb, names)
    rec = pycolmap.Reconstruction(str(d))
    assert rec.num_images() == len(extr) and rec.num_points3D() == len(xyz)
    for i in range(len(extr)):
        im = rec.images[i + 1]
        assert im.name == names[i] and im.camera_id == i + 1
        pose = im.cam_from_world() if callable(im.cam_from_world) else im.cam_from_world
        np.testing.assert_allclose(pose.matrix(), extr[i], atol=1e-7)
        cam = rec.cameras[i + 1]
        assert cam.model.name == "PINHOLE" and (cam.width, cam.height) == (W, H)
        k = intr[i]
        np.testing.assert_allclose(cam.params, [k[0, 0], k[1, 1], k[0, 2], k[1, 2]], rtol=1e-9)
    for j in range(len(xyz)):
        p = rec.points3D[j + 1]
        np.testing.assert_allclose(p.xyz, xyz[j], rtol=1e-7, atol=1e-7)
        np.testing.assert_array_equal(p.color, rgb[j])
        assert p.track.length() == 0


def test_write_colmap_text_rejects_bad_names(tmp_path):
    extr, intr, xyz, rgb, names = _colmap_inputs()
    with pytest.raises(ValueError):
        E.write_colmap_text(tmp_path, extr, intr, (H, W), xyz, rgb, names[:-1])
    with pytest.raises(ValueError):
        E.write_colmap_text(tmp_path, extr, intr, (H, W), xyz, rgb, names[:-1] + ["a b.png"])
    with pytest.raises(ValueError):
        E.write_colmap_text(tmp_path, extr, intr, (H, W), xyz, rgb, names[:-1] + [names[0]])


# ---------------------------------------------------------------------------- depth, plots


def test_write_depth_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(8)
    s = 3
    depth = rng.uniform(0.5, 7.0, size=(s, H, W, 1)).astype(np.float32)
    depth[0, 0, 0, 0] = 9.0  # the global maximum
    depth[1, 1, 1, 0] = np.nan
    conf = rng.uniform(1, 5, size=(s, H, W)).astype(np.float32)
    d = E.write_depth(tmp_path / "depth", depth, conf)

    z = np.load(d / "depth.npz")
    np.testing.assert_array_equal(z["depth"], depth[..., 0])
    np.testing.assert_array_equal(z["depth_conf"], conf)
    scale = float(z["scale"])
    assert scale == pytest.approx(65535.0 / 9.0)
    meta = json.loads((d / "depth_scale.json").read_text())
    assert meta == {"scale": scale, "unit": "depth = png / scale"}

    for i in range(s):
        with Image.open(d / f"depth_{i:05d}.png") as img:
            assert img.mode == "I;16" and img.size == (W, H)
            png = np.asarray(img).astype(np.float64)
        rec = png / scale
        ok = np.isfinite(depth[i, ..., 0])
        assert np.abs(rec[ok] - depth[i, ..., 0][ok]).max() <= 1.0 / scale
        assert (png[~ok] == 0).all()
    with Image.open(d / "depth_00000.png") as img:
        assert np.asarray(img)[0, 0] == 65535
    assert _tmp_leftovers(d) == []


def test_write_depth_without_conf_and_degenerate(tmp_path):
    d = E.write_depth(tmp_path, np.zeros((2, H, W), np.float32))
    z = np.load(d / "depth.npz")
    assert "depth_conf" not in z and float(z["scale"]) == 1.0
    assert (d / "depth_00001.png").exists()


def test_plot_stream(tmp_path):
    from PIL import Image

    lat = np.linspace(0.05, 0.08, 10)
    cache = np.arange(10) * 3_000_000
    out = E.plot_stream(tmp_path / "stream.png", lat, cache)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        assert img.size == (800, 600)
    assert _tmp_leftovers(tmp_path) == []
    with pytest.raises(ValueError):
        E.plot_stream(tmp_path / "bad.png", lat, cache[:-1])


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        E._atomic_write(target, boom)
    assert target.read_text() == "old"
    assert _tmp_leftovers(tmp_path) == []
