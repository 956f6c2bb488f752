"""Output activations of the heads (upstream `head_act`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def inverse_log(y: Array) -> Array:
    """sign(y) * (exp(|y|) - 1)."""
    return jnp.sign(y) * jnp.expm1(jnp.abs(y))


@jax.custom_jvp
def relu_passing_gradient(x: Array) -> Array:
    """relu(x) with the identity's derivative: upstream's value, a gradient for negative x too."""
    return jax.nn.relu(x)


@relu_passing_gradient.defjvp
def _relu_passing_gradient_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return relu_passing_gradient(x), t


def activate_pose(enc: Array) -> Array:
    """Pose encoding [..., 9]: translation linear, quaternion linear, field of view relu.

    The FoV relu's value is upstream's; its derivative is 1 everywhere (straight-through). With relu's
    own derivative a FoV pre-activation pushed below 0 in training gets no gradient again: training
    the tiny model from scratch, one of the two FoV channels died that way within 200 steps (FoV_h
    0 on every frame: infinite focal length), whichever channel overshot first. Upstream fine-tunes
    from VGGT's weights, whose FoV never leaves the positive side. Inference is unchanged.
    """
    return jnp.concatenate([enc[..., :7], relu_passing_gradient(enc[..., 7:])], -1)


def activate_dense(out: Array, activation: str, conf_activation: str = "expp1") -> tuple[Array, Array]:
    """Split [..., C] head output into values [..., C-1] (activated) and confidence [...]."""
    xyz, conf = out[..., :-1], out[..., -1]
    if activation == "exp":
        pts = jnp.exp(xyz)
    elif activation == "inv_log":
        pts = inverse_log(xyz)
    elif activation == "expp1":
        pts = 1.0 + jnp.exp(xyz)
    elif activation == "linear":
        pts = xyz
    elif activation == "relu":
        pts = jax.nn.relu(xyz)
    elif activation == "sigmoid":
        pts = jax.nn.sigmoid(xyz)
    elif activation == "norm_exp":
        d = jnp.maximum(jnp.linalg.norm(xyz, axis=-1, keepdims=True), 1e-8)
        pts = xyz / d * jnp.expm1(d)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    if conf_activation == "expp1":
        conf = 1.0 + jnp.exp(conf)
    elif conf_activation == "expp0":
        conf = jnp.exp(conf)
    elif conf_activation == "sigmoid":
        conf = jax.nn.sigmoid(conf)
    else:
        raise ValueError(f"unknown conf_activation {conf_activation!r}")
    return pts, conf
