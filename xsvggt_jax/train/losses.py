"""StreamVGGT / VGGT training losses as pure, jit-able, differentiable jnp functions.

Prediction names are the model's outputs (`xsvggt_jax.nn.model`), batch first and frame axis second:
  camera_pose [B,S,9] (absT_quaR_FoV: translation 3, quaternion xyzw 4, FoV h, w 2), or its
      per-iteration list from the camera head,
  depth [B,S,H,W,1], depth_conf [B,S,H,W], pts3d_in_other_view [B,S,H,W,3], conf [B,S,H,W],
  track [B,S,N,2], vis [B,S,N] (probability), track_conf [B,S,N] (probability).
Targets carry the same keys, from a teacher (distillation) or ground truth, plus an optional pixel
mask `valid` [B,S,H,W] (bool). Target confidences are never used (as upstream).

The recipe is upstream StreamVGGT's `DistillLoss` (src/dust3r/losses.py); where upstream and VGGT
(training/loss.py) differ, the docstrings say which one is followed. Frame means: per-frame masked
means, then the mean over the B*S frames (upstream: per view, pooled over its batch, then the mean
over views; identical for upstream's batch size 1).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.train.config import LossConfig
from xsvggt_jax.errors import InputError

Array = jax.Array
PoseInput = Union[Array, Sequence[Array]]

CONF_MIN = 1e-6  # confidences are clamped here before weighting and the log
ALIGN_DENOM_MIN = 1e-6  # floor of the alignment's sum of squares (upstream)
MEAN_NORM_RANGE = (1e-3, 1e3)  # clamp of the per-frame normalization distance (upstream)
NORMAL_EPS = 1e-6  # floor of a normal's length before normalizing (upstream)
PROB_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] inside the BCE


class LossInputError(InputError):
    """Predictions and targets do not fit together (missing keys, mismatched shapes)."""


# ----------------------------------------------------------------------------- small helpers

def safe_norm(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """Euclidean norm along `axis` whose gradient at the zero vector is 0 (not NaN)."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    """Mean of `x` over `axis` counting only entries where `mask` (broadcast to x) is true; 0 where
    none is."""
    m = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def huber(err: Array, delta: float) -> Array:
    """Elementwise Huber in upstream's smooth-L1 form: 0.5 e^2 / delta for |e| <= delta, else
    |e| - 0.5 delta (continuous at delta, slope 1 outside)."""
    abs_err = jnp.abs(err)
    return jnp.where(abs_err <= delta, 0.5 * err * err / delta, abs_err - 0.5 * delta)


def _check_shape(name: str, x: Array, shape: tuple) -> None:
    if tuple(x.shape) != tuple(shape):
        raise LossInputError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


# ----------------------------------------------------------------------------- camera

def camera_loss(pred_pose: PoseInput, target_pose: Array, *, delta: float = 0.1,
                component_weights: tuple[float, float, float] = (1.0, 1.0, 0.5),
                iteration_gamma: float = 0.6) -> tuple[Array, dict[str, Array]]:
    """Huber loss on the 9-d pose encoding, split into translation / quaternion / FoV.

    pred_pose: [B,S,9], or the camera head's iterations: a sequence of [B,S,9] or an array
        [I,B,S,9]; iteration i of I is weighted gamma ** (I - 1 - i) / I (VGGT's
        compute_camera_loss). A single array is one iteration (upstream StreamVGGT supervises the
        last iteration only).
    target_pose: [B,S,9].
    Returns (sum_k w_k * L_k, {"camera_T", "camera_R", "camera_FL"}), each L_k the mean Huber over
    its components, frames and batch.
    """
    if isinstance(pred_pose, (list, tuple)):
        pred_pose = jnp.stack(pred_pose)
    elif pred_pose.ndim == target_pose.ndim:
        pred_pose = pred_pose[None]
    if target_pose.ndim != 3 or target_pose.shape[-1] != 9:
        raise LossInputError(f"target camera_pose has shape {tuple(target_pose.shape)}, expected [B, S, 9]")
    _check_shape("camera_pose", pred_pose, (pred_pose.shape[0],) + tuple(target_pose.shape))
    n_iter = pred_pose.shape[0]
    iter_w = jnp.asarray(iteration_gamma ** np.arange(n_iter - 1, -1, -1) / n_iter, pred_pose.dtype)
    err = huber(pred_pose - target_pose[None], delta)  # [I, B, S, 9]
    parts = {}
    for name, sl in (("camera_T", slice(0, 3)), ("camera_R", slice(3, 7)), ("camera_FL", slice(7, 9))):
        parts[name] = jnp.sum(iter_w * jnp.mean(err[..., sl], axis=(1, 2, 3)))
    wt, wr, wf = component_weights
    return wt * parts["camera_T"] + wr * parts["camera_R"] + wf * parts["camera_FL"], parts


# ----------------------------------------------------------------------------- dense maps

def normalize_by_mean_norm(x: Array, mask: Array) -> tuple[Array, Array]:
    """Divide each frame by its mean valid distance from the origin.

    x: [F,H,W,C] (C=1: depth, C=3: points); mask: [F,H,W] bool.
    Returns (x / d, d) with d [F] the mean of |x| over valid pixels, clamped to [1e-3, 1e3].
    """
    dist = masked_mean(safe_norm(x, axis=-1), mask, axis=(1, 2))
    dist = jnp.clip(dist, *MEAN_NORM_RANGE)
    return x / dist[:, None, None, None], dist


def align_scale_shift(pred: Array, target: Array, mask: Array) -> tuple[Array, Array]:
    """Closed-form least squares: the scale s [F] and per-channel shift t [F,C] minimizing
    sum over valid pixels of |s * pred + t - target|^2, per frame.

    pred, target: [F,H,W,C]; mask: [F,H,W] bool. Upstream (closed_form_scale_and_shift) uses one
    scale and a per-channel shift for both depth (C=1) and points (C=3), over all pixels; here only
    valid pixels enter. The sum of squares is floored at 1e-6 (a constant prediction gets s = 0).
    """
    m = mask[..., None].astype(pred.dtype)  # [F,H,W,1]
    count = jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)  # [F,1]
    pred_mean = jnp.sum(pred * m, axis=(1, 2)) / count  # [F,C]
    target_mean = jnp.sum(target * m, axis=(1, 2)) / count
    pred_c = (pred - pred_mean[:, None, None]) * m
    target_c = target - target_mean[:, None, None]
    scale = jnp.sum(pred_c * target_c, axis=(1, 2, 3)) / jnp.maximum(
        jnp.sum(pred_c * pred_c, axis=(1, 2, 3)), ALIGN_DENOM_MIN)
    return scale, target_mean - scale[:, None] * pred_mean


def image_gradient_loss(pred: Array, target: Array, mask: Array) -> Array:
    """L1 between the finite differences of prediction and target, per frame.

    pred, target: [F,H,W,C]; mask: [F,H,W] bool. Returns [F]: the mean of the x and y terms, each a
    mean over the neighbour pairs whose both pixels are valid (upstream StreamVGGT's
    image_gradient_loss, one scale; upstream divides by all pairs, masked or not).
    """
    diff = pred - target
    gx = jnp.abs(diff[:, :, 1:] - diff[:, :, :-1])  # [F,H,W-1,C]
    gy = jnp.abs(diff[:, 1:] - diff[:, :-1])  # [F,H-1,W,C]
    mx = (mask[:, :, 1:] & mask[:, :, :-1])[..., None]
    my = (mask[:, 1:] & mask[:, :-1])[..., None]
    return 0.5 * (masked_mean(gx, mx, axis=(1, 2, 3)) + masked_mean(gy, my, axis=(1, 2, 3)))


def point_map_normals(points: Array, mask: Array) -> tuple[Array, Array]:
    """Four unit normals per pixel from the cross products of the vectors to consecutive
    4-neighbours (up x left, left x down, down x right, right x up).

    points: [F,H,W,3]; mask: [F,H,W] bool. Returns normals [4,F,H,W,3] (zero where degenerate) and
    valid [4,F,H,W]: the pixel and both neighbours valid and inside the image.
    """
    p = jnp.pad(points, ((0, 0), (1, 1), (1, 1), (0, 0)))
    m = jnp.pad(mask, ((0, 0), (1, 1), (1, 1)))
    center = p[:, 1:-1, 1:-1]
    # neighbours in the order up, left, down, right; each direction is crossed with the next one
    dirs = jnp.stack([p[:, :-2, 1:-1], p[:, 1:-1, :-2], p[:, 2:, 1:-1], p[:, 1:-1, 2:]]) - center
    normals = jnp.cross(dirs, jnp.roll(dirs, -1, axis=0))
    normals = normals / jnp.maximum(safe_norm(normals, axis=-1, keepdims=True), NORMAL_EPS)
    m_dirs = jnp.stack([m[:, :-2, 1:-1], m[:, 1:-1, :-2], m[:, 2:, 1:-1], m[:, 1:-1, 2:]])
    return normals, m_dirs & jnp.roll(m_dirs, -1, axis=0) & m[None, :, 1:-1, 1:-1]


def normal_loss(pred: Array, target: Array, mask: Array) -> Array:
    """1 - cos(angle) between predicted and target normals, per frame.

    pred, target: [F,H,W,3]; mask: [F,H,W] bool. Returns [F], the mean over valid normals (VGGT's
    normal_loss; upstream StreamVGGT averages over all normals, masked or not).
    """
    f = pred.shape[0]
    normals, valid = point_map_normals(jnp.concatenate([pred, target]), jnp.concatenate([mask, mask]))
    cos = jnp.sum(normals[:, :f] * normals[:, f:], axis=-1)  # [4,F,H,W]
    return masked_mean(1.0 - cos, valid[:, :f], axis=(0, 2, 3))


def multiscale_normal_loss(pred: Array, target: Array, mask: Array, scales: int = 3) -> Array:
    """`normal_loss` averaged over the strided sub-grids ::1, ::2, ..., ::2^(scales-1). Returns [F]."""
    total = 0.0
    for k in range(scales):
        st = 2 ** k
        total = total + normal_loss(pred[:, ::st, ::st], target[:, ::st, ::st], mask[:, ::st, ::st])
    return total / scales


def _frames_mask(valid: Optional[Array], shape: tuple) -> Array:
    """[B,S,H,W] mask (or None = all valid) -> [F,H,W] bool; a frame with no valid pixel counts
    all of them (upstream)."""
    b, s, h, w = shape
    if valid is None:
        return jnp.ones((b * s, h, w), bool)
    _check_shape("valid", valid, shape)
    m = valid.reshape(b * s, h, w).astype(bool)
    return jnp.where(jnp.any(m, axis=(1, 2), keepdims=True), m, True)


def _dense_loss(pred: Array, target: Array, conf: Array, valid: Optional[Array], *, channels: int,
                alpha: float, normalize: bool, alignment: str,
                gradient_fn: Callable[[Array, Array, Array], Array]) -> dict[str, Array]:
    """Shared depth / point recipe. pred, target [B,S,H,W,C]; conf [B,S,H,W].
    Returns the frame means of {"conf_l1", "grad", "reg"}."""
    if pred.ndim != 5 or pred.shape[-1] != channels:
        raise LossInputError(f"prediction has shape {tuple(pred.shape)}, expected [B, S, H, W, {channels}]")
    b, s, h, w, c = pred.shape
    _check_shape("target", target, pred.shape)
    _check_shape("confidence", conf, pred.shape[:4])
    mask = _frames_mask(valid, (b, s, h, w))
    pred, target = pred.reshape(b * s, h, w, c), target.reshape(b * s, h, w, c)
    if normalize:
        pred, _ = normalize_by_mean_norm(pred, mask)
        target, _ = normalize_by_mean_norm(target, mask)
    if alignment == "scale&shift":
        scale, shift = align_scale_shift(pred, target, mask)
        aligned = pred * scale[:, None, None, None] + shift[:, None, None, :]
    elif alignment == "none":
        aligned = pred
    else:
        raise LossInputError(f"unknown dense alignment {alignment!r}")
    conf = jnp.maximum(conf.reshape(b * s, h, w), CONF_MIN)
    conf_l1 = masked_mean(conf[..., None] * jnp.abs(aligned - target), mask[..., None], axis=(1, 2, 3))
    reg = -alpha * masked_mean(jnp.log(conf), mask, axis=(1, 2))
    grad = gradient_fn(aligned, target, mask)
    return {"conf_l1": jnp.mean(conf_l1), "grad": jnp.mean(grad), "reg": jnp.mean(reg)}


def _sum_named(prefix: str, parts: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    total = parts["conf_l1"] + parts["grad"] + parts["reg"]
    return total, {f"{prefix}_{k}": v for k, v in parts.items()}


def depth_loss(pred_depth: Array, target_depth: Array, conf: Array, valid: Optional[Array] = None, *,
               alpha: float = 0.1, normalize: bool = True,
               alignment: str = "scale&shift") -> tuple[Array, dict[str, Array]]:
    """Depth term: per-frame scale-and-shift alignment (`alignment`="none": no alignment) of the
    prediction to the target, then
    conf * |aligned - target| + image-gradient L1 - alpha * log(conf).

    pred_depth, target_depth: [B,S,H,W,1]; conf: predicted depth confidence [B,S,H,W] (clamped at
    1e-6); valid: [B,S,H,W] bool or None. `normalize`: divide both maps by their mean valid depth
    first (upstream's training mode). Returns (loss, {"depth_conf_l1", "depth_grad", "depth_reg"}).
    """
    parts = _dense_loss(pred_depth, target_depth, conf, valid, channels=1, alpha=alpha,
                        normalize=normalize, alignment=alignment, gradient_fn=image_gradient_loss)
    return _sum_named("depth", parts)


def point_loss(pred_points: Array, target_points: Array, conf: Array, valid: Optional[Array] = None, *,
               alpha: float = 0.1, normal_scales: int = 3,
               normalize: bool = True, alignment: str = "scale&shift") -> tuple[Array, dict[str, Array]]:
    """Point-map term: per-frame alignment (one scale, per-axis shift; `alignment`="none": none)
    of the prediction to the
    target, then conf * |aligned - target| (mean over the 3 axes) + multi-scale normal loss
    - alpha * log(conf).

    pred_points, target_points: [B,S,H,W,3]; conf: predicted point confidence [B,S,H,W]; valid:
    [B,S,H,W] bool or None. Returns (loss, {"point_conf_l1", "point_grad", "point_reg"}).
    """
    def gradient_fn(p, t, m):
        return multiscale_normal_loss(p, t, m, normal_scales)

    parts = _dense_loss(pred_points, target_points, conf, valid, channels=3, alpha=alpha,
                        normalize=normalize, alignment=alignment, gradient_fn=gradient_fn)
    return _sum_named("point", parts)


# ----------------------------------------------------------------------------- tracks

def binary_cross_entropy(prob: Array, target: Array) -> Array:
    """Elementwise BCE of a probability against a (soft) target in [0, 1]; prob clipped to
    [1e-6, 1 - 1e-6]."""
    p = jnp.clip(prob, PROB_EPS, 1.0 - PROB_EPS)
    return -(target * jnp.log(p) + (1.0 - target) * jnp.log1p(-p))


def track_loss(pred_track: Array, target_track: Array, pred_vis: Array, target_vis: Array,
               pred_conf: Array, *, stop_gradient_weight: bool = False) -> tuple[Array, dict[str, Array]]:
    """Track term: mean of w * ||pred - target||_2 plus mean of w * BCE(vis), w the predicted track
    confidence (upstream TrackLoss).

    pred_track, target_track: [B,S,N,2] pixels; pred_vis: [B,S,N] probability; target_vis:
    [B,S,N] probability or 0/1; pred_conf: [B,S,N]. Upstream feeds the head's sigmoid output to
    BCE-with-logits (a sigmoid applied twice); here the BCE takes the probability. Returns
    (loss, {"track_pos", "track_vis"}).
    """
    _check_shape("track", pred_track, target_track.shape)
    _check_shape("vis", pred_vis, target_track.shape[:3])
    _check_shape("target vis", target_vis, target_track.shape[:3])
    _check_shape("track_conf", pred_conf, target_track.shape[:3])
    w = jax.lax.stop_gradient(pred_conf) if stop_gradient_weight else pred_conf
    pos = jnp.mean(w * safe_norm(pred_track - target_track, axis=-1))
    vis = jnp.mean(w * binary_cross_entropy(pred_vis, target_vis.astype(pred_vis.dtype)))
    return pos + vis, {"track_pos": pos, "track_vis": vis}


# ----------------------------------------------------------------------------- total

def _to_float32(x: Array) -> Array:
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _has(d: Mapping, keys: Sequence[str]) -> bool:
    return all(k in d for k in keys)


def multitask_loss(preds: Mapping[str, PoseInput], targets: Mapping[str, Array],
                   cfg: LossConfig = LossConfig()) -> tuple[Array, dict[str, Array]]:
    """Weighted sum of the camera, depth, point and track terms (upstream DistillLoss).

    A term is included when its keys are present in both dicts: camera (camera_pose), depth
    (depth + depth_conf / depth), point (pts3d_in_other_view + conf / pts3d_in_other_view),
    track (track + vis + track_conf / track + vis). targets["valid"] [B,S,H,W] masks the dense
    terms (default: all valid). Targets are held constant (stop_gradient).
    Returns (loss, components): "loss" the weighted total; "camera", "depth", "point", "track" the
    unweighted terms and their parts ("camera_T", "depth_grad", ...), all scalars. The heads'
    confidences are >= 1 (expp1), so the -alpha * log(conf) parts are <= 0 and the total can be
    negative: judge the fit by the other parts, not by a ratio of totals.
    Floating inputs (e.g. bf16 predictions) are cast to float32 first: the loss runs in float32, as
    upstream's criterion (autocast disabled). `cfg` must be static under jit (it is hashable).
    """
    preds = jax.tree_util.tree_map(_to_float32, dict(preds))
    targets = jax.tree_util.tree_map(lambda x: jax.lax.stop_gradient(_to_float32(x)), dict(targets))
    valid = targets.get("valid")
    terms: dict[str, tuple[float, Array]] = {}
    comps: dict[str, Array] = {}
    if _has(preds, ["camera_pose"]) and _has(targets, ["camera_pose"]):
        loss, parts = camera_loss(preds["camera_pose"], targets["camera_pose"], delta=cfg.huber_delta,
                                  component_weights=cfg.camera_component_weights,
                                  iteration_gamma=cfg.camera_iteration_gamma)
        terms["camera"], comps = (cfg.camera_weight, loss), {**comps, **parts}
    if _has(preds, ["depth", "depth_conf"]) and _has(targets, ["depth"]):
        loss, parts = depth_loss(preds["depth"], targets["depth"], preds["depth_conf"], valid,
                                 alpha=cfg.depth_alpha, normalize=cfg.normalize_maps,
                                 alignment=cfg.dense_alignment)
        terms["depth"], comps = (cfg.depth_weight, loss), {**comps, **parts}
    if _has(preds, ["pts3d_in_other_view", "conf"]) and _has(targets, ["pts3d_in_other_view"]):
        loss, parts = point_loss(preds["pts3d_in_other_view"], targets["pts3d_in_other_view"],
                                 preds["conf"], valid, alpha=cfg.point_alpha,
                                 normal_scales=cfg.normal_scales, normalize=cfg.normalize_maps,
                                 alignment=cfg.dense_alignment)
        terms["point"], comps = (cfg.point_weight, loss), {**comps, **parts}
    if _has(preds, ["track", "vis", "track_conf"]) and _has(targets, ["track", "vis"]):
        loss, parts = track_loss(preds["track"], targets["track"], preds["vis"], targets["vis"],
                                 preds["track_conf"], stop_gradient_weight=cfg.track_weight_stop_gradient)
        terms["track"], comps = (cfg.track_weight, loss), {**comps, **parts}
    if not terms:
        raise LossInputError("no loss term applies: predictions and targets share none of camera_pose, "
                             "depth, pts3d_in_other_view, track")
    total = sum(weight * loss for weight, loss in terms.values())
    return total, {"loss": total, **{name: loss for name, (_, loss) in terms.items()}, **comps}
