"""The streaming step: one trace per stream, scan == loop, pose conversion."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsvggt_jax.stream.step as step_mod
from conftest import child_xla_flags, micro_frames, nhwc
from xsvggt_jax.cache.core import (CacheConfig, CacheMismatchError, CacheOverflowError, cache_bytes, cache_overflowed,
                              init_cache)
from xsvggt_jax.geometry import pose_encoding_to_extri_intri, quat_to_mat

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cache_cfg", [CacheConfig.uncompressed(), CacheConfig("xstream", 64, 16),
                                       CacheConfig("sliding", 64), CacheConfig("random", 64, seed=3)])
def test_step_traces_once_for_a_stream(monkeypatch, caplog, cache_cfg, tiny_cfg, tiny_params, tiny_frames):
    """Committed parameters (as loaded ones are) and a cache left uncommitted by init_cache: one trace,
    one compile (the driver places the cache like the parameters before the first step)."""
    images, queries = tiny_frames
    chex.clear_trace_counter()
    monkeypatch.setattr(step_mod, "step", chex.assert_max_traces(step_mod.step, n=1))
    fn = step_mod.make_step(tiny_cfg, cache_cfg)
    cache = init_cache(tiny_cfg, cache_cfg, 1, images.shape[2:], 6, jnp.asarray(queries)[None])
    assert not cache.frame_index.committed  # not pinned to a device
    before = cache_bytes(cache)
    params = jax.device_put(tiny_params, jax.devices()[0])  # committed
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for t in range(6):
            cache, _ = fn(params, cache, nhwc(images[t:t + 1]))
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(compiles) == 1, [r.getMessage()[:80] for r in compiles]
    assert fn.jitted._cache_size() == 1
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
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[t], scanned), out, rtol=1e-5, atol=1e-6)


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


# ------------------------------------------------------------------------------------- step checks
def test_step_refuses_a_cache_built_for_another_config(micro):
    """A bits-8 KCVT cache stepped with a bits-4 KCVT step used to run silently as bits 8."""
    cfg, params = micro
    built = CacheConfig("xstream", 24, 3, quant="kcvt", bits=8, quant_head_dim=None)
    cache = init_cache(cfg, built, 1, (28, 28))
    fn = step_mod.make_step(cfg, CacheConfig("xstream", 24, 3, quant="kcvt", bits=4, quant_head_dim=None))
    with pytest.raises(CacheMismatchError, match="bits=8 .cache. vs 4 .step."):
        fn(params, cache, jnp.asarray(micro_frames(1)[0]))


def test_step_refuses_frames_that_are_not_float_nhwc_in_unit_range(micro):
    cfg, params = micro
    cc = CacheConfig("sliding", 24)
    fn = step_mod.make_step(cfg, cc)
    frame = micro_frames(1)[0]                                            # [1, 28, 28, 3]
    cases = [((frame * 255).astype(np.uint8), "dtype uint8 .divide uint8 frames by 255."),
             (frame.transpose(0, 3, 1, 2), r"got shape \(1, 3, 28, 28\) \(channels first\? NHWC"),
             (frame * 255, r"in \[0, 1\], got values in .*divide by 255"),
             (jnp.asarray(frame * 255), "divide by 255"),
             (np.zeros((1, 42, 28, 3), np.float32), "built for 28x28 frames, got 42x28")]
    for bad, needle in cases:
        with pytest.raises(ValueError, match=needle) as e:
            fn(params, init_cache(cfg, cc, 1, (28, 28)), bad)
        assert isinstance(e.value, (step_mod.FrameError, CacheMismatchError))
    cache, out = fn(params, init_cache(cfg, cc, 1, (28, 28)), frame)      # the good frame runs
    assert np.isfinite(np.asarray(out["depth"])).all()


def test_frames_too_small_for_the_tracker_refused_before_compiling(micro):
    """The track head halves its feature map corr_levels - 1 times; a side below stride x 2^(levels-1)
    left an empty pyramid level and an obscure gather error from deep inside the tracer (the medium
    and published configs, 7 levels, at 112x154). Refused at trace time, naming the need; the same
    frames without query points run."""
    import dataclasses
    cfg, params = micro
    cfg = cfg.replace(track=dataclasses.replace(cfg.track, corr_levels=5))   # needs sides >= 2 x 16 = 32
    cc = CacheConfig("sliding", 24)
    frame = jnp.asarray(micro_frames(1)[0])                                   # [1, 28, 28, 3]
    tracked = init_cache(cfg, cc, 1, (28, 28), query_points=jnp.full((1, 2, 2), 5.0))
    with pytest.raises(ValueError, match=r"28x28 is too small to track points: .* 5-level .* >= 32 pixels"):
        jax.eval_shape(lambda c, f: step_mod.step(cfg, cc, params, c, f), tracked, frame)
    untracked = init_cache(cfg, cc, 1, (28, 28))
    jax.eval_shape(lambda c, f: step_mod.step(cfg, cc, params, c, f), untracked, frame)


def test_uncompressed_cache_overflow_is_reported(micro):
    """Stepping an uncompressed cache past max_frames used to overwrite its last slots silently."""
    cfg, params = micro
    cc = CacheConfig.uncompressed()
    frames = jnp.asarray(micro_frames(3))
    bare = jax.jit(lambda c, f: step_mod.step(cfg, cc, params, c, f))
    cache = init_cache(cfg, cc, 1, (28, 28), max_frames=2)
    for t in range(3):
        cache, out = bare(cache, frames[t])
        full = t >= 2
        assert bool(cache_overflowed(cache)) == full
        assert np.isnan(np.asarray(out["depth"])).all() == full and np.isnan(np.asarray(out["depth"])).any() == full
    fn = step_mod.make_step(cfg, cc)
    cache = init_cache(cfg, cc, 1, (28, 28), max_frames=2)
    cache, _ = fn(params, cache, frames[0])
    cache, _ = fn(params, cache, frames[1])
    with pytest.raises(CacheOverflowError, match="holds 2 frames and is full"):
        fn(params, cache, frames[2])
    with pytest.raises(CacheOverflowError, match="3 frames after 0"):
        step_mod.run_stream(cfg, cc, params, init_cache(cfg, cc, 1, (28, 28), max_frames=2), frames)


def test_init_cache_sharding_is_optional_and_honoured(micro):
    cfg, _ = micro
    cc = CacheConfig("xstream", 24, 3)
    free = init_cache(cfg, cc, 1, (28, 28))
    assert not any(x.committed for x in jax.tree_util.tree_leaves(free))
    dev = jax.devices()[-1]
    pinned = init_cache(cfg, cc, 1, (28, 28), sharding=jax.sharding.SingleDeviceSharding(dev))
    assert all(x.committed and x.devices() == {dev} for x in jax.tree_util.tree_leaves(pinned))


MESH_SCRIPT = """
import logging, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from conftest import micro_cfg, micro_frames
from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.nn.model import init_params
from xsvggt_jax.stream.step import make_step
assert jax.device_count() == 2
cfg, cc = micro_cfg(), CacheConfig("xstream", 24, 3)
mesh = Mesh(np.array(jax.devices()), ("data",))
params = jax.device_put(init_params(cfg, jax.random.PRNGKey(0)), NamedSharding(mesh, P()))
records = []
handler = logging.Handler(); handler.emit = records.append
logging.getLogger("jax").addHandler(handler)
shapes = jax.eval_shape(lambda: init_cache(cfg, cc, 2, (28, 28)))
batch_sharded = jax.tree.map(lambda x: NamedSharding(mesh, P("data") if x.ndim >= 2 else P()), shapes)
for sharding in (None, batch_sharded):  # replicated like the params; streams split over the devices
    fn = make_step(cfg, cc)
    cache = init_cache(cfg, cc, 2, (28, 28), sharding=sharding)
    with jax.log_compiles(True):
        for f in micro_frames(2):
            cache, out = fn(params, cache, jnp.asarray(np.concatenate([f, f])))
    assert fn.jitted._cache_size() == 1, fn.jitted._cache_size()
    assert cache.global_kv[0].k.sharding.device_set == set(jax.devices())
    assert cache.global_kv[0].k.sharding.spec == (P() if sharding is None else P("data"))
