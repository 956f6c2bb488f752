"""Dataset readers on small files written in each dataset's exact on-disk format from a procedural
scene; what is read back is compared with the scene's ground truth (images, depth, poses,
intrinsics), and the read depth + cameras must land on the scene's analytic surfaces."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xsvggt_jax.data import DATASETS, DataError, load_dataset
from xsvggt_jax.data.base import Sequence, invert_pose, read_png16, write_png16
from xsvggt_jax.data.kitti import read_kitti
from xsvggt_jax.data.preprocess import preprocess_frame
from xsvggt_jax.data.procedural import SceneConfig, make_scene
from xsvggt_jax.data.rgbd_recon import NRGBD_K, SEVEN_SCENES_K, read_7scenes, read_nrgbd
from xsvggt_jax.data.scannet import read_scannet
from xsvggt_jax.data.sintel import read_dpt, read_sintel, write_cam, write_dpt
from xsvggt_jax.data.tum import BONN_INTRINSICS, TUM_INTRINSICS, associate, read_bonn, read_tum
from xsvggt_jax.geometry import mat_to_quat, unproject_depth

W, H = 64, 48  # 640x480 cameras scaled by 1/10
CONFIG = SceneConfig(frames=3, height=H, width=W, num_boxes=2, num_spheres=1)


def _k640(fx, fy, cx, cy) -> np.ndarray:
    return np.diag([W / 640, H / 480, 1.0]) @ np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])


def _scene(k: np.ndarray, seed: int):
    return make_scene(CONFIG, seed=seed, intrinsics=k)


def _rgb(sc, f: int) -> np.ndarray:
    return np.round(sc.images[f] * 255).astype(np.uint8)


def _c2w(sc, f: int) -> np.ndarray:
    return invert_pose(sc.extrinsics[f].astype(np.float64))


def _save(path: Path, arr: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def _depth16(path: Path, depth: np.ndarray, scale: float) -> np.ndarray:
    raw = np.round(depth.astype(np.float64) * scale).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png16(path, raw)
    return raw


def _tum_line(ts: float, c2w: np.ndarray) -> str:
    q = mat_to_quat(c2w[:3, :3])
    return f"{ts:.6f} " + " ".join(f"{v:.10f}" for v in (*c2w[:3, 3], *q))


def _check(seq, sc, frames: list[int], expected_depth: list[np.ndarray], k: np.ndarray, jpeg: bool = False,
           surface_tol: float = 2e-3) -> None:
    """seq[n] holds scene frame frames[n]; expected_depth[n] is the depth the file encodes."""
    for n, f in enumerate(frames):
        if jpeg:
            assert np.abs(seq.rgb(n).astype(int) - _rgb(sc, f)).mean() < 1.5
        else:
            np.testing.assert_array_equal(seq.rgb(n), _rgb(sc, f))
        assert seq.image(n).shape == (H, W, 3)
        np.testing.assert_array_equal(seq.depth(n), expected_depth[n])
        np.testing.assert_allclose(seq.extrinsics[n], np.vstack([sc.extrinsics[f], [0, 0, 0, 1]]), atol=2e-6)
        np.testing.assert_allclose(seq.intrinsics[n], k, rtol=1e-12)
        d = seq.depth(n)
        pts = unproject_depth(d[None], seq.extrinsics[n:n + 1, :3], seq.intrinsics[n:n + 1])[0]
        assert sc.world.surface_distance(pts[d > 0].astype(np.float64)).max() < surface_tol


def _expected(raw: np.ndarray, scale: float, bad: np.ndarray) -> np.ndarray:
    return np.where(bad, 0.0, raw / scale).astype(np.float32)


def _same(one: Sequence, ref: Sequence) -> None:
    """`one` holds exactly the sequence `ref`: names, ground truth, every frame and depth map."""
    assert (one.name, one.frame_ids, one.info) == (ref.name, ref.frame_ids, ref.info)
    for field in ("intrinsics", "depth_intrinsics", "extrinsics", "pose_valid", "timestamps"):
        a, b = getattr(one, field), getattr(ref, field)
        assert (a is None) == (b is None), field
        if b is not None:
            np.testing.assert_array_equal(a, b, err_msg=field)
    for i in range(len(ref)):
        np.testing.assert_array_equal(one.rgb(i), ref.rgb(i))
        if ref.load_depth is not None:
            np.testing.assert_array_equal(one.depth(i), ref.depth(i))


def _single(dataset: str, folder: Path, ref: Sequence, **options) -> None:
    """`xsvggt eval FOLDER --dataset <dataset>` on one sequence folder reads that sequence alone."""
    ds = load_dataset(dataset, folder, **options)
    assert len(ds) == 1
    _same(ds[0], ref)


# ------------------------------------------------------------------------------------------ 7-Scenes

def test_7scenes_test_split_keyframes_every_200(tmp_path):
    k = _k640(525, 525, 320, 240)
    sc = _scene(k, seed=11)
    scene = tmp_path / "chess"
    (scene / "seq-01").mkdir(parents=True)
    (scene / "seq-02").mkdir()
    (scene / "TestSplit.txt").write_text("sequence2\n")
    (scene / "TrainSplit.txt").write_text("sequence1\n")
    expected = []
    for n in range(401):  # keyframes 0, 200, 400 hold scene frames 0, 1, 2
        stem = scene / "seq-02" / f"frame-{n:06d}"
        if n % 200:
            Path(f"{stem}.color.png").touch()  # upstream counts colour files to find the length
            continue
        f = n // 200
        _save(Path(f"{stem}.color.png"), _rgb(sc, f))
        raw = np.round(sc.depth[f].astype(np.float64) * 1000).astype(np.uint16)
        raw[0, :3] = (65535, 12000, 0)  # invalid code, beyond 10 m, no return
        write_png16(Path(f"{stem}.depth.proj.png"), raw)
        np.savetxt(f"{stem}.pose.txt", _c2w(sc, f))
        bad = np.zeros_like(raw, bool)
        bad[0, :3] = True
        expected.append(_expected(raw, 1000, bad))
    ds = read_7scenes(tmp_path)
    assert [s.name for s in ds] == ["chess/seq-02"]
    seq = ds[0]
    _single("7scenes", scene, seq)                  # a scene folder: its test split
    _single("7scenes", scene / "seq-02", seq)       # a sequence folder: that sequence
    assert seq.frame_ids == ("000000", "000200", "000400") and seq.depth_intrinsics is None
    _check(seq, sc, [0, 1, 2], expected, k)
    np.testing.assert_allclose(k, SEVEN_SCENES_K * [[0.1], [0.1], [1]])
    assert ds.info.name == "7scenes" and ds.info.depth_scale == 1000


def test_7scenes_missing_split_is_a_data_error(tmp_path):
    (tmp_path / "chess").mkdir()
    with pytest.raises(DataError, match="TestSplit.txt"):
        read_7scenes(tmp_path)


def test_7scenes_raw_depth_uses_the_depth_camera(tmp_path, caplog):
    k_rgb, k_depth = _k640(525, 525, 320, 240), _k640(585, 585, 320, 240)
    sc_rgb, sc_depth = _scene(k_rgb, seed=21), _scene(k_depth, seed=21)  # same world and path
    seq_dir = tmp_path / "fire" / "seq-01"
    seq_dir.mkdir(parents=True)
    (tmp_path / "fire" / "TestSplit.txt").write_text("sequence1\n")
    expected = []
    for f in range(3):
        _save(seq_dir / f"frame-{f:06d}.color.png", _rgb(sc_rgb, f))
        raw = _depth16(seq_dir / f"frame-{f:06d}.depth.png", sc_depth.depth[f], 1000)
        expected.append(_expected(raw, 1000, raw == 0))
        np.savetxt(seq_dir / f"frame-{f:06d}.pose.txt", _c2w(sc_rgb, f))
    seq = read_7scenes(tmp_path, kf_every=1)[0]
    assert "not registered" in caplog.text
    np.testing.assert_allclose(seq.depth_intrinsics[0], k_depth)
    for n in range(3):
        np.testing.assert_array_equal(seq.depth(n), expected[n])
        pts = unproject_depth(seq.depth(n)[None], seq.extrinsics[n:n + 1, :3], seq.depth_intrinsics[n:n + 1])[0]
        assert sc_rgb.world.surface_distance(pts[seq.depth(n) > 0].astype(np.float64)).max() < 2e-3


# ------------------------------------------------------------------------------------------- NRGBD

def test_nrgbd_opengl_poses_and_keyframes(tmp_path):
    k = _k640(554.2562584220408, 554.2562584220408, 320, 240)
    sc = _scene(k, seed=12)
    d = tmp_path / "breakfast_room"
    (d / "images").mkdir(parents=True)
    lines, expected = [], []
    for n in range(7):  # min(500, 7 // 2) = 3: frames 0, 3, 6
        f = n // 3
        if n % 3:
            (d / "images" / f"img{n}.png").touch()
            c2w = np.eye(4)
        else:
            _save(d / "images" / f"img{n}.png", _rgb(sc, f))
            raw = _depth16(d / "depth" / f"depth{n}.png", sc.depth[f], 1000)
            expected.append(_expected(raw, 1000, raw == 0))
            c2w = _c2w(sc, f) * [1, -1, -1, 1]  # OpenCV -> OpenGL camera axes
        block = [" ".join(f"{v:.12f}" for v in row) for row in c2w]
        if n == 3:
            block = [" ".join(["nan"] * 4)] * 4
        lines += block
    (d / "poses.txt").write_text("\n".join(lines) + "\n")
    seq = read_nrgbd(tmp_path)[0]
    _single("nrgbd", d, seq)
    assert seq.frame_ids == ("0", "3", "6")
    np.testing.assert_array_equal(seq.pose_valid, [True, False, True])
    assert not np.isfinite(seq.extrinsics[1]).all()
    for n, f in [(0, 0), (2, 2)]:
        np.testing.assert_allclose(seq.extrinsics[n], np.vstack([sc.extrinsics[f], [0, 0, 0, 1]]), atol=2e-6)
        np.testing.assert_array_equal(seq.depth(n), expected[n])
        np.testing.assert_array_equal(seq.rgb(n), _rgb(sc, f))
    np.testing.assert_allclose(seq.intrinsics[0], NRGBD_K * [[0.1], [0.1], [1]])


# --------------------------------------------------------------------------------------------- TUM

def test_associate_is_greedy_and_unique():
    assert associate([1.0, 1.1, 1.2], [1.005, 1.012, 1.104, 1.5]) == [(1.0, 1.005), (1.1, 1.104)]


def test_tum_raw_layout_association_and_stride(tmp_path):
    fx, fy, cx, cy = TUM_INTRINSICS["freiburg3"]
    k = _k640(fx, fy, cx, cy)
    sc = _scene(k, seed=13)
    d = tmp_path / "rgbd_dataset_freiburg3_walking_xyz"
    rgb_lines, depth_lines, gt_lines = ["# color images"], ["# depth maps"], ["# ground truth", "# timestamp tx ..."]
    expected, times = [], []
    for n in range(9):  # n = 4 has no ground truth: matches 0 1 2 3 5 6 7 8, [::3] -> 0 3 7
        ts = 100.0 + 0.1 * n
        rgb_lines.append(f"{ts:.6f} rgb/{ts:.6f}.png")
        depth_lines.append(f"{ts + 0.007:.6f} depth/{ts + 0.007:.6f}.png")
        f = {0: 0, 3: 1, 7: 2}.get(n)
        if n != 4:
            gt_lines.append(_tum_line(ts + 0.004, _c2w(sc, f) if f is not None else np.eye(4)))
            gt_lines.append(_tum_line(ts + 0.015, np.eye(4)))  # a worse match, never chosen
        else:
            gt_lines.append(_tum_line(ts + 0.03, np.eye(4)))  # beyond the 0.02 s limit
        if f is not None:
            _save(d / "rgb" / f"{ts:.6f}.png", _rgb(sc, f))
            raw = _depth16(d / "depth" / f"{ts + 0.007:.6f}.png", sc.depth[f], 5000)
            expected.append(_expected(raw, 5000, raw == 0))
            times.append(ts + 0.004)
    for name, lines in (("rgb.txt", rgb_lines), ("depth.txt", depth_lines), ("groundtruth.txt", gt_lines)):
        (d / name).write_text("\n".join(lines) + "\n")
    ds = read_tum(tmp_path)
    seq = ds[0]
    assert seq.name == d.name and len(seq) == 3
    np.testing.assert_allclose(seq.timestamps, times, atol=1e-9)
    _check(seq, sc, [0, 1, 2], expected, k)
    assert [s.name for s in DATASETS["tum-dynamics"](tmp_path)] == [d.name]
    _single("tum", d, seq)
    _single("tum-dynamics", d, seq)


def test_tum_pose_subset_is_the_first_90_at_stride_3(tmp_path):
    d = tmp_path / "seq"
    (d / "rgb").mkdir(parents=True)
    (d / "depth").mkdir()
    tiny = tmp_path / "tiny.png"
    _save(tiny, np.zeros((4, 4, 3), np.uint8))
    ts = 10.0 + 0.05 * np.arange(300)
    for t in ts:
        shutil.copy(tiny, d / "rgb" / f"{t:.3f}.png")
        write_png16(d / "depth" / f"{t:.3f}.png", np.full((4, 4), 5000, np.uint16))
    (d / "rgb.txt").write_text("".join(f"{t:.3f} rgb/{t:.3f}.png\n" for t in ts))
    (d / "depth.txt").write_text("".join(f"{t:.3f} depth/{t:.3f}.png\n" for t in ts))
    (d / "groundtruth.txt").write_text("".join(f"{t:.3f} {t} 0 0 0 0 0 1\n" for t in ts))
    seq = read_tum(tmp_path)[0]
    _single("tum", d, seq)
    assert len(seq) == 90
    np.testing.assert_allclose(seq.timestamps, ts[::3][:90])
    np.testing.assert_allclose(-seq.extrinsics[:, 0, 3], ts[::3][:90])  # identity rotation: t = -position
    np.testing.assert_array_equal(seq.depth(89), np.ones((4, 4), np.float32))


def test_tum_prepared_rgb_90_layout(tmp_path):
    fx, fy, cx, cy = TUM_INTRINSICS["freiburg2"]
    k = _k640(fx, fy, cx, cy)
    sc = _scene(k, seed=14)
    d = tmp_path / "rgbd_dataset_freiburg2_desk"
    expected = []
    for f in range(3):
        _save(d / "rgb_90" / f"{f:04d}.png", _rgb(sc, f))
        raw = _depth16(d / "depth_90" / f"{f:04d}.png", sc.depth[f], 5000)
        expected.append(_expected(raw, 5000, raw == 0))
    (d / "groundtruth_90.txt").write_text("".join(_tum_line(f, _c2w(sc, f)) + "\n" for f in range(3)))
    seq = read_tum(tmp_path)[0]
    _check(seq, sc, [0, 1, 2], expected, k)
    _single("tum", d, seq)


# -------------------------------------------------------------------------------------------- Bonn

def test_bonn_frames_30_to_140(tmp_path):
    k = _k640(*BONN_INTRINSICS)
    sc = _scene(k, seed=15)
    d = tmp_path / "rgbd_bonn_balloon2"
    gt = ["# timestamp tx ty tz qx qy qz qw"]
    expected = []
    placeholder = None
    for n in range(145):  # [30:140]: sequence index 0, 55, 109 hold scene frames 0, 1, 2
        ts = 1000.0 + n / 30
        f = {30: 0, 85: 1, 139: 2}.get(n)
        src = f if f is not None else 0
        if f is not None or placeholder is None:
            _save(d / "rgb" / f"{ts:.6f}.png", _rgb(sc, src))
            raw = _depth16(d / "depth" / f"{ts:.6f}.png", sc.depth[src], 5000)
            placeholder = placeholder or (d / "rgb" / f"{ts:.6f}.png", d / "depth" / f"{ts:.6f}.png")
            if f is not None:
                expected.append(_expected(raw, 5000, raw == 0))
        else:
            shutil.copy(placeholder[0], d / "rgb" / f"{ts:.6f}.png")
            shutil.copy(placeholder[1], d / "depth" / f"{ts:.6f}.png")
        gt.append(_tum_line(ts, _c2w(sc, f) if f is not None else np.eye(4)))
    (d / "groundtruth.txt").write_text("\n".join(gt) + "\n")
    seq = read_bonn(tmp_path, sequences=["balloon2"])[0]
    _single("bonn", d, seq)
    assert len(seq) == 110 and seq.frame_ids[0] == f"{1000 + 30 / 30:.6f}"
    sub = [0, 55, 109]
    for n, f in zip(sub, range(3)):
        np.testing.assert_array_equal(seq.rgb(n), _rgb(sc, f))
        np.testing.assert_array_equal(seq.depth(n), expected[f])
        np.testing.assert_allclose(seq.extrinsics[n], np.vstack([sc.extrinsics[f], [0, 0, 0, 1]]), atol=2e-6)
    np.testing.assert_allclose(seq.intrinsics[0], k)
    assert read_bonn.__defaults__[0] == ("balloon2", "crowd2", "crowd3", "person_tracking2", "synchronous")
    with pytest.raises(DataError, match="rgbd_bonn_crowd2"):
        read_bonn(tmp_path)
    assert load_dataset("bonn", tmp_path, sequences=["balloon2"]).info.max_depth == 70


# ----------------------------------------------------------------------------------------- ScanNet

def _k44(k: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = k
    return out


def test_scannet_exported_layout_first_270_stride_3(tmp_path):
    k = np.array([[58.0, 0, 31.5], [0, 58.0, 23.5], [0, 0, 1]])
    sc = _scene(k, seed=16)
    d = tmp_path / "scene0707_00"
    (d / "intrinsic").mkdir(parents=True)
    np.savetxt(d / "intrinsic" / "intrinsic_color.txt", _k44(k))
    np.savetxt(d / "intrinsic" / "intrinsic_depth.txt", _k44(k))
    expected = {}
    for n in range(275):  # sorted by number (not by name): [:270:3] -> 0, 3, ..., 267
        f = {0: 0, 3: 1, 267: 2}.get(n, 0)
        _save(d / "color" / f"{n}.jpg", _rgb(sc, f), quality=100, subsampling=0)
        raw = _depth16(d / "depth" / f"{n}.png", sc.depth[f], 1000)
        expected[n] = _expected(raw, 1000, raw == 0)
        pose = np.full((4, 4), -np.inf) if n == 3 else _c2w(sc, f)
        (d / "pose").mkdir(exist_ok=True)
        np.savetxt(d / "pose" / f"{n}.txt", pose)
    seq = read_scannet(tmp_path)[0]
    _single("scannet", d, seq)
    assert len(seq) == 90 and seq.frame_ids[:3] == ("0", "3", "6") and seq.frame_ids[-1] == "267"
    np.testing.assert_array_equal(seq.pose_valid[:3], [True, False, True])
    for n, idx, f in [(0, 0, 0), (89, 267, 2)]:
        assert np.abs(seq.rgb(n).astype(int) - _rgb(sc, f)).mean() < 1.5  # JPEG
        np.testing.assert_array_equal(seq.depth(n), expected[idx])
        np.testing.assert_allclose(seq.extrinsics[n], np.vstack([sc.extrinsics[f], [0, 0, 0, 1]]), atol=2e-6)
    np.testing.assert_allclose(seq.intrinsics[0], k)
    np.testing.assert_allclose(seq.depth_intrinsics[0], k)
    with pytest.raises(DataError, match="own camera"):
        preprocess_frame(seq, 0, target=42)


def test_scannet_prepared_color_90_layout(tmp_path):
    k = np.array([[58.0, 0, 31.5], [0, 58.0, 23.5], [0, 0, 1]])
    sc = _scene(k, seed=17)
    d = tmp_path / "scene0708_00"
    (d / "intrinsic").mkdir(parents=True)
    np.savetxt(d / "intrinsic" / "intrinsic_color.txt", _k44(k))
    np.savetxt(d / "intrinsic" / "intrinsic_depth.txt", _k44(k))
    expected = []
    for f in range(3):
        _save(d / "color_90" / f"frame_{f:04d}.jpg", _rgb(sc, f), quality=100, subsampling=0)
        raw = _depth16(d / "depth_90" / f"frame_{f:04d}.png", sc.depth[f], 1000)
        expected.append(_expected(raw, 1000, raw == 0))
    (d / "pose_90.txt").write_text("".join(" ".join(map(str, _c2w(sc, f).reshape(-1))) + "\n" for f in range(3)))
    seq = read_scannet(tmp_path)[0]
    _check(seq, sc, [0, 1, 2], expected, k, jpeg=True)
    _single("scannet", d, seq)


# ------------------------------------------------------------------------------------------ Sintel

def test_sintel_dpt_and_cam(tmp_path):
    k = np.array([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    sc = _scene(k, seed=18)
    for f in range(3):
        name = f"frame_{f + 1:04d}"
        _save(tmp_path / "final" / "alley_2" / f"{name}.png", _rgb(sc, f))
        (tmp_path / "depth" / "alley_2").mkdir(parents=True, exist_ok=True)
        (tmp_path / "camdata_left" / "alley_2").mkdir(parents=True, exist_ok=True)
        write_dpt(tmp_path / "depth" / "alley_2" / f"{name}.dpt", sc.depth[f])
        write_cam(tmp_path / "camdata_left" / "alley_2" / f"{name}.cam", k, sc.extrinsics[f].astype(np.float64))
    raw = (tmp_path / "depth" / "alley_2" / "frame_0001.dpt").read_bytes()
    assert raw[:4] == b"PIEH" and int.from_bytes(raw[4:8], "little") == W and len(raw) == 12 + 4 * W * H
    seq = read_sintel(tmp_path, sequences=["alley_2"])[0]
    _single("sintel", tmp_path / "final" / "alley_2", seq)  # the sequence's frame folder
    assert seq.frame_ids == ("frame_0001", "frame_0002", "frame_0003")
    _check(seq, sc, [0, 1, 2], list(sc.depth), k, surface_tol=1e-4)
    with pytest.raises(DataError, match="ambush_4"):
        read_sintel(tmp_path)  # the protocol's 14 sequences, not all present here
    bad = tmp_path / "bad.dpt"
    bad.write_bytes(b"\0" * 20)
    with pytest.raises(DataError, match="wrong tag"):
        read_dpt(bad)
    bad.write_bytes(raw[:-4])
    with pytest.raises(DataError, match="header says"):
        read_dpt(bad)


# ------------------------------------------------------------------------------------------- KITTI

def _sparse_kitti(sc, f: int, path: Path, seed: int) -> np.ndarray:
    raw = np.round(sc.depth[f].astype(np.float64) * 256).astype(np.uint16)
    raw[np.random.default_rng(seed).uniform(size=raw.shape) < 0.7] = 0  # sparse LiDAR
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png16(path, raw)
    return _expected(raw, 256, raw == 0)


def _kitti_k(path: Path, k: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(f"{v:.6f}" for v in k.reshape(-1)) + "\n")


def test_kitti_gathered_layout(tmp_path):
    k = np.array([[72.0, 0, 30.5], [0, 72.0, 22.25], [0, 0, 1]])
    sc = _scene(k, seed=19)
    seq_name, expected = "2011_09_26_drive_0002_sync_02", []
    for f in range(3):
        frame = f"{f + 5:010d}"
        _save(tmp_path / "image_gathered" / seq_name / f"{frame}.png", _rgb(sc, f))
        expected.append(_sparse_kitti(sc, f, tmp_path / "groundtruth_depth_gathered" / seq_name / f"{frame}.png", f))
        _kitti_k(tmp_path / "intrinsics" / f"2011_09_26_drive_0002_sync_image_{frame}_image_02.txt", k)
    seq = read_kitti(tmp_path)[0]
    assert seq.name == seq_name and seq.extrinsics is None
    _single("kitti", tmp_path / "image_gathered" / seq_name, seq)  # the sequence's frame folder
    for n in range(3):
        np.testing.assert_array_equal(seq.rgb(n), _rgb(sc, n))
        np.testing.assert_array_equal(seq.depth(n), expected[n])
        np.testing.assert_allclose(seq.intrinsics[n], k, atol=1e-6)
        ext = np.vstack([sc.extrinsics[n], [0, 0, 0, 1]])[None, :3]
        pts = unproject_depth(seq.depth(n)[None], ext, seq.intrinsics[n:n + 1])[0]
        assert sc.world.surface_distance(pts[seq.depth(n) > 0].astype(np.float64)).max() < 1e-2


def test_kitti_flat_layout_groups_drives_and_cameras(tmp_path):
    k = np.array([[72.0, 0, 30.5], [0, 72.0, 22.25], [0, 0, 1]])
    sc = _scene(k, seed=20)
    items = [("2011_09_26_drive_0002_sync", "0000000011", "02", 1),
             ("2011_09_26_drive_0002_sync", "0000000009", "02", 0),
             ("2011_09_29_drive_0026_sync", "0000000100", "03", 2)]
    expected = {}
    for drive, frame, cam, f in items:
        _save(tmp_path / "image" / f"{drive}_image_{frame}_image_{cam}.png", _rgb(sc, f))
        gt = tmp_path / "groundtruth_depth" / f"{drive}_groundtruth_depth_{frame}_image_{cam}.png"
        expected[f] = _sparse_kitti(sc, f, gt, f)
        _kitti_k(tmp_path / "intrinsics" / f"{drive}_image_{frame}_image_{cam}.txt", k)
    ds = load_dataset("kitti", tmp_path)
    assert [s.name for s in ds] == ["2011_09_26_drive_0002_sync_02", "2011_09_29_drive_0026_sync_03"]
    assert ds[0].frame_ids == ("0000000009", "0000000011")
    np.testing.assert_array_equal(ds[0].depth(0), expected[0])
    np.testing.assert_array_equal(ds[0].rgb(1), _rgb(sc, 1))
    np.testing.assert_array_equal(ds[1].depth(0), expected[2])
    assert ds.info.depth_scale == 256


# what each reader's "nothing found" message must name besides the folder it searched: the sequence
# folder's marks (and the root layout's names)
NOT_FOUND = {
    "tum": ("rgb.txt", "rgb_90/"),
    "tum-dynamics": ("rgbd_dataset_freiburg3_walking_xyz", "rgb.txt", "rgb_90/"),
    "bonn": ("rgbd_bonn_balloon2", "groundtruth.txt", "rgb_110/"),
    "scannet": ("color/", "color_90/"),
    "sintel": ("final/", "*.png"),
    "kitti": ("image_gathered/", "*.png", "image/"),
    "7scenes": ("TestSplit.txt", "frame-*.color.png"),
    "nrgbd": ("images/",),
}


@pytest.mark.parametrize("dataset", sorted(NOT_FOUND))
def test_nothing_found_names_the_pattern_and_the_folder(tmp_path, dataset):
    assert set(NOT_FOUND) == set(DATASETS) - {"procedural"}
    (tmp_path / "notes.txt").write_text("not a dataset\n")
    with pytest.raises(DataError) as e:
        load_dataset(dataset, tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: "), msg
    for needle in NOT_FOUND[dataset]:
        assert needle in msg, (needle, msg)


def test_registry_rejects_unknown_names_and_missing_folders(tmp_path):
    assert set(DATASETS) == {"7scenes", "nrgbd", "tum", "tum-dynamics", "scannet", "bonn", "sintel", "kitti",
                             "procedural"}
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("nyu", tmp_path)
    with pytest.raises(DataError, match="needs a data folder"):
        load_dataset("kitti")
    with pytest.raises(DataError, match="not found"):
        load_dataset("scannet", tmp_path / "absent")


def test_bad_files_and_shapes_are_data_errors(tmp_path):
    rgb_as_depth = tmp_path / "depth.png"
    _save(rgb_as_depth, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="one channel"):
        read_png16(rgb_as_depth)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read"):
        read_png16(tmp_path / "broken.png")
    info = DATASETS["procedural"](preset="tiny", num_sequences=1)[0].info
    with pytest.raises(DataError, match=r"intrinsics must be \[2, 3, 3\]"):
        Sequence(name="x", frame_ids=("a", "b"), load_rgb=None, load_depth=None, intrinsics=np.eye(3)[None],
                 extrinsics=None, info=info)
    with pytest.raises(DataError, match="none of the TUM-dynamics"):
        load_dataset("tum-dynamics", tmp_path)


# ------------------------------------------------------------------------- malformed dataset files

def _tiny_tum(d: Path, n: int = 3, gt_lines: list[str] | None = None) -> None:
    """A raw-layout TUM sequence of n 4x4 frames; gt_lines replaces groundtruth.txt's lines."""
    (d / "rgb").mkdir(parents=True)
    ts = [10.0 + 0.05 * i for i in range(n)]
    for t in ts:
        _save(d / "rgb" / f"{t:.3f}.png", np.zeros((4, 4, 3), np.uint8))
    (d / "rgb.txt").write_text("".join(f"{t:.3f} rgb/{t:.3f}.png\n" for t in ts))
    lines = gt_lines if gt_lines is not None else [f"{t:.3f} 0 0 0 0 0 0 1" for t in ts]
    (d / "groundtruth.txt").write_text("# timestamp tx ty tz qx qy qz qw\n" + "".join(ln + "\n" for ln in lines))


