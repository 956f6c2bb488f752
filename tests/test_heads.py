"""The heads' refinement loops (camera pose iterations, tracker iterations): each is one `nn.scan`
over shared modules, and, as upstream, each iteration reads the previous estimate through a
stop-gradient. Micro model, random weights; the forward values are checked against upstream by
tests/test_parity.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.heads.camera import CameraHead
from xsvggt_jax.heads.track import Tracker

FRAMES, POINTS = 3, 4


def _camera(cfg, iterations: int):
    cfg = cfg.replace(camera=dataclasses.replace(cfg.camera, iterations=iterations))
    tokens = jax.random.normal(jax.random.key(1), (1, FRAMES, cfg.num_special_tokens + 4, 2 * cfg.embed_dim))
    head = CameraHead(cfg)
    return head, jax.jit(head.init)(jax.random.key(2), tokens)["params"], tokens


def test_camera_iterations_read_the_previous_pose_through_a_stop_gradient(micro):
    """Upstream detaches the previous prediction before each refinement, so the learned empty pose
    token (the first iteration's input) reaches iteration k >= 1 only through that detached value:
    its gradient there is exactly 0, while the first iteration's is not."""
    head, params, tokens = _camera(micro[0], iterations=3)
    sums = lambda p: jnp.stack([pose.sum() for pose in head.apply({"params": p}, tokens)[0]])  # [iterations]
    grads = np.asarray(jax.jit(jax.jacrev(sums))(params)["empty_pose_tokens"])                 # [3, 1, 1, 9]
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
    params = jax.jit(tracker.init)(jax.random.key(0), queries, fmaps)["params"]

    sums = lambda p: tracker.apply({"params": p}, queries, fmaps)[0][:, 1:].sum((0, 1, 2))  # [2]: x, y
    bias = np.asarray(jax.jit(jax.jacrev(sums))(params)["updateformer"]["flow_head"]["bias"])  # [2, C + 2]
    np.testing.assert_array_equal(bias[:, :2], cfg.track.stride * (FRAMES - 1) * POINTS * np.eye(2))
