"""Depth metrics with the alignments of StreamVGGT's `src/eval/{monodepth,video_depth}` protocol.

Conventions (arrays are depth in scene units, any shape, e.g. one frame [H, W] or a sequence
[S, H, W]; the prediction must already have the ground truth's resolution: upstream resizes it
with OpenCV's bicubic `cv2.resize(..., INTER_CUBIC)`, which `resize_depth` reproduces):

* valid pixels: ground truth finite, > 0 and < the dataset's `max_depth` cap (no cap: > 0 only);
* one alignment is fitted over all valid pixels of the arrays passed in. Monocular depth passes one
  frame at a time (per-frame median scale); video depth passes a whole sequence at once (one scale,
  or one scale and shift, for the sequence);
* after alignment the prediction is clamped to the dataset's `post_clip_max` (Sintel: 70);
* results over frames / sequences are combined by `average_depth_metrics`, weighted by the number
  of valid pixels, as upstream does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np

from xsvggt_jax.nn.resample import _cubic_aa as _keys_cubic
from xsvggt_jax.eval.geometry import EvalInputError, lower_median

Alignment = Literal["median", "scale", "scale&shift", "metric"]
ALIGNMENTS: tuple[str, ...] = ("median", "scale", "scale&shift", "metric")

#: Threshold accuracies reported: fraction of pixels with max(p/g, g/p) < 1.25**k.
DELTA_THRESHOLDS: tuple[float, ...] = (1.25, 1.25**2, 1.25**3)
DELTA_KEYS: tuple[str, ...] = ("delta_1.25", "delta_1.25^2", "delta_1.25^3")
#: Keys of `depth_metrics`.
DEPTH_METRIC_KEYS: tuple[str, ...] = ("abs_rel", "sq_rel", "rmse", "log_rmse", *DELTA_KEYS)
#: Floor applied to the aligned prediction before the log and ratio metrics (not before AbsRel).
PRED_FLOOR = 1e-5


@dataclass(frozen=True)
class DepthProtocol:
    """Per-dataset depth caps.

    max_depth: ground-truth pixels at or beyond it are invalid (None: no cap).
    post_clip_max: the aligned prediction is clamped to at most this (None: no clamp).
    """

    max_depth: float | None = None
    post_clip_max: float | None = None


#: Caps used by upstream's `video_depth/eval_depth.py` and `monodepth/eval_metrics.py`.
DEPTH_PROTOCOLS: Mapping[str, DepthProtocol] = MappingProxyType({
    "sintel": DepthProtocol(max_depth=70.0, post_clip_max=70.0),
    "bonn": DepthProtocol(max_depth=70.0),
    "kitti": DepthProtocol(),
    "nyu": DepthProtocol(),
})


def depth_protocol(dataset: str | DepthProtocol | None) -> DepthProtocol:
    """A dataset name from DEPTH_PROTOCOLS, a DepthProtocol, or None (no caps) -> DepthProtocol."""
    if dataset is None:
        return DepthProtocol()
    if isinstance(dataset, DepthProtocol):
        return dataset
    try:
        return DEPTH_PROTOCOLS[dataset]
    except KeyError:
        raise EvalInputError(
            f"unknown depth dataset {dataset!r}; known: {', '.join(DEPTH_PROTOCOLS)}") from None


def cv2_cubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 weights of OpenCV's `INTER_CUBIC` resize along one axis:
    source coordinate (i + 0.5) * in / out - 0.5, Keys cubic with a = -0.75 on the 4 nearest
    samples, out-of-range taps clamped to the edge sample, no antialiasing when shrinking."""
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src).astype(np.int64)
    frac = src - base
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    for tap in (-1, 0, 1, 2):
        cols = np.clip(base + tap, 0, in_size - 1)
        np.add.at(weights, (rows, cols), _keys_cubic(frac - tap, a=-0.75))
    return weights


