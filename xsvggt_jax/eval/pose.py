"""Camera-pose metrics: evo-style ATE / RPE on trajectories and VGGT-style RRA / RTA / AUC.

Pose conventions:
* `extrinsics` (what the model and the dataset readers give): camera-from-world [S, 3, 4] (or
  [S, 4, 4]), OpenCV axes (x right, y down, z forward).
* `c2w`: camera-to-world [S, 4, 4], what TUM files and evo trajectories hold (positions are the
  camera centres).

ATE / RPE follow `evo` as called by the StreamVGGT-family pose evaluation (`main_ape.ape` and
`main_rpe.rpe` with align=True, correct_scale=True, delta=1 frame, all_pairs=True, statistic rmse):
the estimate is aligned to the reference by a Sim(3) Umeyama fit on camera centres, then
* ATE = RMSE over frames of |t_est_i - t_ref_i| (camera centres);
* RPE: for each pair (i, i+delta), E = (Q_i^-1 Q_j)^-1 (P_i^-1 P_j) with Q the reference and P the
  aligned estimate (camera-to-world); RPE-trans = RMSE of |translation(E)|, RPE-rot = RMSE of the
  rotation angle of E in degrees.
RRA / RTA / AUC follow VGGT's CO3D evaluation: relative poses P_i P_j^-1 of camera-from-world
extrinsics over all pairs i < j; no alignment (both are invariant to a global similarity up to the
translation-direction sign).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from xsvggt_jax.geometry import homogeneous, invert_extrinsics, quat_to_mat, rigid
from xsvggt_jax.io.exports import write_tum
from xsvggt_jax.eval.geometry import EvalInputError, Similarity, umeyama

__all__ = [
    "extrinsics_to_c2w", "c2w_to_extrinsics", "read_tum", "write_tum", "align_trajectory",
    "absolute_trajectory_error", "relative_pose_error", "trajectory_metrics",
    "pairwise_pose_errors", "pose_accuracy", "pose_auc", "rotation_angle_deg",
]


# --------------------------------------------------------------------------------------------
# conversions and TUM files


def _as_se3(poses: np.ndarray, name: str) -> np.ndarray:
    """[S, 3, 4] or [S, 4, 4] rigid poses -> [S, 4, 4] float64."""
    p = np.asarray(poses, np.float64)
    if p.ndim != 3 or p.shape[1:] not in ((3, 4), (4, 4)):
        raise EvalInputError(f"{name} must have shape [S, 3, 4] or [S, 4, 4], got {p.shape}")
    return homogeneous(p)


def extrinsics_to_c2w(extrinsics: np.ndarray) -> np.ndarray:
    """Camera-from-world [S, 3, 4] (or [S, 4, 4]) -> camera-to-world [S, 4, 4]."""
    return _as_se3(invert_extrinsics(_as_se3(extrinsics, "extrinsics")[:, :3]), "c2w")


def c2w_to_extrinsics(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world [S, 4, 4] (or [S, 3, 4]) -> camera-from-world [S, 3, 4]."""
    return invert_extrinsics(_as_se3(c2w, "c2w")[:, :3])


