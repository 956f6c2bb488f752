"""Camera-pose metrics: evo-style ATE / RPE, TUM files, VGGT RRA / RTA / AUC, Umeyama."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from xsvggt_jax.eval import (EvalInputError, absolute_trajectory_error, c2w_to_extrinsics,
                             extrinsics_to_c2w, pairwise_pose_errors, pose_accuracy, pose_auc,
                             read_tum, relative_pose_error, trajectory_metrics, umeyama, write_tum)


def _trajectory(s: int = 8) -> np.ndarray:
    """A deterministic camera-to-world trajectory [S, 4, 4] that rotates and translates."""
    i = np.arange(s, dtype=float)
    c2w = np.tile(np.eye(4), (s, 1, 1))
    c2w[:, :3, :3] = Rotation.from_rotvec(np.stack([0.1 * i, 0.05 * i, -0.08 * i], -1)).as_matrix()
    c2w[:, :3, 3] = np.stack([np.cos(0.7 * i), np.sin(0.5 * i), 0.2 * i], -1)
    return c2w


R0 = Rotation.from_rotvec([0.3, -0.2, 0.9]).as_matrix()


def _similar(c2w: np.ndarray, scale: float = 1.7, t=(0.5, -1.0, 2.0)) -> np.ndarray:
    """The same trajectory seen in another frame: x -> scale R0 x + t applied to every pose."""
    out = c2w.copy()
    out[:, :3, :3] = R0 @ c2w[:, :3, :3]
    out[:, :3, 3] = scale * c2w[:, :3, 3] @ R0.T + np.asarray(t)
    return out


def test_similarity_transformed_trajectory_has_zero_errors():
    ref = _trajectory()
    m = trajectory_metrics(_similar(ref), ref)
    assert m["ate"] < 1e-12 and m["rpe_trans"] < 1e-12 and m["rpe_rot"] < 1e-6
    # without the scale correction the 1.7x trajectory cannot be matched
    assert absolute_trajectory_error(_similar(ref), ref, correct_scale=False) > 0.1


def test_offset_on_one_frame_gives_hand_computed_errors():
    s, v = 6, np.array([0.3, 0.0, 0.4])  # |v| = 0.5
    ref = np.tile(np.eye(4), (s, 1, 1))
    ref[:, 0, 3] = np.arange(s)
    est = ref.copy()
    est[2, :3, 3] += v
    # ATE without alignment: one frame off by 0.5 -> sqrt(0.25 / 6)
    assert absolute_trajectory_error(est, ref, align=False) == pytest.approx(0.5 / np.sqrt(s), abs=1e-12)
    # RPE: pairs (1,2) and (2,3) are off by +v and -v (no rotation) -> sqrt(2 * 0.25 / 5)
    trans, rot = relative_pose_error(est, ref, align=False)
    assert trans == pytest.approx(np.sqrt(2 * 0.25 / (s - 1)), abs=1e-12)
    assert rot == pytest.approx(0.0, abs=1e-9)
    # the same offset on every frame is a translation: zero after alignment
    est_all = ref.copy()
    est_all[:, :3, 3] += v
    ref_bent = ref.copy()
    ref_bent[:, 1, 3] = np.arange(s) ** 2 / 10.0  # not collinear, so Sim(3) is determined
    est_all[:, 1, 3] = ref_bent[:, 1, 3] + v[1]
    assert absolute_trajectory_error(est_all, ref_bent) < 1e-12
    assert absolute_trajectory_error(est_all, ref_bent, align=False) == pytest.approx(0.5, abs=1e-12)


def test_rpe_rotation_of_a_known_turn():
    s = 5
    ref = np.tile(np.eye(4), (s, 1, 1))
    ref[:, 0, 3] = np.arange(s)
    ref[:, 1, 3] = np.arange(s) ** 2 / 7.0
    est = ref.copy()
    est[3, :3, :3] = Rotation.from_euler("y", 6.0, degrees=True).as_matrix()
    # alignment uses centres only (unchanged); pairs (2,3) and (3,4) see a 6 degree error
    _, rot = relative_pose_error(est, ref)
    assert rot == pytest.approx(np.sqrt(2 * 36.0 / (s - 1)), rel=1e-9)


def test_matches_evo_on_a_noisy_trajectory():
    """Expected values computed with evo 1.38.1 (main_ape.ape / main_rpe.rpe, align=True,
    correct_scale=True, delta=1 frame, all_pairs=True, rmse) on the same trajectories."""
    ref = _trajectory()
    i = np.arange(len(ref), dtype=float)
    est = _similar(ref)
    wobble = Rotation.from_rotvec(0.02 * np.stack([np.sin(i), np.cos(i), np.sin(2 * i)], -1)).as_matrix()
    est[:, :3, :3] = est[:, :3, :3] @ wobble
    est[:, :3, 3] += 0.05 * np.stack([np.sin(3 * i), np.cos(2 * i), np.sin(i)], -1)
    m = trajectory_metrics(est, ref)
    assert m["ate"] == pytest.approx(0.029110648824082905, rel=1e-9)
    assert m["rpe_trans"] == pytest.approx(0.050598881925646176, rel=1e-9)
    assert m["rpe_rot"] == pytest.approx(1.821769245544945, rel=1e-9)


def test_umeyama_recovers_a_similarity_and_rejects_collinear_points():
    pts = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]], float)
    fit = umeyama(pts, 2.5 * pts @ R0.T + [1, 2, 3])
    assert fit.scale == pytest.approx(2.5, rel=1e-12)
    np.testing.assert_allclose(fit.rotation, R0, atol=1e-12)
    np.testing.assert_allclose(fit.translation, [1, 2, 3], atol=1e-12)
    line = np.outer(np.arange(4.0), [1, 1, 0])
    with pytest.raises(EvalInputError, match="degenerate"):
        umeyama(line, line)


def test_tum_round_trip_and_parsing(tmp_path):
    c2w = _trajectory(4)
    extr = c2w_to_extrinsics(c2w)
    np.testing.assert_allclose(extrinsics_to_c2w(extr), c2w, atol=1e-12)
    path = write_tum(tmp_path / "traj.txt", extr, timestamps=[0.5, 1.5, 2.5, 3.5])
    stamps, back = read_tum(path)
    np.testing.assert_allclose(stamps, [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(back, c2w, atol=1e-8)
    # hand-written line: 90 degrees about z (q = (0, 0, sin 45, cos 45)) at (1, 2, 3)
    (tmp_path / "hand.txt").write_text("# timestamp tx ty tz qx qy qz qw\n\n7 1 2 3 0 0 0.70710678 0.70710678\n")
    stamps, pose = read_tum(tmp_path / "hand.txt")
    assert stamps.tolist() == [7.0]
    np.testing.assert_allclose(pose[0], [[0, -1, 0, 1], [1, 0, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1]], atol=1e-8)
    (tmp_path / "bad.txt").write_text("1 2 3 4 5 6 7\n")
    with pytest.raises(EvalInputError, match="bad.txt:1: a TUM line has 8 values"):
        read_tum(tmp_path / "bad.txt")


def _extrinsics_line(n: int = 4) -> np.ndarray:
    extr = np.tile(np.eye(4)[:3], (n, 1, 1))
    extr[:, :, 3] = np.stack([np.arange(n), np.arange(n) ** 2 / 3.0, np.zeros(n)], -1)
    return extr


def test_rra_rta_zero_for_identical_poses_and_known_angles():
    gt = _extrinsics_line()
    rot, trans = pairwise_pose_errors(gt, gt)
    assert rot.shape == trans.shape == (6,)
    assert np.all(rot < 1e-9) and np.all(trans < 1e-6)
    # two cameras, the second rotated by 10 degrees about y: relative rotation off by 10 degrees
    # and the relative translation -R^T t turned by 10 degrees in the xz plane
    gt2 = np.tile(np.eye(4)[:3], (2, 1, 1))
    gt2[1, :, 3] = [1.0, 0.0, 0.0]
    pred2 = gt2.copy()
    pred2[1, :, :3] = Rotation.from_euler("y", 10.0, degrees=True).as_matrix()
    rot, trans = pairwise_pose_errors(pred2, gt2)
    np.testing.assert_allclose(rot, [10.0], rtol=1e-9)
    np.testing.assert_allclose(trans, [10.0], rtol=1e-9)
    assert pose_accuracy(rot, trans, threshold=15) == {"rra@15": 1.0, "rta@15": 1.0}
    assert pose_accuracy(rot, trans, threshold=5) == {"rra@5": 0.0, "rta@5": 0.0}
    # the translation direction's sign is ambiguous: a flipped baseline is no error
    flipped = gt2.copy()
    flipped[1, :, 3] = [-1.0, 0.0, 0.0]
    np.testing.assert_allclose(pairwise_pose_errors(flipped, gt2)[1], [0.0], atol=1e-12)
    # a predicted zero baseline has no direction: 90 degrees, as upstream's normalisation gives
    collapsed = gt2.copy()
    collapsed[1, :, 3] = 0.0
    np.testing.assert_allclose(pairwise_pose_errors(collapsed, gt2)[1], [90.0])


def test_auc30_hand_computed():
    # max(r, t) per pair = 0.5, 1.5, 10, 40: fraction below k is 1/4 for k = 1, 2/4 for k = 2..10,
    # 3/4 for k = 11..30 -> (0.25 + 9 * 0.5 + 20 * 0.75) / 30
    rot = np.array([0.5, 0.2, 10.0, 40.0])
    trans = np.array([0.1, 1.5, 3.0, 1.0])
    assert pose_auc(rot, trans) == pytest.approx((0.25 + 4.5 + 15.0) / 30.0, rel=1e-12)
    # upstream's last histogram bin is closed: an error of exactly 30 counts at k = 30
    assert pose_auc(np.array([30.0]), np.array([0.0])) == pytest.approx(1.0 / 30.0)
    assert pose_auc(np.zeros(3), np.zeros(3)) == 1.0
