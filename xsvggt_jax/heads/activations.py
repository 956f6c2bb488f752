"""Output activations of the heads (upstream `head_act`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def inverse_log(y: Array) -> Array:
    """sign(y) * (exp(|y|) - 1)."""
    return jnp.sign(y) * jnp.expm1(jnp.abs(y))


def activate_pose(enc: Array) -> Array:
    """Pose encoding [..., 9]: translation linear, quaternion linear, field of view relu."""
    return jnp.concatenate([enc[..., :7], jax.nn.relu(enc[..., 7:])], -1)


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
