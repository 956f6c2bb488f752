"""Point-cloud reconstruction metrics with the 7-Scenes / NRGBD protocol of StreamVGGT's
`src/eval/mv_recon` (Accuracy, Completeness, Normal Consistency).

Per scene (S keyframes):
1. ground-truth points in the first camera's frame (`world_to_camera` with frame 0's
   camera-from-world extrinsics) and the predicted point map (`pts3d_in_other_view`, already in
   that frame), both [S, H, W, 3], with the ground truth's valid mask [S, H, W];
2. `median_shift_scale`: each cloud's z is shifted by its own median z, then the prediction is
   scaled by gt_scale / pred_scale, a scale being the median distance of the points to their
   per-axis median centre (valid pixels of all frames, full frames);
3. `centre_crop` to 224 x 224, keep valid pixels with finite coordinates;
4. point-to-point ICP of the prediction onto the ground truth (`icp_point_to_point`,
   correspondence threshold 0.1);
5. normals by PCA over 30 nearest neighbours (`estimate_normals`), then `accuracy_completeness`.
Upstream averages each metric over scenes and reports nc = (nc1 + nc2) / 2.

Nearest neighbours, ICP and normals use scipy's cKDTree (no Open3D dependency); the ICP loop and
the normal estimation reproduce Open3D's `registration_icp` (point-to-point, default convergence
criteria) and `estimate_normals` (default KNN search, 30 neighbours).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from xsvggt_jax.eval.geometry import EvalInputError, check_points, lower_median, umeyama

#: Side of the centre crop the metrics are computed on (pixels).
CROP_SIZE = 224
#: ICP correspondence distance of the 7-Scenes / NRGBD protocol (scene units, metres).
ICP_THRESHOLD = 0.1
#: Neighbours per point for normals (Open3D's default KDTreeSearchParamKNN).
NORMAL_KNN = 30
_CHUNK = 65536  # points per batch of the normal estimation


def world_to_camera(points: np.ndarray, extrinsic: np.ndarray) -> np.ndarray:
    """World points [..., 3] -> coordinates in the camera of `extrinsic` (camera-from-world
    [3, 4] or [4, 4]): R x + t."""
    e = np.asarray(extrinsic, np.float64)
    return np.asarray(points, np.float64) @ e[:3, :3].T + e[:3, 3]


def centre_crop(array: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Crop [S, H, W, ...] to the size x size window starting at (H//2 - size//2, W//2 - size//2)."""
    a = np.asarray(array)
    if a.ndim < 3:
        raise EvalInputError(f"centre_crop expects [S, H, W, ...], got shape {a.shape}")
    h, w = a.shape[1:3]
    if h < size or w < size:
        raise EvalInputError(f"frames of {h}x{w} are smaller than the {size}x{size} centre crop")
    top, left = h // 2 - size // 2, w // 2 - size // 2
    return a[:, top:top + size, left:left + size]


def _median_centre_scale(points: np.ndarray) -> float:
    """points [N, 3] -> median distance to the per-axis (lower) median centre."""
    centre = lower_median(points, axis=0)
    return float(lower_median(np.linalg.norm(points - centre, axis=-1)))


