"""Shared geometry for the evaluation metrics: the Umeyama similarity fit and its application.

All arrays are float64 numpy. Points are rows ([N, 3]); a similarity maps x -> s R x + t.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from xsvggt_jax.errors import InputError


class EvalInputError(InputError):
    """Arrays handed to an evaluation metric have the wrong shape, too few valid entries, or
    describe a degenerate configuration (e.g. collinear positions for a Sim(3) fit)."""


class Similarity(NamedTuple):
    """x -> scale * rotation @ x + translation."""

    scale: float
    rotation: np.ndarray  # [3, 3], det +1
    translation: np.ndarray  # [3]

    def apply(self, points: np.ndarray) -> np.ndarray:
        """points [..., 3] -> transformed points [..., 3] (float64)."""
        pts = np.asarray(points, np.float64)
        return self.scale * pts @ self.rotation.T + self.translation


def check_points(points: np.ndarray, name: str, min_count: int = 1) -> np.ndarray:
    """Validate a point array [N, 3] with at least `min_count` rows; returns it as float64."""
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise EvalInputError(f"{name} must have shape [N, 3], got {pts.shape}")
    if pts.shape[0] < min_count:
        raise EvalInputError(f"{name} needs at least {min_count} points, got {pts.shape[0]}")
    return pts


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> Similarity:
    """Least-squares similarity (Umeyama 1991) taking `src` [N, 3] onto `dst` [N, 3] (row i of
    `src` corresponds to row i of `dst`): minimises sum_i |dst_i - (s R src_i + t)|^2.

    Same estimator as evo's `geometry.umeyama_alignment(x=src.T, y=dst.T, with_scale)`: covariance
    of the centred point sets divided by N, SVD, reflection fixed by flipping the last singular
    direction when det(U) det(V) < 0, scale = trace(D S) / var(src) with var(src) the mean squared
    distance to the centroid. `with_scale=False` is the rigid (Kabsch) fit used by point-to-point
    ICP. Raises EvalInputError if fewer than two singular values of the covariance are non-zero
    (all points collinear or coincident), as evo does.
    """
    x = check_points(src, "src")
    y = check_points(dst, "dst")
    if x.shape != y.shape:
        raise EvalInputError(f"src and dst must have the same shape, got {x.shape} and {y.shape}")
    n = x.shape[0]
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    var_x = float(np.sum(xc * xc)) / n
    cov = yc.T @ xc / n  # [3, 3]
    u, d, vt = np.linalg.svd(cov)
    if np.count_nonzero(d > np.finfo(d.dtype).eps) < 2:
        raise EvalInputError("degenerate point configuration: Umeyama alignment is not possible")
    flip = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0.0:
        flip[2] = -1.0
    rotation = (u * flip) @ vt
    scale = float(np.sum(d * flip) / var_x) if with_scale else 1.0
    translation = mean_y - scale * rotation @ mean_x
    return Similarity(scale, rotation, translation)


def lower_median(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Median that, for an even count, returns the lower of the two middle values (the convention
    of torch.median / torch.nanmedian, which upstream's evaluation uses) instead of their mean.

    values: any array; axis: reduce along it (None: over all entries)."""
    v = np.asarray(values)
    if axis is None:
        v, axis = v.reshape(-1), 0
    k = (v.shape[axis] - 1) // 2
    return np.take(np.partition(v, k, axis=axis), k, axis=axis)
