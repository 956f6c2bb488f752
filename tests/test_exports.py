"""Exports of reconstruction outputs: synthetic arrays only, no model, no reference data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycolmap
import pytest

from test_geometry import HARD_ROTATIONS, H, W, _extr_from, _random_poses, _rot_axis_angle
from xsvggt_jax.geometry import pose_encoding_to_extri_intri, quat_to_mat
from xsvggt_jax.io.fsutil import atomic_write
from xsvggt_jax.io import colmap as C
from xsvggt_jax.io import exports as E
from xsvggt_jax.io import plots as P
from xsvggt_jax.io.frames import FrameInfo


def _tmp_leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- points


def test_select_points_percentile_and_filters():
    s = 2
    rng = np.random.default_rng(4)
    pts = rng.normal(size=(s, H, W, 3)).astype(np.float32)
    conf = np.arange(s * H * W, dtype=np.float32).reshape(s, H, W) + 1.0  # all distinct, > 1e-5
    images = rng.integers(0, 256, size=(s, H, W, 3), dtype=np.uint8)
    xyz, rgb = E.select_points(pts, conf, images, 50.0)
    thres = np.percentile(conf, 50.0)
    mask = conf >= thres
    assert xyz.dtype == np.float32 and rgb.dtype == np.uint8
    assert xyz.shape == (mask.sum(), 3) and rgb.shape == xyz.shape
    np.testing.assert_array_equal(xyz, pts[mask])
    np.testing.assert_array_equal(rgb, images[mask])

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
        E.select_points(pts, conf, np.moveaxis(images, -1, 1), 0.0)
    with pytest.raises(ValueError):
        E.select_points(pts, conf, images.astype(np.float32) / 255, 0.0)


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
    extr_rand, _ = pose_encoding_to_extri_intri(_random_poses(rng, 5), (H, W))
    extr_hard = np.stack([_extr_from(r, rng.normal(size=3)) for r in HARD_ROTATIONS])
    extr = np.concatenate([extr_rand, extr_hard])
    out = E.write_tum(tmp_path / "traj.txt", extr)
    ts, t, q = _parse_tum(out)
    np.testing.assert_array_equal(ts, np.arange(len(extr), dtype=np.float64))
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-8)
    assert (q[:, 3] >= 0).all()
    rot_wc = quat_to_mat(q)
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

SIZES = [(W, H)] * 4


def _colmap_inputs():
    rng = np.random.default_rng(7)
    s = 4
    extr, intr = pose_encoding_to_extri_intri(_random_poses(rng, s), (H, W))
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
    d = C.write_colmap_model(tmp_path / "sparse", extr, intr, SIZES, names, xyz, rgb)
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
        np.testing.assert_allclose(quat_to_mat(q), extr[i, :, :3], atol=1e-8)
        np.testing.assert_allclose(t, extr[i, :, 3], atol=1e-8)
    assert sorted(pts) == list(range(1, len(xyz) + 1))
    got_xyz = np.stack([pts[j + 1][0] for j in range(len(xyz))])
    np.testing.assert_allclose(got_xyz, xyz, rtol=1e-7, atol=1e-7)
    np.testing.assert_array_equal(np.stack([pts[j + 1][1] for j in range(len(xyz))]), rgb)
    assert all(p[2] == 0.0 for p in pts.values())
    assert _tmp_leftovers(d) == []


@pytest.mark.parametrize("binary", [False, True])
def test_write_colmap_model_pycolmap(tmp_path, binary):
    extr, intr, xyz, rgb, names = _colmap_inputs()
    sizes = [(W, H), (W + 2, H), (W, H + 4), (2 * W, 2 * H)]
    d = C.write_colmap_model(tmp_path / "sparse", extr, intr, sizes, names, xyz, rgb, binary=binary)
    suffix = ".bin" if binary else ".txt"
    assert sorted(p.name for p in d.iterdir()) == [f"cameras{suffix}", f"images{suffix}", f"points3D{suffix}"]
    rec = pycolmap.Reconstruction(str(d))
    assert rec.num_images() == len(extr) and rec.num_points3D() == len(xyz)
    for i in range(len(extr)):
        im = rec.images[i + 1]
        assert im.name == names[i] and im.camera_id == i + 1
        np.testing.assert_allclose(im.cam_from_world().matrix(), extr[i], atol=1e-7)
        cam = rec.cameras[i + 1]
        assert cam.model.name == "PINHOLE" and (cam.width, cam.height) == sizes[i]
        k = intr[i]
        np.testing.assert_allclose(cam.params, [k[0, 0], k[1, 1], k[0, 2], k[1, 2]], rtol=1e-9)
    for j in range(len(xyz)):
        p = rec.points3D[j + 1]
        np.testing.assert_allclose(p.xyz, xyz[j], rtol=1e-7, atol=1e-7)
        np.testing.assert_array_equal(p.color, rgb[j])
        assert p.track.length() == 0


def test_write_colmap_model_rejects_bad_input(tmp_path):
    extr, intr, xyz, rgb, names = _colmap_inputs()
    for bad in (names[:-1], names[:-1] + ["a b.png"], names[:-1] + [names[0]]):
        with pytest.raises(ValueError):
            C.write_colmap_model(tmp_path, extr, intr, SIZES, bad, xyz, rgb)
    for f in (0.0, -3.0, np.inf):  # a field of view <= 0 gives such focal lengths: COLMAP rejects them
        k = intr.copy()
        k[1, 0, 0] = f
        with pytest.raises(ValueError, match="focal"):
            C.write_colmap_model(tmp_path, extr, k, SIZES, names, xyz, rgb)


def test_colmap_names():
    assert C.colmap_names(["a b.jpg", "a_b.jpg", "c.png", "a\tb.jpg"]) == [
        "a_b.jpg", "a_b-1.jpg", "c.png", "a_b-2.jpg"]


def _frames_info_crop(s: int, width: int, height: int) -> list:
    """FrameInfos of `width` x `height` images halved and then cropped by 3 rows at the top."""
    return [FrameInfo(f"img {i}.png", width, height, 0.5, 0.5, 0.0, -3.0, index=i) for i in range(s)]


def test_export_colmap_layout_rescaled_dropped_capped(tmp_path, caplog):
    extr, intr, xyz, rgb, _ = _colmap_inputs()
    intr[2, 0, 0] = -5.0  # a negative focal length: frame 2 is left out
    infos = _frames_info_crop(4, 2 * W, 2 * H + 6)  # 32 x 30 -> 16 x 15 -> rows 3..14
    originals = [np.full((2 * H + 6, 2 * W, 3), 40 * i, np.uint8) for i in range(4)]
    with caplog.at_level("WARNING", logger="xsvggt_jax.io.colmap"):
        stats = C.export_colmap(tmp_path / "colmap", extr, intr, infos, iter(originals), xyz, rgb, max_points=10)
    assert stats == {"colmap_images": 3, "colmap_points": 10, "colmap_dropped_frames": [2]}
    assert any("frames [2]" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in (tmp_path / "colmap" / "images").iterdir()) == ["img_0.png", "img_1.png",
                                                                                 "img_3.png"]
    from PIL import Image
    with Image.open(tmp_path / "colmap" / "images" / "img_3.png") as img:
        assert img.size == (2 * W, 2 * H + 6) and np.asarray(img)[0, 0, 0] == 120
    rec = pycolmap.Reconstruction(str(tmp_path / "colmap" / "sparse" / "0"))
    assert rec.num_points3D() == 10 and sorted(im.name for im in rec.images.values()) == [
        "img_0.png", "img_1.png", "img_3.png"]
    for n, i in enumerate((0, 1, 3)):
        im = rec.images[n + 1]
        assert im.name == f"img_{i}.png"
        np.testing.assert_allclose(im.cam_from_world().matrix(), extr[i], atol=1e-7)
        cam = rec.cameras[im.camera_id]
        assert (cam.width, cam.height) == (2 * W, 2 * H + 6) and cam.verify_params()
        k = intr[i]
        np.testing.assert_allclose(cam.params, [2 * k[0, 0], 2 * k[1, 1], 2 * k[0, 2], 2 * (k[1, 2] + 3)],
                                   rtol=1e-9)
    kept = np.stack([p.xyz for p in rec.points3D.values()])  # a subset of the given points, no repeats
    nearest = np.abs(kept[:, None] - xyz[None].astype(np.float64)).max(-1).argmin(1)
    np.testing.assert_allclose(kept, xyz[nearest], rtol=1e-7, atol=1e-7)
    assert len(set(nearest.tolist())) == 10


def test_export_colmap_links_original_files(tmp_path):
    extr, intr, xyz, rgb, _ = _colmap_inputs()
    src = tmp_path / "in"
    src.mkdir()
    files = []
    for i in range(4):
        files.append(src / f"img {i}.png")
        files[-1].write_bytes(b"original bytes %d" % i)
    C.export_colmap(tmp_path / "colmap", extr, intr, _frames_info_crop(4, W, H), files, xyz, rgb, binary=True)
    out = tmp_path / "colmap" / "images" / "img_1.png"
    assert out.read_bytes() == b"original bytes 1"
    assert sorted(p.name for p in (tmp_path / "colmap" / "sparse" / "0").iterdir()) == [
        "cameras.bin", "images.bin", "points3D.bin"]


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


def test_depth_previews(tmp_path):
    from PIL import Image

    ramp = np.linspace(1.0, 6.0, W)[None, :].repeat(H, 0)  # depth grows left to right
    depth = np.stack([ramp, ramp * 0.5]).astype(np.float32)[..., None]
    depth[1, 0, 0, 0] = np.nan
    d = E.write_depth(tmp_path / "depth", depth)
    assert (d / "depth_00000.png").exists()  # the raw 16-bit maps stay
    for i in range(2):
        with Image.open(d / "preview" / f"depth_{i:05d}.png") as img:
            assert img.mode == "RGB" and img.height == H and img.width > W  # the colour bar at the right
            rgb = np.asarray(img).astype(int)
        row = rgb[H // 2, :W]
        assert len({tuple(c) for c in row}) >= W // 2  # colours follow the depth
        assert np.abs(row[0] - row[-1]).sum() > 200
    with Image.open(d / "preview" / "depth_00001.png") as img:
        assert np.asarray(img)[0, 0].tolist() == [0, 0, 0]  # invalid depth: black
    near, far = E.depth_preview_range(depth[..., 0])
    assert 0.5 <= near < 1.1 and 5.5 < far <= 6.0  # one colour scale for all frames
    # the same depth (3.0: column 6 of frame 0, column 15 of frame 1) has the same colour in every frame
    p0, p1 = (E.depth_preview(depth[i, ..., 0], near, far).astype(int) for i in range(2))
    assert depth[0, 5, 6, 0] == pytest.approx(3.0) and depth[1, 5, 15, 0] == pytest.approx(3.0)
    assert np.abs(p0[5, 6] - p1[5, 15]).max() <= 1 and np.abs(p0[5, 6] - p0[5, 15]).max() > 50


def test_stream_plot_keeps_compile_apart_and_shows_filled_bytes(tmp_path):
    from PIL import Image

    lat = np.r_[30.0, np.linspace(0.05, 0.08, 9)]  # frame 0: 30 s with compilation
    filled = np.arange(10) * 3_000_000
    fig = P.stream_figure(lat, 40_000_000, filled)
    ax_l, ax_c = fig.axes
    assert ax_l.get_ylim()[1] < 1000.0  # ms: the compile outlier does not set the scale
    (line,) = ax_l.get_lines()
    assert line.get_xdata().tolist() == list(range(1, 10)) and "30.00 s" in ax_l.get_title()
    curves = {ln.get_label(): ln.get_ydata() for ln in ax_c.get_lines()}
    np.testing.assert_allclose(curves["filled"], filled / 1e6)
    np.testing.assert_allclose(curves["allocated"], 40.0)
    assert "filled" not in {ln.get_label() for ln in P.stream_figure(lat, 40e6).axes[1].get_lines()}
    out = P.plot_stream(tmp_path / "stream.png", lat, 40e6, filled)
    with Image.open(out) as img:
        assert img.size == (800, 600)
    P.stream_figure(lat[:1], 1e6)  # a single frame: nothing but the compile to tell
    with pytest.raises(ValueError):
        P.stream_figure(lat, 1e6, filled[:-1])
    assert _tmp_leftovers(tmp_path) == []


def test_offline_plot(tmp_path):
    fig = P.offline_figure(12.0, 3.0, 30, 2_000_000_000)
    (ax,) = fig.axes
    assert [b.get_width() for b in ax.patches] == [12.0, 3.0]
    assert "0.100 s/frame" in ax.get_title() and "2000 MB" in ax.get_title()
    assert P.plot_offline(tmp_path / "stream.png", 12.0, 3.0, 30, 2_000_000_000).exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert _tmp_leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- write_outputs


def test_write_outputs_video_times_and_colmap(tmp_path):
    from PIL import Image

    from _refs import write_video as _write_video
    from xsvggt_jax.io.sources import open_frames
    from xsvggt_jax.io.rgb import to_uint8_rgb as to_uint8
    from xsvggt_jax.io.outputs import ExportOptions, write_outputs

    src = open_frames(_write_video(tmp_path / "clip.webm", n=6, codec="libvpx"), target=28, fps=4)
    assert (src.num_frames, src.height, src.width) == (3, 28, 28)  # 64 x 48 -> 28 x 28: x 7/16, x 7/12
    rng = np.random.default_rng(9)
    pose = _random_poses(rng, 3)
    pose[1, 7:] = 0.0  # an untrained field of view: infinite focal length, frame 1 leaves the COLMAP model
    preds = {"camera_pose": pose, "depth": rng.uniform(1, 3, (3, 28, 28, 1)),
             "depth_conf": rng.uniform(1, 2, (3, 28, 28))}
    out = tmp_path / "out"
    stats = write_outputs(out, preds, to_uint8(np.stack(list(src))), src, ExportOptions(colmap_binary=True))
    assert stats["colmap_images"] == 2 and stats["colmap_dropped_frames"] == [1]

    ts, _, _ = _parse_tum(out / "trajectory.txt")
    np.testing.assert_allclose(ts, [0.0, 0.3, 0.5])  # presentation times of video frames 0, 3, 5
    npz = np.load(out / "predictions.npz")
    np.testing.assert_allclose(npz["timestamps"], ts)
    rec = pycolmap.Reconstruction(str(out / "colmap" / "sparse" / "0"))
    assert sorted(im.name for im in rec.images.values()) == ["frame_000000.jpg", "frame_000005.jpg"]
    for im in rec.images.values():
        i = {"frame_000000.jpg": 0, "frame_000005.jpg": 2}[im.name]
        np.testing.assert_allclose(im.cam_from_world().matrix(), npz["extrinsics"][i], atol=1e-6)
        cam = rec.cameras[im.camera_id]
        k = npz["intrinsics"][i].astype(np.float64)
        assert (cam.width, cam.height) == (64, 48) and cam.verify_params()
        np.testing.assert_allclose(cam.params, [k[0, 0] * 64 / 28, k[1, 1] * 48 / 28, 32.0, 24.0], rtol=1e-6)
        with Image.open(out / "colmap" / "images" / im.name) as img:
            assert img.size == (64, 48)
            assert round(float(np.asarray(img).mean()) / 20) == {0: 0, 2: 5}[i]  # the frame's own picture
    assert (out / "depth" / "preview" / "depth_00002.png").exists() and (out / "points.ply").exists()


@pytest.mark.parametrize("field, value", [("points", "mesh"), ("conf_percentile", 150.0),
                                          ("ply_max_pixels", 0), ("colmap_max_points", -1)])
def test_export_options_checked_up_front(field, value):
    from xsvggt_jax.io.outputs import ExportError, ExportOptions

    with pytest.raises(ExportError, match=field.replace("_", " ")):
        ExportOptions(**{field: value})
