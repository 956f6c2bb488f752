"""The heads' refinement loops (camera pose iterations, tracker iterations): each is one `nn.scan`
over shared modules, and, as upstream, each iteration reads the previous estimate through a
stop-gradient. Micro model, random weights; the forward values are checked against upstream by
tests/test_parity.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.nn.heads.camera import CameraHead
from xsvggt_jax.nn.heads.track import Tracker

FRAMES, POINTS = 3, 4


def _random_params(module, *args):
    """Parameters of `module` for `args`: shapes by abstract evaluation (no compile), N(0, 0.1^2) values."""
    rng = np.random.default_rng(2)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _replace(params: dict, path: tuple, value) -> dict:
    """A copy of the nested dict `params` with the leaf at `path` replaced."""
    if len(path) == 1:
        return {**params, path[0]: value}
    return {**params, path[0]: _replace(params[path[0]], path[1:], value)}


def _camera(cfg, iterations: int):
    cfg = cfg.replace(camera=dataclasses.replace(cfg.camera, iterations=iterations))
    tokens = jax.random.normal(jax.random.key(1), (1, FRAMES, cfg.num_special_tokens + 4, 2 * cfg.embed_dim))
    head = CameraHead(cfg)
    return head, _random_params(head, tokens), tokens


def test_camera_iterations_read_the_previous_pose_through_a_stop_gradient(micro):
    """Upstream detaches the previous prediction before each refinement, so the learned empty pose
    token (the first iteration's input) reaches iteration k >= 1 only through that detached value:
    its gradient there is exactly 0, while the first iteration's is not."""
    head, params, tokens = _camera(micro[0], iterations=3)
    sums = lambda empty: jnp.stack([pose.sum() for pose in head.apply(     # [iterations]
        {"params": _replace(params, ("empty_pose_tokens",), empty)}, tokens)[0]])
    grads = np.asarray(jax.jit(jax.jacrev(sums))(params["empty_pose_tokens"]))      # [3, 1, 1, 9]
    assert np.abs(grads[0]).max() > 1e-6        # the check has teeth
    np.testing.assert_array_equal(grads[1:], 0.0)


def test_camera_trunk_compiled_once_whatever_the_iterations(micro):
    """The iterations are a loop over one trunk: the lowered program holds as many matmuls for 1
    iteration as for 4 (an unrolled loop would hold 4x the trunk's)."""
    def dots(iterations):
        head, params, tokens = _camera(micro[0], iterations)
        return jax.jit(lambda p, t: head.apply({"params": p}, t)).lower(params, tokens).as_text().count("dot_general")

    assert dots(4) == dots(1) > 0


def test_tracker_iterations_read_the_previous_coordinates_through_a_stop_gradient(micro):
    """Upstream detaches the coordinates at the start of each refinement. The update former's output
    bias for the coordinate channels (flow_head bias[:2]) then moves the last iteration's tracks of
    frames >= 1 through that iteration's own update only: d sum(x of frames >= 1) / d bias_x is exactly
    stride * (S - 1) * N. Without the stop-gradient the earlier iterations' updates add to it."""
    cfg = micro[0]
    cfg = cfg.replace(track=dataclasses.replace(cfg.track, iters=2))
    rng = np.random.default_rng(0)
    fmaps = jnp.asarray(rng.standard_normal((1, FRAMES, 6, 8, cfg.track.features)), jnp.float32)
    queries = jnp.asarray(rng.uniform(2.0, 10.0, (1, POINTS, 2)), jnp.float32)
    tracker = Tracker(cfg)
    params = _random_params(tracker, queries, fmaps)
    path = ("updateformer", "flow_head", "bias")
    sums = lambda bias: tracker.apply({"params": _replace(params, path, bias)}, queries,  # [2]: x, y
                                      fmaps)[0][:, 1:].sum((0, 1, 2))
    bias = np.asarray(jax.jit(jax.jacfwd(sums))(params[path[0]][path[1]][path[2]]))   # [2, C + 2]
    np.testing.assert_array_equal(bias[:, :2], cfg.track.stride * (FRAMES - 1) * POINTS * np.eye(2))
