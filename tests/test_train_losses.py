"""Training losses on hand-made inputs: hand-computed values, zero at perfect prediction,
alignment invariance, masks, finite gradients, one trace under jit."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xsvggt_jax.train import LossConfig, LossConfigError, LossInputError, losses

# jitted once per shape: far cheaper on a loaded CPU than op-by-op eager dispatch
align_scale_shift = jax.jit(losses.align_scale_shift)
camera_loss = jax.jit(losses.camera_loss, static_argnames=("delta", "component_weights", "iteration_gamma"))
depth_loss = jax.jit(losses.depth_loss, static_argnames=("alpha", "normalize", "alignment"))
huber = jax.jit(losses.huber, static_argnames="delta")
multitask_loss = jax.jit(losses.multitask_loss, static_argnames="cfg")
multiscale_normal_loss = jax.jit(losses.multiscale_normal_loss, static_argnames="scales")
normal_loss = jax.jit(losses.normal_loss)
point_loss = jax.jit(losses.point_loss, static_argnames=("alpha", "normal_scales", "normalize", "alignment"))
point_map_normals = jax.jit(losses.point_map_normals)
track_loss = jax.jit(losses.track_loss, static_argnames="stop_gradient_weight")


@jax.jit
@chex.assert_max_traces(n=1)
def loss_and_grad(preds: dict, targets: dict):
    """Total loss and its gradient w.r.t. all predictions; one trace for every call in this module
    (every caller passes all prediction keys and a `valid` mask, at the same shapes)."""
    return jax.value_and_grad(lambda q: losses.multitask_loss(q, targets)[0])(preds)

B, S, H, W, N = 1, 2, 8, 10, 5


def _surface(key, b=B, s=S, h=H, w=W) -> jax.Array:
    """A smooth, non-planar point map [b,s,h,w,3] in front of the camera."""
    ys, xs = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1.2, 1.2, w), indexing="ij")
    phase = jax.random.uniform(key, (b, s, 1, 1), minval=0.0, maxval=3.0)
    z = 3.0 + 0.4 * jnp.sin(2.0 * xs + phase) + 0.3 * ys * ys
    return jnp.stack([xs * z, ys * z, z], axis=-1)


def _preds(key) -> dict:
    """Random predictions with every output key, shaped like the model's."""
    ks = jax.random.split(key, 8)
    points = _surface(ks[0])
    return {
        "camera_pose": jax.random.normal(ks[1], (B, S, 9)),
        "depth": points[..., 2:] * jnp.exp(0.1 * jax.random.normal(ks[2], (B, S, H, W, 1))),
        "depth_conf": 1.0 + jnp.exp(jax.random.normal(ks[3], (B, S, H, W))),
        "pts3d_in_other_view": points + 0.05 * jax.random.normal(ks[4], points.shape),
        "conf": 1.0 + jnp.exp(jax.random.normal(ks[5], (B, S, H, W))),
        "track": 20.0 * jax.random.uniform(ks[6], (B, S, N, 2)),
        "vis": jax.nn.sigmoid(jax.random.normal(ks[7], (B, S, N))),
        "track_conf": jax.nn.sigmoid(jax.random.normal(ks[0], (B, S, N)) + 1.0),
    }


def _mask(key, p_valid=0.7) -> jax.Array:
    return jax.random.bernoulli(key, p_valid, (B, S, H, W))


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- camera

def test_huber_values_below_at_and_above_delta():
    err = jnp.array([0.05, -0.05, 0.1, 0.3, -2.0])
    # 0.5 e^2 / delta inside, |e| - delta / 2 outside (delta 0.1)
    np.testing.assert_allclose(huber(err, 0.1), [0.0125, 0.0125, 0.05, 0.25, 1.95], rtol=1e-6)


