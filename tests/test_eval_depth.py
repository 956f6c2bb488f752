"""Depth metrics: alignments (median, robust per-sequence scale, scale and shift), caps, averaging."""

from __future__ import annotations

import numpy as np
import pytest

from xsvggt_jax.eval import (DEPTH_PROTOCOLS, EvalInputError, average_depth_metrics, depth_metrics,
                             evaluate_depth, lstsq_scale_shift, median_scale, resize_depth,
                             robust_scale, valid_depth_mask)


def _gt(shape=(2, 4, 5)) -> np.ndarray:
    return 1.0 + np.arange(np.prod(shape), dtype=float).reshape(shape) / 4.0


@pytest.mark.parametrize("align", ["median", "scale", "scale&shift"])
def test_constant_factor_vanishes_after_alignment(align):
    gt = _gt()
    r = evaluate_depth(gt / 2.0, gt, align=align)
    assert r["abs_rel"] == pytest.approx(0.0, abs=1e-9)
    assert r["delta_1.25"] == 1.0 and r["valid_pixels"] == gt.size
    assert r["scale"] == pytest.approx(2.0, rel=1e-9)


def test_constant_factor_without_alignment_gives_exact_errors():
    gt = _gt()
    r = evaluate_depth(gt / 2.0, gt, align="metric")
    assert r["abs_rel"] == pytest.approx(0.5, abs=1e-12)  # |g/2 - g| / g
    assert r["log_rmse"] == pytest.approx(np.log(2.0), abs=1e-12)
    # ratio 2: above 1.25 and 1.5625, above 1.953125 too
    assert (r["delta_1.25"], r["delta_1.25^2"], r["delta_1.25^3"]) == (0.0, 0.0, 0.0)
    r = evaluate_depth(gt * 1.3, gt, align="metric")
    assert (r["delta_1.25"], r["delta_1.25^2"]) == (0.0, 1.0)
    assert r["sq_rel"] == pytest.approx(np.mean(0.09 * gt), rel=1e-12)
    assert r["rmse"] == pytest.approx(np.sqrt(np.mean((0.3 * gt) ** 2)), rel=1e-12)


def test_scale_and_shift_least_squares():
    gt = _gt()
    s, t = lstsq_scale_shift(((gt - 1.0) / 3.0).ravel(), gt.ravel())
    assert (s, t) == (pytest.approx(3.0, rel=1e-12), pytest.approx(1.0, rel=1e-12))
    assert evaluate_depth((gt - 1.0) / 3.0, gt, align="scale&shift")["abs_rel"] < 1e-12


def test_robust_scale_follows_the_weiszfeld_recurrence_and_ignores_an_outlier():
    # four pixels agree on s = 2 (g = 2, p = 1), one outlier says 10: the L1 optimum is 2.
    pred = np.ones(5)
    gt = np.array([2.0, 2.0, 2.0, 2.0, 10.0])
    # by hand: s0 = mean(g) / mean(p) = 3.6; with weights wa = 1 / (|s - 2| + 1e-8) on the four
    # inliers and wb = 1 / (|10 - s| + 1e-8) on the outlier (p = 1), the reweighted least squares
    # step is s' = (4 * 2 wa + 10 wb) / (4 wa + wb), i.e. about 2 + 8 a / (4 b + a), a = s - 2
    s = 3.6
    for _ in range(10):
        wa, wb = 1.0 / (abs(s - 2.0) + 1e-8), 1.0 / (abs(10.0 - s) + 1e-8)
        s = (8.0 * wa + 10.0 * wb) / (4.0 * wa + wb)
    assert robust_scale(pred, gt) == pytest.approx(s, rel=1e-9)
    assert abs(s - 2.0) < 1e-4
    # the mean ratio (and least squares) would be pulled to 3.6
    r = evaluate_depth(pred, gt, align="scale")
    assert r["abs_rel"] == pytest.approx((8.0 / 10.0) / 5.0, abs=1e-4)  # only the outlier errs
    assert r["delta_1.25"] == pytest.approx(0.8)
    # a negative fit is floored at 1e-3 as upstream
    assert robust_scale(-pred, gt) == 1e-3


def test_median_scale_uses_the_lower_middle_value():
    # torch.median (upstream) returns the lower of the two middle values for an even count
    assert median_scale(np.ones(4), np.array([1.0, 2.0, 3.0, 4.0])) == 2.0


