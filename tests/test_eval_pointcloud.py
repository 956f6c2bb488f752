"""Point-cloud metrics: Acc / Comp / NC, PCA normals, ICP and the 7-Scenes / NRGBD alignment."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from xsvggt_jax.eval import (EvalInputError, accuracy_completeness, centre_crop, estimate_normals,
                             icp_point_to_point, median_shift_scale, reconstruction_metrics,
                             world_to_camera)
from xsvggt_jax.eval.geometry import lower_median


def _grid_cloud() -> np.ndarray:
    """Points on a jittered 3D grid of spacing 0.2 (nearest neighbours at least 0.12 apart)."""
    axis = np.arange(6) * 0.2
    pts = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    jitter = 0.04 * np.sin(np.arange(pts.size).reshape(pts.shape) * 1.7)
    return pts + jitter


def test_shift_by_d_gives_acc_comp_d_before_icp_and_zero_after():
    gt = _grid_cloud()
    d = 0.03
    pred = gt + d * np.array([0.6, 0.0, 0.8])
    normals = np.tile([0.0, 0.0, 1.0], (len(gt), 1))
    m = accuracy_completeness(pred, gt, normals, normals)
    for key in ("acc", "acc_med", "comp", "comp_med"):
        assert m[key] == pytest.approx(d, rel=1e-9)
    icp = icp_point_to_point(pred, gt, threshold=0.1)
    assert icp.fitness == 1.0 and icp.inlier_rmse < 1e-9
    np.testing.assert_allclose(icp.transformation[:3, 3], -d * np.array([0.6, 0.0, 0.8]), atol=1e-9)
    moved = pred @ icp.transformation[:3, :3].T + icp.transformation[:3, 3]
    after = accuracy_completeness(moved, gt, normals, normals)
    assert after["acc"] < 1e-9 and after["comp"] < 1e-9


def test_icp_ignores_pairs_beyond_the_threshold():
    gt = _grid_cloud()
    pred = gt + [0.3, 0.0, 0.0]  # farther than the 0.1 threshold from its own point
    icp = icp_point_to_point(pred, gt, threshold=0.01)
    assert icp.fitness == 0.0
    np.testing.assert_array_equal(icp.transformation, np.eye(4))


def test_normals_of_a_plane_and_nc_of_a_plane_with_itself():
    u, v = np.meshgrid(np.linspace(0, 1, 12), np.linspace(0, 1, 10))
    plane = np.stack([u.ravel(), v.ravel(), 0.5 * u.ravel() - 0.25 * v.ravel() + 2.0], -1)
    normals = estimate_normals(plane)
    expected = np.array([-0.5, 0.25, 1.0]) / np.linalg.norm([-0.5, 0.25, 1.0])
    np.testing.assert_allclose(np.abs(normals @ expected), 1.0, atol=1e-9)
    m = accuracy_completeness(plane, plane, normals, normals)
    assert m["acc"] == 0.0 and m["comp"] == 0.0
    assert m["nc"] == pytest.approx(1.0, abs=1e-12) and m["nc_med"] == pytest.approx(1.0, abs=1e-12)
    # normals at right angles give NC 0; opposite signs count as agreement (|cos|)
    side = np.tile(np.cross(expected, [1.0, 0.0, 0.0]) / np.linalg.norm(np.cross(expected, [1.0, 0.0, 0.0])),
                   (len(plane), 1))
    assert accuracy_completeness(plane, plane, side, normals)["nc"] == pytest.approx(0.0, abs=1e-12)
    assert accuracy_completeness(plane, plane, -normals, normals)["nc"] == pytest.approx(1.0, abs=1e-12)


def test_median_shift_scale_by_hand():
    # one frame 1 x 4: gt z = 1, 2, 3, 10 -> lower median z 2; x, y zero
    gt = np.zeros((1, 1, 4, 3))
    gt[..., 2] = [1.0, 2.0, 3.0, 10.0]
    pred = 3.0 * gt + [0.0, 0.0, 5.0]  # same shape, 3x larger, shifted in depth
    valid = np.ones((1, 1, 4), bool)
    pred_a, gt_a = median_shift_scale(pred, gt, valid)
    np.testing.assert_allclose(gt_a[..., 2], [[[-1.0, 0.0, 1.0, 8.0]]])
    np.testing.assert_allclose(pred_a, gt_a, atol=1e-12)
    # an invalid pixel does not enter the medians
    valid[0, 0, 3] = False
    gt[0, 0, 3, 2] = 1e6
    pred_b, gt_b = median_shift_scale(pred, gt, valid)
    np.testing.assert_allclose(gt_b[0, 0, :3, 2], [-1.0, 0.0, 1.0])


def test_lower_median():
    assert lower_median(np.array([4.0, 1.0, 3.0, 2.0])) == 2.0
    np.testing.assert_array_equal(lower_median(np.array([[1.0, 9.0], [2.0, 8.0]]), axis=0), [1.0, 8.0])


def test_centre_crop_window_matches_upstream():
    a = np.arange(6 * 8).reshape(1, 6, 8)
    # H = 6, W = 8, size 4: rows 3-2 .. 3+2, columns 4-2 .. 4+2
    np.testing.assert_array_equal(centre_crop(a, 4), a[:, 1:5, 2:6])
    with pytest.raises(EvalInputError, match="smaller than"):
        centre_crop(a, 7)


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """Two 12 x 12 frames of a bumpy surface seen from above, world coordinates, plus valid mask."""
    y, x = np.meshgrid(np.linspace(-1, 1, 12), np.linspace(-1, 1, 12), indexing="ij")
    frames = []
    for k in range(2):
        z = 3.0 + 0.3 * np.sin(2.5 * x + k) * np.cos(2.0 * y) + 0.2 * k
        frames.append(np.stack([x + 0.1 * k, y, z], -1))
    valid = np.ones((2, 12, 12), bool)
    valid[1, 5, 2:6] = False  # inside the 8 x 8 centre crop (rows and columns 2..9)
    return np.stack(frames), valid


def test_reconstruction_metrics_of_a_scaled_shifted_prediction_is_zero():
    gt, valid = _scene()
    first = np.hstack([Rotation.from_euler("z", 20, degrees=True).as_matrix(), [[0.1], [0.2], [0.3]]])
    gt_cam = world_to_camera(gt, first)
    pred = 0.4 * gt_cam + [0.0, 0.0, 1.5]  # scale and depth shift: removed by the alignment
    pred[1, 5, 3] = np.nan  # invalid anyway
    m = reconstruction_metrics(pred, gt_cam, valid, crop=8)
    assert m["points"] == 2 * 64 - 4
    assert m["acc"] < 1e-9 and m["comp"] < 1e-9 and m["nc"] == pytest.approx(1.0, abs=1e-9)
    # a small rotation is not removed by the median alignment but mostly by ICP (what remains is
    # the slight change of the median-norm scale, which a rigid ICP cannot undo)
    rot = Rotation.from_euler("x", 0.5, degrees=True).as_matrix()
    turned = gt_cam @ rot.T
    no_icp = reconstruction_metrics(turned, gt_cam, valid, crop=None, icp_threshold=None)
    with_icp = reconstruction_metrics(turned, gt_cam, valid, crop=None)
    assert no_icp["acc"] > 0.02 and with_icp["acc"] < no_icp["acc"] / 20
    assert with_icp["icp_fitness"] == 1.0
    # --use_proj: a Sim(3) of the ground truth is removed by Umeyama
    sim = 2.0 * gt_cam @ rot.T + [1.0, -2.0, 0.5]
    m = reconstruction_metrics(sim, gt_cam, valid, align="umeyama", crop=None, icp_threshold=None)
    assert m["acc"] < 1e-9 and np.isnan(m["icp_fitness"])


def test_reconstruction_metrics_rejects_bad_input():
    gt, valid = _scene()
    with pytest.raises(EvalInputError, match="need pred/gt"):
        reconstruction_metrics(gt[:1], gt, valid)
    with pytest.raises(EvalInputError, match="no valid"):
        reconstruction_metrics(gt, gt, np.zeros_like(valid))


def test_icp_normals_and_metrics_match_open3d():
    """Expected values computed with Open3D 0.20.0 on the same clouds: `registration_icp`
    (threshold 0.1, identity start, TransformationEstimationPointToPoint, default criteria), then
    `estimate_normals()` on both clouds and upstream's accuracy / completion."""
    k = np.arange(400, dtype=float)
    x, y = np.sin(k * 0.37), np.cos(k * 0.91)
    gt = np.stack([x, y, 3 + 0.3 * np.sin(2.5 * x) * np.cos(2 * y)], -1)
    rot = Rotation.from_euler("xyz", [1.0, -0.7, 0.5], degrees=True).as_matrix()
    noise = 0.004 * np.stack([np.sin(k * 1.3), np.cos(k * 2.1), np.sin(k * 0.7)], -1)
    pred = gt @ rot.T + [0.03, -0.02, 0.01] + noise
    pred[::10] += [0.0, 0.0, 0.5]  # 10% of the points beyond the threshold
    icp = icp_point_to_point(pred, gt, threshold=0.1)
    assert icp.fitness == pytest.approx(0.9, abs=1e-12)
    assert icp.inlier_rmse == pytest.approx(0.0048810921262229705, rel=1e-9)
    open3d_transformation = np.array([
        [0.9998867726875951, 0.00875968714026451, 0.01223559093753769, -0.02998236759071699],
        [-0.00897164212433995, 0.9998087614742575, 0.01737671191294081, 0.02030773010228354],
        [-0.01208103646128147, -0.01748451773762381, 0.9997741445934201, -0.00998142567178586],
        [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(icp.transformation, open3d_transformation, atol=1e-12)
    moved = pred @ icp.transformation[:3, :3].T + icp.transformation[:3, 3]
    m = accuracy_completeness(moved, gt, estimate_normals(moved), estimate_normals(gt))
    expected = {"acc": 0.050883846427550276, "acc_med": 0.005083870155757992,
                "comp": 0.008997764901911308, "comp_med": 0.005099648561186004,
                "nc1": 0.9404435740772715, "nc1_med": 0.9997526077750699,
                "nc2": 0.9993778631198308, "nc2_med": 0.999783948771793}
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-9), key
