"""Head output activations: the pose encoding's field-of-view relu keeps a gradient below zero."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.nn.heads.activations import activate_pose


def test_pose_activation_value_is_upstream_relu():
    enc = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 9)), jnp.float32)
    out = activate_pose(enc)
    np.testing.assert_array_equal(out[..., :7], enc[..., :7])
    np.testing.assert_array_equal(out[..., 7:], jax.nn.relu(enc[..., 7:]))


def test_negative_field_of_view_still_gets_a_gradient():
    """A FoV pre-activation below 0 is pulled back towards a positive target (a plain relu's gradient
    there is 0, and the channel stays dead for the rest of training)."""
    enc = jnp.zeros(9).at[7:].set(jnp.array([-0.3, 0.5]))
    target = jnp.array([0.8, 1.0])
    grad = jax.grad(lambda e: jnp.sum((activate_pose(e)[7:] - target) ** 2))(enc)
    np.testing.assert_allclose(grad[7:], 2 * (jnp.array([0.0, 0.5]) - target), rtol=1e-6)
    assert grad[7] < 0  # gradient descent raises the dead channel