def _one_line_error(fn, where: str) -> str:
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(where), msg
    return msg


def test_tum_malformed_lines_name_the_file_and_line(tmp_path):
    d = tmp_path / "seq"
    _tiny_tum(d)
    (d / "rgb.txt").write_text("# colour\n10.000 rgb/10.000.png\n10.050\n")  # a timestamp alone
    assert "timestamp" in _one_line_error(lambda: read_tum(d), f"{d / 'rgb.txt'}:3: ")
    for bad, needle in (("10.050 0 0 zero 0 0 0 1", "not a number"), ("10.050 0 0 0 1", "got 5"),
                        ("10.050 0 0 0 0 0 0 0", "zero quaternion")):
        shutil.rmtree(d)
        _tiny_tum(d, gt_lines=["10.000 0 0 0 0 0 0 1", bad, "10.100 0 0 0 0 0 0 1"])
        assert needle in _one_line_error(lambda: read_tum(d), f"{d / 'groundtruth.txt'}:3: ")
    # the prepared layout reads its groundtruth_90.txt the same way
    p = tmp_path / "prep"
    _save(p / "rgb_90" / "0000.png", np.zeros((4, 4, 3), np.uint8))
    (p / "groundtruth_90.txt").write_text("0 0 0 0 0 0 0 0\n")
    assert "zero quaternion" in _one_line_error(lambda: read_tum(p), f"{p / 'groundtruth_90.txt'}:1: ")
    (p / "groundtruth_90.txt").unlink()
    msg = _one_line_error(lambda: read_tum(p), f"{p / 'groundtruth_90.txt'}: ")
    assert msg.count("groundtruth_90.txt") == 1 and "not found" in msg, msg
    # a NaN pose is still a missing pose, not an error
    shutil.rmtree(d)
    _tiny_tum(d, n=4, gt_lines=["10.000 0 0 0 0 0 0 1", "10.050 0 0 0 0 0 0 1", "10.100 0 0 0 0 0 0 1",
                                "10.150 nan nan nan nan nan nan nan"])  # stride 3: rows 0 and 3
    np.testing.assert_array_equal(read_tum(d)[0].pose_valid, [True, False])