def resize_depth(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize depth [..., H, W] to size (h, w) as `cv2.resize(depth, (w, h),
    interpolation=cv2.INTER_CUBIC)` does (float64 arithmetic; OpenCV computes float32 input in
    float32, so results agree to ~1e-6 relative)."""
    d = np.asarray(depth, np.float64)
    if d.ndim < 2:
        raise EvalInputError(f"depth must have shape [..., H, W], got {d.shape}")
    rows = cv2_cubic_matrix(d.shape[-2], size[0])  # [h, H]
    cols = cv2_cubic_matrix(d.shape[-1], size[1])  # [w, W]
    return rows @ d @ cols.T


def valid_depth_mask(gt: np.ndarray, max_depth: float | None = None) -> np.ndarray:
    """gt depth [...] -> bool [...]: finite, > 0 and (if a cap is given) < max_depth."""
    gt = np.asarray(gt)
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(gt) & (gt > 0)
        if max_depth is not None:
            mask &= gt < max_depth
    return mask


def median_scale(pred: np.ndarray, gt: np.ndarray) -> float:
    """Scale s = median(gt) / median(pred) over the given valid pixels (1-D arrays [N]); for an
    even count the lower middle value is the median (torch.median, as upstream)."""
    return float(lower_median(gt) / lower_median(pred))


def robust_scale(pred: np.ndarray, gt: np.ndarray, iterations: int = 10,
                 eps: float = 1e-8, min_scale: float = 1e-3) -> float:
    """Per-sequence scale of upstream's `--align scale`: an L1 fit argmin_s sum |s p - g| by
    iteratively reweighted least squares (Weiszfeld).

    pred, gt: 1-D arrays [N] of valid pixels. Start from s = mean(g) / mean(p); each of the
    `iterations` steps weights pixels by 1 / (|s p - g| + eps) and solves the weighted least squares
    s = sum(w p g) / sum(w p^2). The result is floored at `min_scale`.
    """
    p = np.asarray(pred, np.float64)
    g = np.asarray(gt, np.float64)
    s = np.nanmean(g) / np.nanmean(p)
    for _ in range(iterations):
        w = 1.0 / (np.abs(s * p - g) + eps)
        s = np.sum(w * p * g) / np.sum(w * p * p)
    return float(max(s, min_scale))


def lstsq_scale_shift(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(s, t) minimising sum (s p + t - g)^2 over the given valid pixels (1-D arrays [N])."""
    p = np.asarray(pred, np.float64)
    g = np.asarray(gt, np.float64)
    design = np.stack([p, np.ones_like(p)], -1)  # [N, 2]
    (s, t), *_ = np.linalg.lstsq(design, g, rcond=None)
    return float(s), float(t)


def depth_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Error metrics between aligned predicted and ground-truth depth at valid pixels (1-D [N]).

    abs_rel = mean(|p - g| / g), sq_rel = mean((p - g)^2 / g), rmse, log_rmse, and delta_<k> =
    fraction of pixels with max(p/g, g/p) < k for k in 1.25, 1.25^2, 1.25^3; p is floored at
    PRED_FLOOR for log_rmse and the deltas only (as upstream).
    """
    p = np.asarray(pred, np.float64)
    g = np.asarray(gt, np.float64)
    err = p - g
    out = {
        "abs_rel": float(np.mean(np.abs(err) / g)),
        "sq_rel": float(np.mean(err * err / g)),
        "rmse": float(np.sqrt(np.mean(err * err))),
    }
    pf = np.maximum(p, PRED_FLOOR)
    out["log_rmse"] = float(np.sqrt(np.mean((np.log(pf) - np.log(g)) ** 2)))
    ratio = np.maximum(pf / g, g / pf)
    for k, thr in zip(DELTA_KEYS, DELTA_THRESHOLDS):
        out[k] = float(np.mean(ratio < thr))
    return out


def align_depth(pred: np.ndarray, gt: np.ndarray, align: Alignment) -> tuple[float, float]:
    """Fit (scale, shift) taking valid predicted pixels onto ground truth (1-D arrays [N]).

    median: per-call median ratio; scale: `robust_scale`; scale&shift: `lstsq_scale_shift`;
    metric: (1, 0)."""
    if align == "median":
        return median_scale(pred, gt), 0.0
    if align == "scale":
        return robust_scale(pred, gt), 0.0
    if align == "scale&shift":
        return lstsq_scale_shift(pred, gt)
    if align == "metric":
        return 1.0, 0.0
    raise EvalInputError(f"unknown depth alignment {align!r}; choose from {', '.join(ALIGNMENTS)}")


def evaluate_depth(pred: np.ndarray, gt: np.ndarray, align: Alignment = "median",
                   dataset: str | DepthProtocol | None = None) -> dict[str, float]:
    """Align `pred` to `gt` and score it.

    pred, gt: depth maps of one shape (a frame [H, W] or a sequence [S, H, W]); one alignment is
    fitted over all valid pixels of the call. `dataset` selects the caps (DEPTH_PROTOCOLS).
    Returns depth_metrics(...) plus "scale", "shift" and "valid_pixels"; with no valid pixel the
    metrics are NaN and valid_pixels is 0 (such entries carry no weight in the average).
    """
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
        raise EvalInputError(f"pred and gt depth must have one shape, got {pred.shape} and {gt.shape}")
    if align not in ALIGNMENTS:
        raise EvalInputError(f"unknown depth alignment {align!r}; choose from {', '.join(ALIGNMENTS)}")
    proto = depth_protocol(dataset)
    mask = valid_depth_mask(gt, proto.max_depth)
    n = int(mask.sum())
    if n == 0:
        nan = float("nan")
        return {**{k: nan for k in DEPTH_METRIC_KEYS}, "scale": nan, "shift": nan, "valid_pixels": 0}
    p, g = pred[mask], gt[mask]
    scale, shift = align_depth(p, g, align)
    p = scale * p + shift
    if proto.post_clip_max is not None:
        p = np.minimum(p, proto.post_clip_max)
    return {**depth_metrics(p, g), "scale": scale, "shift": shift, "valid_pixels": n}


def average_depth_metrics(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Average per-frame or per-sequence results of `evaluate_depth`, weighted by valid_pixels
    (entries without valid pixels are skipped); "valid_pixels" of the result is the total."""
    kept = [r for r in results if r["valid_pixels"] > 0]
    if not kept:
        raise EvalInputError("no valid depth pixel in any of the results")
    weights = np.array([r["valid_pixels"] for r in kept], np.float64)
    out = {k: float(np.average([r[k] for r in kept], weights=weights)) for k in DEPTH_METRIC_KEYS}
    out["valid_pixels"] = int(weights.sum())
    return out