def test_camera_loss_hand_computed_components():
    target = jnp.zeros((1, 2, 9))
    pred = target.at[0, 1, 0].set(0.3).at[0, 0, 5].set(-0.05).at[0, 1, 8].set(2.0)
    loss, parts = camera_loss(pred, target)
    t, r, fl = 0.25 / 6, 0.0125 / 8, 1.95 / 4  # mean over (frames x components) of each slice
    np.testing.assert_allclose([parts["camera_T"], parts["camera_R"], parts["camera_FL"]], [t, r, fl], rtol=1e-6)
    np.testing.assert_allclose(loss, t + r + 0.5 * fl, rtol=1e-6)


def test_camera_loss_iterations_weighted_like_vggt():
    target = jax.random.normal(jax.random.PRNGKey(0), (B, S, 9))
    first = target + 0.3
    single, _ = camera_loss(first, target)
    perfect, _ = camera_loss(target, target)
    assert float(perfect) == 0.0
    # two iterations: weights gamma^1 / 2 and gamma^0 / 2; the last one is perfect
    as_list, _ = camera_loss([first, target], target, iteration_gamma=0.6)
    as_array, _ = camera_loss(jnp.stack([first, target]), target, iteration_gamma=0.6)
    np.testing.assert_allclose(as_list, 0.3 * single, rtol=1e-6)
    np.testing.assert_allclose(as_array, as_list, rtol=1e-6)


# ----------------------------------------------------------------------------- dense maps