def test_valid_mask_and_dataset_caps():
    gt = np.array([0.0, -1.0, np.nan, np.inf, 5.0, 69.9, 70.0, 80.0])
    np.testing.assert_array_equal(valid_depth_mask(gt, 70.0),
                                  [False, False, False, False, True, True, False, False])
    np.testing.assert_array_equal(valid_depth_mask(gt), [False, False, False, False, True, True, True, True])
    assert DEPTH_PROTOCOLS["sintel"].max_depth == 70 and DEPTH_PROTOCOLS["sintel"].post_clip_max == 70
    assert DEPTH_PROTOCOLS["bonn"].max_depth == 70 and DEPTH_PROTOCOLS["bonn"].post_clip_max is None
    assert DEPTH_PROTOCOLS["kitti"].max_depth is None
    # Sintel clamps the aligned prediction to 70, Bonn does not; the 75 m pixel is invalid for both
    gt = np.array([10.0, 20.0, 75.0])
    pred = np.array([10.0, 200.0, 1.0])
    assert evaluate_depth(pred, gt, "metric", "sintel")["abs_rel"] == pytest.approx((0 + 50 / 20) / 2)
    assert evaluate_depth(pred, gt, "metric", "bonn")["abs_rel"] == pytest.approx((0 + 180 / 20) / 2)
    assert evaluate_depth(pred, gt, "metric", "kitti")["valid_pixels"] == 3


def test_prediction_floor_applies_to_log_and_ratio_metrics_only():
    gt = np.array([1.0, 1.0])
    m = depth_metrics(np.array([0.0, 1.0]), gt)
    assert m["abs_rel"] == pytest.approx(0.5)
    assert m["log_rmse"] == pytest.approx(np.sqrt(np.log(1e-5) ** 2 / 2))
    assert m["delta_1.25"] == 0.5


def test_per_frame_median_and_weighted_average():
    gt = _gt((2, 3, 4))
    pred = gt.copy()
    pred[0] *= 3.0  # frame 0 off by 3, frame 1 exact: per-frame median scale fixes both
    pred[1, -1, -1] = 100.0  # the deepest pixel of frame 1 goes bad (medians unchanged)
    frames = [evaluate_depth(p, g, "median") for p, g in zip(pred, gt)]
    assert frames[0]["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    bad = (100.0 - gt[1, -1, -1]) / gt[1, -1, -1] / 12.0
    assert frames[1]["abs_rel"] == pytest.approx(bad, rel=1e-12)
    frames[1]["valid_pixels"] = 36  # weights: 12 and 36 pixels
    avg = average_depth_metrics(frames)
    assert avg["abs_rel"] == pytest.approx(0.75 * bad, rel=1e-12)
    assert avg["valid_pixels"] == 48
    empty = evaluate_depth(np.ones(3), np.zeros(3), "median")
    assert empty["valid_pixels"] == 0 and np.isnan(empty["abs_rel"])
    assert average_depth_metrics([frames[0], empty])["abs_rel"] == frames[0]["abs_rel"]


def test_bad_input_raises_typed_errors():
    with pytest.raises(EvalInputError, match="one shape"):
        evaluate_depth(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(EvalInputError, match="unknown depth alignment"):
        evaluate_depth(np.ones(2), np.ones(2), align="affine")
    with pytest.raises(EvalInputError, match="unknown depth dataset"):
        evaluate_depth(np.ones(2), np.ones(2), dataset="moon")


def test_resize_depth_matches_opencv_inter_cubic():
    """Expected values from OpenCV 5.0 `cv2.resize(d, (5, 3), interpolation=cv2.INTER_CUBIC)` on
    the float64 array below (OpenCV keeps its cubic weights in float32: ~3e-7 relative noise)."""
    d = np.array([[1.0, 2.0, 4.0], [3.0, 5.0, 10.0]])
    opencv = np.array([
        [0.7387219987478417, 1.0554584729423162, 1.739583432674408, 2.869959236491095, 3.646166798571741],
        [1.8559995293617249, 2.3300001323223114, 3.5, 5.750001400709152, 7.335999846458435],
        [2.973277173462833, 3.6045419211636016, 5.260416746139526, 8.630043857466873, 11.025833269139127]])
    np.testing.assert_allclose(resize_depth(d, (3, 5)), opencv, rtol=2e-6)
    np.testing.assert_array_equal(resize_depth(d, (2, 3)), d)  # same size: identity
    np.testing.assert_allclose(resize_depth(np.full((2, 4, 6), 7.0), (9, 5)), 7.0, rtol=1e-12)