def median_shift_scale(pred_points: np.ndarray, gt_points: np.ndarray, valid: np.ndarray,
                       min_scale: float = 1e-3, max_scale: float = 1e3) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's alignment before ICP (upstream `Regr3D_t_ScaleShiftInv`, gt_scale=True).

    pred_points, gt_points: [S, H, W, 3] in the first camera's frame; valid: bool [S, H, W].
    Each cloud's z is shifted by its own median z over valid pixels (with finite coordinates;
    medians of an even count take the lower middle value, as torch); then pred is multiplied by
    gt_scale / clip(pred_scale, min_scale, max_scale), scale = median distance of the valid
    points to their per-axis median. Returns (pred [S, H, W, 3], gt [S, H, W, 3]), both shifted.
    """
    pred = np.array(pred_points, np.float64)
    gt = np.array(gt_points, np.float64)
    valid = np.asarray(valid, bool)
    if pred.shape != gt.shape or pred.shape[-1] != 3 or valid.shape != pred.shape[:-1]:
        raise EvalInputError(f"need pred/gt [S, H, W, 3] and valid [S, H, W], got "
                             f"{pred.shape}, {gt.shape}, {valid.shape}")
    if not valid.any():
        raise EvalInputError("no valid ground-truth pixel")
    scales = []
    for cloud in (pred, gt):
        use = valid & np.isfinite(cloud).all(-1)  # non-finite points are ignored (nanmedian)
        if not use.any():
            raise EvalInputError("no valid point with finite coordinates")
        cloud[..., 2] -= lower_median(cloud[..., 2][use])
        scales.append(_median_centre_scale(cloud[use]))
    pred_scale = float(np.clip(scales[0], min_scale, max_scale))
    return pred * (scales[1] / pred_scale), gt


class IcpResult(NamedTuple):
    transformation: np.ndarray  # [4, 4] rigid, maps the source onto the target
    fitness: float  # fraction of source points with a correspondence within the threshold
    inlier_rmse: float  # RMS distance of those correspondences
    iterations: int


def _correspondences(tree: cKDTree, source: np.ndarray, threshold: float):
    dist, idx = tree.query(source, k=1, distance_upper_bound=threshold, workers=-1)
    hit = np.isfinite(dist)
    n = int(hit.sum())
    fitness = n / len(source)
    rmse = float(np.sqrt(np.sum(dist[hit] ** 2) / n)) if n else 0.0
    return np.flatnonzero(hit), idx[hit], fitness, rmse


def icp_point_to_point(source: np.ndarray, target: np.ndarray, threshold: float = ICP_THRESHOLD,
                       init: np.ndarray | None = None, max_iterations: int = 30,
                       relative_fitness: float = 1e-6, relative_rmse: float = 1e-6) -> IcpResult:
    """Rigid point-to-point ICP (Open3D `registration_icp` with
    `TransformationEstimationPointToPoint()` and its default convergence criteria).

    source [N, 3], target [M, 3]. Each iteration: every transformed source point is paired with
    its nearest target point if closer than `threshold`; the rigid Kabsch/Umeyama fit of the
    pairs updates the transformation; stop after `max_iterations` or when fitness and inlier RMSE
    both change by less than the relative tolerances. Stops early (keeping the transformation so
    far) if the pairs are too few or degenerate for a rigid fit.
    """
    src = check_points(source, "source")
    tgt = check_points(target, "target")
    transform = np.eye(4) if init is None else np.array(init, np.float64)
    tree = cKDTree(tgt)
    moved = src @ transform[:3, :3].T + transform[:3, 3]
    src_ids, tgt_ids, fitness, rmse = _correspondences(tree, moved, threshold)
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        try:
            fit = umeyama(moved[src_ids], tgt[tgt_ids], with_scale=False)
        except EvalInputError:
            break
        update = np.eye(4)
        update[:3, :3], update[:3, 3] = fit.rotation, fit.translation
        transform = update @ transform
        moved = fit.apply(moved)
        prev_fitness, prev_rmse = fitness, rmse
        src_ids, tgt_ids, fitness, rmse = _correspondences(tree, moved, threshold)
        if abs(prev_fitness - fitness) < relative_fitness and abs(prev_rmse - rmse) < relative_rmse:
            break
    return IcpResult(transform, fitness, rmse, iterations)


def estimate_normals(points: np.ndarray, knn: int = NORMAL_KNN) -> np.ndarray:
    """Unit normals [N, 3] of points [N, 3] by PCA: the eigenvector of the smallest eigenvalue of
    the covariance of each point's `knn` nearest neighbours (itself included). Sign arbitrary (the
    metrics use |cos|); a point with fewer than 3 neighbours gets (0, 0, 1), as in Open3D."""
    pts = check_points(points, "points")
    k = min(knn, len(pts))
    if k < 3:
        return np.tile([0.0, 0.0, 1.0], (len(pts), 1))
    tree = cKDTree(pts)
    normals = np.empty_like(pts)
    for start in range(0, len(pts), _CHUNK):
        _, idx = tree.query(pts[start:start + _CHUNK], k=k, workers=-1)
        nbrs = pts[idx]  # [B, k, 3]
        centred = nbrs - nbrs.mean(1, keepdims=True)
        cov = np.einsum("bki,bkj->bij", centred, centred) / k
        _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
        normals[start:start + _CHUNK] = vecs[:, :, 0]
    return normals


def accuracy_completeness(pred: np.ndarray, gt: np.ndarray, pred_normals: np.ndarray,
                          gt_normals: np.ndarray) -> dict[str, float]:
    """Acc / Comp / NC between clouds pred [N, 3] and gt [M, 3] with unit normals.

    acc: distance of each predicted point to its nearest gt point (mean, median); comp: distance
    of each gt point to its nearest predicted point; nc1 / nc2: |cos| between the normals of those
    nearest-neighbour pairs (pred -> gt and gt -> pred); nc = (nc1 + nc2) / 2 (likewise medians).
    """
    pred = check_points(pred, "pred")
    gt = check_points(gt, "gt")
    d_acc, to_gt = cKDTree(gt).query(pred, workers=-1)
    d_comp, to_pred = cKDTree(pred).query(gt, workers=-1)
    nc1 = np.abs(np.sum(np.asarray(gt_normals)[to_gt] * pred_normals, -1))
    nc2 = np.abs(np.sum(np.asarray(pred_normals)[to_pred] * gt_normals, -1))
    out = {
        "acc": float(np.mean(d_acc)), "acc_med": float(np.median(d_acc)),
        "comp": float(np.mean(d_comp)), "comp_med": float(np.median(d_comp)),
        "nc1": float(np.mean(nc1)), "nc1_med": float(np.median(nc1)),
        "nc2": float(np.mean(nc2)), "nc2_med": float(np.median(nc2)),
    }
    out["nc"] = (out["nc1"] + out["nc2"]) / 2
    out["nc_med"] = (out["nc1_med"] + out["nc2_med"]) / 2
    return out


def reconstruction_metrics(pred_points: np.ndarray, gt_points: np.ndarray, valid: np.ndarray,
                           align: Literal["median", "umeyama"] = "median",
                           crop: int | None = CROP_SIZE,
                           icp_threshold: float | None = ICP_THRESHOLD) -> dict[str, float]:
    """One scene of the 7-Scenes / NRGBD protocol (module docstring, steps 2-5).

    pred_points, gt_points: [S, H, W, 3] in the first camera's frame; valid: bool [S, H, W].
    align: "median" (default protocol) or "umeyama" (upstream `--use_proj`: gt z-shifted by its
    median, the prediction fitted to it by a Sim(3) Umeyama on the kept points). crop: centre
    crop side (None: whole frames); icp_threshold: None skips ICP. Returns
    `accuracy_completeness` plus "icp_fitness" and "points" (kept point count)."""
    pred, gt = median_shift_scale(pred_points, gt_points, valid)
    if align == "umeyama":
        pred = np.asarray(pred_points, np.float64)
    elif align != "median":
        raise EvalInputError(f"unknown point-cloud alignment {align!r}; choose median or umeyama")
    keep = np.asarray(valid, bool)
    if crop is not None:
        pred, gt, keep = centre_crop(pred, crop), centre_crop(gt, crop), centre_crop(keep, crop)
    keep = keep & np.isfinite(pred).all(-1) & np.isfinite(gt).all(-1)
    pred, gt = pred[keep], gt[keep]  # [N, 3]
    if len(pred) < 3:
        raise EvalInputError(f"only {len(pred)} valid points in the evaluated region")
    if align == "umeyama":
        pred = umeyama(pred, gt, with_scale=True).apply(pred)
    fitness = float("nan")
    if icp_threshold is not None:
        icp = icp_point_to_point(pred, gt, icp_threshold)
        pred = pred @ icp.transformation[:3, :3].T + icp.transformation[:3, 3]
        fitness = icp.fitness
    metrics = accuracy_completeness(pred, gt, estimate_normals(pred), estimate_normals(gt))
    return {**metrics, "icp_fitness": fitness, "points": int(len(pred))}