def read_tum(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a TUM RGB-D trajectory (`timestamp tx ty tz qx qy qz qw` per line; blank lines and
    lines starting with '#' skipped) -> (timestamps [S], camera-to-world [S, 4, 4]).

    Quaternions need not be unit (they are normalised). Raises EvalInputError on a malformed line.
    `write_tum(path, extrinsics, timestamps)` (from xsvggt_jax.io.exports) writes the format from
    camera-from-world extrinsics."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.replace(",", " ").split()
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise EvalInputError(f"{path}:{lineno}: not a number in TUM line {text!r}") from None
        if len(values) != 8:
            raise EvalInputError(f"{path}:{lineno}: a TUM line has 8 values, got {len(values)}")
        rows.append(values)
    if not rows:
        raise EvalInputError(f"{path}: no poses in TUM file")
    data = np.asarray(rows, np.float64)
    if not np.all(np.isfinite(data)) or np.any(np.linalg.norm(data[:, 4:], axis=-1) == 0):
        raise EvalInputError(f"{path}: non-finite value or zero quaternion in TUM file")
    return data[:, 0], homogeneous(rigid(quat_to_mat(data[:, 4:]), data[:, 1:4]))


# --------------------------------------------------------------------------------------------
# evo-style trajectory metrics


def rotation_angle_deg(rotations: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] -> angle of each rotation in degrees [...] (the norm of its
    rotation vector, as evo's `so3_log_angle`)."""
    r = np.asarray(rotations, np.float64)
    flat = Rotation.from_matrix(r.reshape(-1, 3, 3))
    return np.degrees(flat.magnitude()).reshape(r.shape[:-2])


def _check_pair(est: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e, r = _as_se3(est, "est_c2w"), _as_se3(ref, "ref_c2w")
    if e.shape != r.shape:
        raise EvalInputError(f"est and ref need the same number of poses, got {len(e)} and {len(r)}")
    return e, r


def align_trajectory(est_c2w: np.ndarray, ref_c2w: np.ndarray,
                     correct_scale: bool = True) -> tuple[np.ndarray, Similarity]:
    """Umeyama-align the estimate onto the reference using camera centres (evo's
    `PosePath3D.align`): Sim(3) if `correct_scale` else SE(3).

    est_c2w, ref_c2w: camera-to-world [S, 4, 4] (or [S, 3, 4]), S >= 3 non-collinear centres.
    Returns (aligned estimate [S, 4, 4] with centres s R c + t and orientations R R_i, fit)."""
    est, ref = _check_pair(est_c2w, ref_c2w)
    sim = umeyama(est[:, :3, 3], ref[:, :3, 3], with_scale=correct_scale)
    aligned = est.copy()
    aligned[:, :3, :3] = sim.rotation @ est[:, :3, :3]
    aligned[:, :3, 3] = sim.apply(est[:, :3, 3])
    return aligned, sim


def _rmse(errors: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(errors))))


def absolute_trajectory_error(est_c2w: np.ndarray, ref_c2w: np.ndarray, align: bool = True,
                              correct_scale: bool = True) -> float:
    """ATE: RMSE of camera-centre distances after alignment (evo APE, translation_part, rmse).

    est_c2w, ref_c2w: camera-to-world [S, 4, 4]. align/correct_scale: Sim(3) (default), SE(3)
    (correct_scale=False) or none (align=False)."""
    est, ref = _check_pair(est_c2w, ref_c2w)
    if align:
        est, _ = align_trajectory(est, ref, correct_scale)
    return _rmse(np.linalg.norm(est[:, :3, 3] - ref[:, :3, 3], axis=-1))


def relative_pose_error(est_c2w: np.ndarray, ref_c2w: np.ndarray, delta: int = 1,
                        align: bool = True, correct_scale: bool = True) -> tuple[float, float]:
    """RPE over pairs (i, i+delta) for every i (evo RPE, delta in frames, all_pairs=True, rmse).

    est_c2w, ref_c2w: camera-to-world [S, 4, 4], S > delta. The estimate is aligned first as in
    `absolute_trajectory_error`. Returns (translation RMSE in scene units, rotation RMSE in deg)."""
    est, ref = _check_pair(est_c2w, ref_c2w)
    if delta < 1 or len(est) <= delta:
        raise EvalInputError(f"RPE needs delta >= 1 and more than delta={delta} poses, got {len(est)}")
    if align:
        est, _ = align_trajectory(est, ref, correct_scale)
    inv = np.linalg.inv
    ref_rel = inv(ref[:-delta]) @ ref[delta:]  # [S-delta, 4, 4]
    est_rel = inv(est[:-delta]) @ est[delta:]
    err = inv(ref_rel) @ est_rel
    return _rmse(np.linalg.norm(err[:, :3, 3], axis=-1)), _rmse(rotation_angle_deg(err[:, :3, :3]))


def trajectory_metrics(est_c2w: np.ndarray, ref_c2w: np.ndarray) -> dict[str, float]:
    """The papers' pose-table row: {"ate", "rpe_trans", "rpe_rot"} with Sim(3) alignment, delta 1."""
    ate = absolute_trajectory_error(est_c2w, ref_c2w)
    rpe_trans, rpe_rot = relative_pose_error(est_c2w, ref_c2w)
    return {"ate": ate, "rpe_trans": rpe_trans, "rpe_rot": rpe_rot}


# --------------------------------------------------------------------------------------------
# VGGT-style pairwise metrics


def pairwise_pose_errors(pred_extrinsics: np.ndarray,
                         gt_extrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative rotation and translation-direction errors over all frame pairs i < j.

    pred_extrinsics, gt_extrinsics: camera-from-world [N, 3, 4] (or [N, 4, 4]), N >= 2. For each
    pair the relative pose is T_i T_j^-1; returns (rotation error [P] in degrees: angle of
    R_gt^T R_pred; translation error [P] in degrees: angle between the relative translations,
    folded to [0, 90] since the sign is ambiguous; a zero-length translation gives 90), with
    P = N (N-1) / 2 in `itertools.combinations` order."""
    pred, gt = _as_se3(pred_extrinsics, "pred_extrinsics"), _as_se3(gt_extrinsics, "gt_extrinsics")
    if pred.shape != gt.shape or len(pred) < 2:
        raise EvalInputError(f"need two equal-length pose sets of >= 2 frames, got {len(pred)} and {len(gt)}")
    i, j = np.triu_indices(len(pred), k=1)
    rel_pred = pred[i] @ np.linalg.inv(pred[j])
    rel_gt = gt[i] @ np.linalg.inv(gt[j])
    rot_err = rotation_angle_deg(np.swapaxes(rel_gt[:, :3, :3], -1, -2) @ rel_pred[:, :3, :3])

    t_pred, t_gt = rel_pred[:, :3, 3], rel_gt[:, :3, 3]
    # angle between the lines through the two vectors: atan2(|a x b|, |a . b|) in [0, 90]
    # (well conditioned near 0, unlike arccos); 90 when either vector has zero length
    sin = np.linalg.norm(np.cross(t_pred, t_gt), axis=-1)
    cos = np.abs(np.sum(t_pred * t_gt, -1))
    degenerate = (np.linalg.norm(t_pred, axis=-1) == 0) | (np.linalg.norm(t_gt, axis=-1) == 0)
    trans_err = np.where(degenerate, 90.0, np.degrees(np.arctan2(sin, cos)))
    return rot_err, trans_err


def pose_accuracy(rot_err: np.ndarray, trans_err: np.ndarray, threshold: float = 30.0) -> dict[str, float]:
    """RRA@threshold and RTA@threshold: fractions of pairs with error < threshold (degrees)."""
    t = int(threshold) if float(threshold).is_integer() else threshold
    return {f"rra@{t}": float(np.mean(np.asarray(rot_err) < threshold)),
            f"rta@{t}": float(np.mean(np.asarray(trans_err) < threshold))}


def pose_auc(rot_err: np.ndarray, trans_err: np.ndarray, max_threshold: int = 30) -> float:
    """AUC@max_threshold of VGGT: with e = max(rotation, translation) error per pair (degrees),
    the mean over k = 1..max_threshold of the fraction of pairs with e < k (for the last k,
    e <= k: upstream bins with np.histogram, whose last bin is closed). Pairs with larger errors
    count in the denominator."""
    err = np.maximum(np.asarray(rot_err, np.float64), np.asarray(trans_err, np.float64))
    if err.ndim != 1 or err.size == 0:
        raise EvalInputError(f"need a non-empty 1-D array of pair errors, got shape {err.shape}")
    fractions = [np.mean(err < k) for k in range(1, max_threshold)]
    fractions.append(np.mean(err <= max_threshold))
    return float(np.mean(fractions))