def test_depth_loss_hand_computed_without_alignment_change():
    # residual [[1,-1],[-1,1]] is orthogonal to 1 and to pred, so the aligned prediction is pred
    pred = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2, 1)
    target = jnp.array([[2.0, 1.0], [2.0, 5.0]]).reshape(1, 1, 2, 2, 1)
    conf = jnp.full((1, 1, 2, 2), 2.0)
    loss, parts = depth_loss(pred, target, conf, alpha=0.1, normalize=False)
    # conf * |err| = 2; finite differences of the residual are +-2 in x and y
    np.testing.assert_allclose(parts["depth_conf_l1"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(parts["depth_grad"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(parts["depth_reg"], -0.1 * np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(loss, 4.0 - 0.1 * np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_perfect_prediction_gives_zero_and_conf_term_is_analytic(normalize):
    p = _preds(jax.random.PRNGKey(1))
    ones = jnp.ones((B, S, H, W))
    d, _ = depth_loss(p["depth"], p["depth"], ones, normalize=normalize)
    pts, parts = point_loss(p["pts3d_in_other_view"], p["pts3d_in_other_view"], ones, normalize=normalize)
    assert abs(float(d)) < 1e-6 and abs(float(pts)) < 1e-6, (d, pts, parts)
    c = 3.0  # perfect prediction with constant confidence c: only -alpha * log(c) remains
    d, _ = depth_loss(p["depth"], p["depth"], c * ones, normalize=normalize)
    np.testing.assert_allclose(d, -0.1 * np.log(c), rtol=1e-5)


def test_depth_alignment_invariance_scale_and_shift():
    target = _preds(jax.random.PRNGKey(2))["depth"]
    scale = jnp.array([3.7, 0.2]).reshape(1, 2, 1, 1, 1)
    shift = jnp.array([0.4, -1.5]).reshape(1, 2, 1, 1, 1)
    ones = jnp.ones((B, S, H, W))
    for normalize in (True, False):
        loss, _ = depth_loss(scale * target + shift, target, ones, normalize=normalize)
        assert abs(float(loss)) < 1e-5, (normalize, loss)
    off, _ = depth_loss(target + 0.3 * jnp.sin(target * 7.0), target, ones)
    assert float(off) > 1e-2  # a non-affine change is penalized


def test_point_alignment_invariance_scale_and_translation():
    target = _surface(jax.random.PRNGKey(3))
    ones = jnp.ones((B, S, H, W))
    pred = 0.37 * target + jnp.array([0.5, -0.2, 1.0])
    loss, parts = point_loss(pred, target, ones)
    assert abs(float(loss)) < 1e-5, parts
    rotated = jnp.stack([target[..., 1], target[..., 0], target[..., 2]], -1)  # not a similarity
    off, _ = point_loss(rotated, target, ones)
    assert float(off) > 1e-2


def test_alignment_none_keeps_scale_invariance_but_rejects_inverted_depth():
    target = _preds(jax.random.PRNGKey(2))["depth"]
    ones = jnp.ones((B, S, H, W))
    scaled, _ = depth_loss(3.7 * target, target, ones, alignment="none")   # normalize_maps removes scale
    assert abs(float(scaled)) < 1e-5
    shifted, _ = depth_loss(target + 0.4, target, ones, alignment="none")  # ... but not a shift
    assert float(shifted) > 1e-3
    # depth decreasing where the truth increases: scale&shift fits it with a negative scale and
    # hides the inversion; "none" does not (the trap of training from random weights)
    inverted = 10.0 - target
    affine, _ = depth_loss(inverted, target, ones)
    plain, _ = depth_loss(inverted, target, ones, alignment="none")
    assert abs(float(affine)) < 1e-5 and float(plain) > 0.05
    pts = _surface(jax.random.PRNGKey(3))
    same, _ = point_loss(0.37 * pts, pts, ones, alignment="none")
    moved, _ = point_loss(pts + jnp.array([0.5, 0.0, 0.0]), pts, ones, alignment="none")
    assert abs(float(same)) < 1e-5 and float(moved) > 1e-3
    with pytest.raises(LossConfigError, match="dense_alignment"):
        LossConfig(dense_alignment="scale")


def test_align_scale_shift_recovers_affine_map_on_valid_pixels():
    pred = _preds(jax.random.PRNGKey(4))["pts3d_in_other_view"].reshape(S, H, W, 3)
    mask = _mask(jax.random.PRNGKey(5)).reshape(S, H, W)
    target = 2.5 * pred + jnp.array([1.0, -2.0, 0.5])
    target = jnp.where(mask[..., None], target, 1e3)  # masked-out pixels are garbage
    scale, shift = align_scale_shift(pred, target, mask)
    np.testing.assert_allclose(scale, [2.5, 2.5], rtol=1e-5)
    np.testing.assert_allclose(shift, [[1.0, -2.0, 0.5]] * 2, rtol=1e-4, atol=1e-4)


def test_plane_normals_and_tilted_plane_normal_loss():
    ys, xs = jnp.meshgrid(jnp.arange(9.0), jnp.arange(10.0), indexing="ij")
    plane = jnp.stack([xs, ys, jnp.zeros_like(xs)], -1)[None]  # z = 0, [1,9,10,3]
    mask = jnp.ones((1, 9, 10), bool)
    normals, valid = point_map_normals(plane, mask)
    # up x left etc. all give -z on this grid (x right, y down)
    np.testing.assert_allclose(jnp.where(valid[..., None], normals, jnp.array([0.0, 0.0, -1.0])),
                               jnp.broadcast_to(jnp.array([0.0, 0.0, -1.0]), normals.shape), atol=1e-6)
    # border: the top-left pixel has only the down x right normal; an interior pixel has all four
    assert valid[:, 0, 0, 0].tolist() == [False, False, True, False]
    assert valid[:, 0, 2, 2].all()
    tilted = plane.at[..., 2].set(xs)  # z = x: normal at 45 degrees to the plane's
    np.testing.assert_allclose(normal_loss(tilted, plane, mask), [1.0 - np.sqrt(0.5)], rtol=1e-5)
    np.testing.assert_allclose(multiscale_normal_loss(tilted, plane, mask, 3), [1.0 - np.sqrt(0.5)], rtol=1e-5)


def test_masked_out_pixels_do_not_change_dense_losses():
    p = _preds(jax.random.PRNGKey(6))
    t = _preds(jax.random.PRNGKey(7))
    mask = _mask(jax.random.PRNGKey(8))

    def corrupt(x):  # positive garbage (a valid confidence) on the masked-out pixels
        junk = 7.0 + 1e3 * jnp.abs(jax.random.normal(jax.random.PRNGKey(9), x.shape))
        return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 4)), x, junk)

    for fn, key, conf in ((depth_loss, "depth", "depth_conf"), (point_loss, "pts3d_in_other_view", "conf")):
        clean, clean_parts = fn(p[key], t[key], p[conf], mask)
        dirty, _ = fn(corrupt(p[key]), corrupt(t[key]), corrupt(p[conf]), mask)
        np.testing.assert_allclose(dirty, clean, rtol=1e-6)
        assert all(abs(float(v)) > 1e-4 for v in clean_parts.values()), clean_parts  # nothing trivially 0
        unmasked, _ = fn(corrupt(p[key]), corrupt(t[key]), corrupt(p[conf]), None)
        assert abs(float(unmasked) - float(clean)) > 1e-3  # the corruption matters without the mask


def test_frame_without_valid_pixels_counts_all_pixels():
    p, t = _preds(jax.random.PRNGKey(10)), _preds(jax.random.PRNGKey(11))
    mask = jnp.ones((B, S, H, W), bool).at[:, 1].set(False)
    got, _ = depth_loss(p["depth"], t["depth"], p["depth_conf"], mask)
    want, _ = depth_loss(p["depth"], t["depth"], p["depth_conf"], None)
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ----------------------------------------------------------------------------- tracks

def test_track_loss_hand_computed():
    pred = jnp.array([[[[3.0, 4.0], [1.0, 1.0]]]])  # [1,1,2,2]
    target = jnp.array([[[[0.0, 0.0], [1.0, 1.0]]]])
    pred_vis, target_vis = jnp.array([[[0.8, 0.3]]]), jnp.array([[[1.0, 0.0]]])
    conf = jnp.array([[[0.5, 0.25]]])
    loss, parts = track_loss(pred, target, pred_vis, target_vis, conf)
    pos = (0.5 * 5.0 + 0.25 * 0.0) / 2
    vis = (0.5 * -np.log(0.8) + 0.25 * -np.log(0.7)) / 2
    np.testing.assert_allclose([parts["track_pos"], parts["track_vis"]], [pos, vis], rtol=1e-6)
    np.testing.assert_allclose(loss, pos + vis, rtol=1e-6)


def test_track_weight_stop_gradient_blocks_confidence_collapse_path():
    p, t = _preds(jax.random.PRNGKey(12)), _preds(jax.random.PRNGKey(13))

    def grad_conf(stop):
        return jax.grad(lambda c: losses.track_loss(p["track"], t["track"], p["vis"], t["vis"], c,
                                                    stop_gradient_weight=stop)[0])(p["track_conf"])

    assert float(jnp.min(grad_conf(False))) > 0  # upstream: lowering confidence lowers the loss
    assert float(jnp.max(jnp.abs(grad_conf(True)))) == 0.0


# ----------------------------------------------------------------------------- total

def test_multitask_loss_is_the_weighted_sum_with_upstream_defaults():
    cfg = LossConfig()
    assert (cfg.camera_weight, cfg.depth_weight, cfg.point_weight, cfg.track_weight) == (20.0, 20.0, 10.0, 0.5)
    assert (cfg.huber_delta, cfg.camera_component_weights, cfg.depth_alpha, cfg.point_alpha,
            cfg.normal_scales) == (0.1, (1.0, 1.0, 0.5), 0.1, 0.1, 3)
    p, t = _preds(jax.random.PRNGKey(14)), _preds(jax.random.PRNGKey(15))
    t["valid"] = _mask(jax.random.PRNGKey(16))
    total, comps = multitask_loss(p, t)
    cam, _ = camera_loss(p["camera_pose"], t["camera_pose"])
    dep, _ = depth_loss(p["depth"], t["depth"], p["depth_conf"], t["valid"])
    pts, _ = point_loss(p["pts3d_in_other_view"], t["pts3d_in_other_view"], p["conf"], t["valid"])
    trk, _ = track_loss(p["track"], t["track"], p["vis"], t["vis"], p["track_conf"])
    np.testing.assert_allclose([comps["camera"], comps["depth"], comps["point"], comps["track"]],
                               [cam, dep, pts, trk], rtol=1e-6)
    np.testing.assert_allclose(total, 20 * cam + 20 * dep + 10 * pts + 0.5 * trk, rtol=1e-6)
    assert float(comps["loss"]) == float(total)
    expected = {"loss", "camera", "depth", "point", "track", "camera_T", "camera_R", "camera_FL",
                "depth_conf_l1", "depth_grad", "depth_reg", "point_conf_l1", "point_grad", "point_reg",
                "track_pos", "track_vis"}
    assert set(comps) == expected


def test_multitask_loss_skips_terms_missing_from_targets_and_rejects_bad_input():
    p = _preds(jax.random.PRNGKey(17))
    cam_only = {"camera_pose": p["camera_pose"] + 0.2}
    total, comps = multitask_loss(p, cam_only)
    assert set(comps) == {"loss", "camera", "camera_T", "camera_R", "camera_FL"}
    np.testing.assert_allclose(total, 20 * comps["camera"], rtol=1e-6)
    with pytest.raises(LossInputError, match="no loss term"):
        losses.multitask_loss(p, {"images": jnp.zeros(3)})
    with pytest.raises(LossInputError, match="valid"):
        multitask_loss(p, {"depth": p["depth"], "valid": jnp.ones((B, S, H, W + 1), bool)})
    with pytest.raises(LossInputError, match="camera_pose"):
        losses.camera_loss(p["camera_pose"][..., :7], p["camera_pose"])
    with pytest.raises(LossConfigError, match="depth_weight"):
        LossConfig(depth_weight=-1.0)


def test_multitask_loss_computes_in_float32_for_bf16_predictions():
    p, t = _preds(jax.random.PRNGKey(24)), _preds(jax.random.PRNGKey(25))
    t["valid"] = _mask(jax.random.PRNGKey(26))
    p_bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), p)
    p_rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), p_bf16)
    got, comps = multitask_loss(p_bf16, t)
    want, _ = multitask_loss(p_rounded, t)
    assert got.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in comps.values())
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gradients_finite_at_perfect_and_degenerate_inputs():
    p = _preds(jax.random.PRNGKey(18))
    ones = jnp.ones((B, S, H, W))
    perfect = dict(p, conf=ones, depth_conf=ones, track_conf=jnp.full((B, S, N), 0.999, jnp.float32))
    degenerate = dict(perfect, depth=jnp.zeros((B, S, H, W, 1)),
                      pts3d_in_other_view=jnp.zeros((B, S, H, W, 3)))
    constant = dict(perfect, depth=jnp.full((B, S, H, W, 1), 2.0, jnp.float32),
                    pts3d_in_other_view=jnp.ones((B, S, H, W, 3)))
    targets = dict(p, valid=_mask(jax.random.PRNGKey(19)))
    zero_targets = dict(degenerate, valid=targets["valid"])
    for preds, tgt in ((perfect, targets), (degenerate, targets), (constant, targets),
                       (perfect, zero_targets), (degenerate, zero_targets)):
        loss, grads = loss_and_grad(preds, tgt)
        assert bool(jnp.isfinite(loss)) and _all_finite(grads)


def test_multitask_loss_jits_with_one_trace():
    t = dict(_preds(jax.random.PRNGKey(20)), valid=_mask(jax.random.PRNGKey(21)))
    for seed in (22, 23):  # new values, same shapes: no retrace (assert_max_traces raises otherwise)
        plain, _ = multitask_loss(_preds(jax.random.PRNGKey(seed)), t)
        jitted, grads = loss_and_grad(_preds(jax.random.PRNGKey(seed)), t)
        np.testing.assert_allclose(jitted, plain, rtol=1e-5)
        assert _all_finite(grads)