compiles = [r for r in records if r.getMessage().startswith("Compiling jit(step)")]
print("compiles", len(compiles))
assert len(compiles) == 2, len(compiles)
"""


def test_step_compiles_once_on_a_two_device_mesh(tmp_path):
    """init_cache no longer pins the cache to device 0: on a (CPU) mesh an unsharded cache is placed
    next to the replicated parameters, a sharded one keeps its sharding, and each compiles once."""
    env = dict(os.environ, XLA_FLAGS=child_xla_flags("--xla_force_host_platform_device_count=2"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    r = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def test_make_step_driver_composes_with_jit_and_vmap(micro):
    """The driver used to read `.committed` off its cache (placement) and so raised a
    ConcretizationTypeError under jax.jit / jax.vmap. Traced, it is the pure step."""
    cfg, params = micro
    cc = CacheConfig("xstream", 24, 3)
    fn = step_mod.make_step(cfg, cc)
    streams = [micro_frames(2, seed=s) for s in range(2)]
    want = []
    for frames in streams:
        cache, outs = init_cache(cfg, cc, 1, (28, 28)), []
        for f in frames:
            cache, out = fn(params, cache, jnp.asarray(f))
            outs.append(out)
        want.append(outs)
    jitted = jax.jit(fn)
    cache = init_cache(cfg, cc, 1, (28, 28))
    for t, f in enumerate(streams[0]):
        cache, out = jitted(params, cache, jnp.asarray(f))
        chex.assert_trees_all_close(out, want[0][t], rtol=1e-5, atol=1e-6)
    assert int(cache.frame_index) == 2
    vstep = jax.vmap(fn, in_axes=(None, 0, 0))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[init_cache(cfg, cc, 1, (28, 28)) for _ in streams])
    for t in range(2):
        stacked, out = vstep(params, stacked, jnp.asarray(np.stack([s[t] for s in streams])))
        for s in range(2):
            chex.assert_trees_all_close(jax.tree.map(lambda x: x[s], out), want[s][t], rtol=1e-5, atol=1e-6)
