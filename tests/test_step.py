"""The streaming step: one trace per stream, scan == loop, pose conversion."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsvggt_jax.step as step_mod
from xsvggt_jax.cache import CacheConfig, cache_bytes, init_cache
from xsvggt_jax.pose import pose_encoding_to_extri_intri, quat_to_mat


@pytest.mark.parametrize("cache_cfg", [CacheConfig.uncompressed(), CacheConfig("xstream", 64, 16),
                                       CacheConfig("sliding", 64), CacheConfig("random", 64, seed=3)])
def test_step_traces_once_for_a_stream(monkeypatch, caplog, cache_cfg, tiny_cfg, tiny_params, tiny_frames):
    images, queries = tiny_frames
    traces = []
    real = step_mod.step

    def counting(*args):
        traces.append(1)
        return real(*args)

    monkeypatch.setattr(step_mod, "step", counting)
    fn = step_mod.make_step(tiny_cfg, cache_cfg)
    cache = init_cache(tiny_cfg, cache_cfg, 1, images.shape[2:], 6, jnp.asarray(queries)[None])
    before = cache_bytes(cache)
    params = jax.device_put(tiny_params)  # committed, as loaded parameters are
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for t in range(6):
            cache, _ = fn(params, cache, jnp.asarray(images[t:t + 1].transpose(0, 2, 3, 1)))
    assert len(traces) == 1
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(counting)")]
    assert len(compiles) == 1, [r.getMessage()[:80] for r in compiles]
    assert int(cache.frame_index) == 6 and cache_bytes(cache) == before


def test_scan_runner_equals_step_loop(tiny_cfg, tiny_params, tiny_frames):
    images, queries = tiny_frames
    frames = jnp.asarray(images[:4].transpose(0, 2, 3, 1))[:, None]  # [S, B=1, H, W, 3]
    cc = CacheConfig("xstream", 64, 16)
    fresh = lambda: init_cache(tiny_cfg, cc, 1, images.shape[2:], None, jnp.asarray(queries)[None])
    _, scanned = jax.jit(lambda p, c, f: step_mod.run_stream(tiny_cfg, cc, p, c, f))(tiny_params, fresh(), frames)
    fn = step_mod.make_step(tiny_cfg, cc)
    cache = fresh()
    for t in range(4):
        cache, out = fn(tiny_params, cache, frames[t])
        for k in ("depth", "camera_pose", "vis"):
            np.testing.assert_allclose(np.asarray(scanned[k][t]), np.asarray(out[k]), rtol=1e-5, atol=1e-6)


def test_quat_to_mat_known_rotation():
    s = np.sqrt(0.5)
    r = np.asarray(quat_to_mat(jnp.array([0.0, 0.0, s, s])))  # 90 degrees about z (xyzw)
    np.testing.assert_allclose(r, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-6)
    r2 = np.asarray(quat_to_mat(jnp.array([0.0, 0.0, 2 * s, 2 * s])))  # scale-invariant
    np.testing.assert_allclose(r2, r, atol=1e-6)


def test_pose_encoding_to_extri_intri():
    enc = jnp.array([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 1.0, np.pi / 2, np.pi / 3]])
    ext, intr = pose_encoding_to_extri_intri(enc, (100, 200))
    np.testing.assert_allclose(np.asarray(ext[0]), [[1, 0, 0, 1], [0, 1, 0, 2], [0, 0, 1, 3]], atol=1e-6)
    fy, fx = 50.0 / np.tan(np.pi / 4), 100.0 / np.tan(np.pi / 6)
    np.testing.assert_allclose(np.asarray(intr[0]), [[fx, 0, 100], [0, fy, 50], [0, 0, 1]], rtol=1e-6)