def test_empty_frame_folders_and_short_bonn_sequences_are_one_line_errors(tmp_path):
    p = tmp_path / "prep"
    (p / "rgb_90").mkdir(parents=True)
    (p / "groundtruth_90.txt").write_text("0 0 0 0 0 0 0 1\n")
    assert "no .png" in _one_line_error(lambda: read_tum(p), f"{p / 'rgb_90'}: ")
    b = tmp_path / "rgbd_bonn_balloon2"
    _tiny_tum(b, n=40)  # the protocol takes frames [30:140]
    (b / "depth").mkdir()
    for f in (b / "rgb").iterdir():
        write_png16(b / "depth" / f.name, np.full((4, 4), 5000, np.uint16))
    msg = _one_line_error(lambda: read_bonn(b), f"{b / 'rgb'}: 40 frames")
    assert "[30:140]" in msg and "140" in msg
    b2 = tmp_path / "rgbd_bonn_crowd2"
    (b2 / "rgb_110").mkdir(parents=True)
    (b2 / "depth_110").mkdir()
    (b2 / "groundtruth_110.txt").write_text("")
    _one_line_error(lambda: read_bonn(b2), f"{b2 / 'rgb_110'}: no .png")


def test_nrgbd_short_pose_line_names_the_file_and_line(tmp_path):
    d = tmp_path / "scene"
    (d / "images").mkdir(parents=True)
    for i in range(2):
        _save(d / "images" / f"img{i}.png", np.zeros((4, 4, 3), np.uint8))
        _depth16(d / "depth" / f"depth{i}.png", np.ones((4, 4)), 1000)
    rows = ["1 0 0 0", "0 1 0 0", "0 0 1 0", "0 0 0 1"]
    (d / "poses.txt").write_text("\n".join(rows + ["1 0 0 0", "0 1 0", "0 0 1 0 0", "0 0 0 1"]) + "\n")
    msg = _one_line_error(lambda: read_nrgbd(d), f"{d / 'poses.txt'}:6: ")
    assert "expected 4 numbers, got 3" in msg
    (d / "poses.txt").write_text("\n".join(rows + ["1 0 0 0", "0 1 0 x", "0 0 1 0", "0 0 0 1"]) + "\n")
    assert "not a number" in _one_line_error(lambda: read_nrgbd(d), f"{d / 'poses.txt'}:6: ")
