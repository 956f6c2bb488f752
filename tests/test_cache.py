"""The compressed cache: upstream's quantize-then-prune order reproduced bit-exactly in storage,
fixed shapes and bytes, one trace per stream, vmap over streams, reproducible random pruning."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import xsvggt_jax.stream.step as step_mod
from _refs import ref_quant
from conftest import micro_cfg, micro_frames as _frames
from xsvggt_jax.cache.core import (QUANT_LAYOUTS, CacheConfig, CacheMismatchError, LayerPlan, _empty_layers,
                                   cache_bytes, init_cache, plan_layers, tree_bytes, update_layer)
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.cache.codec import LAYOUTS as CODECS
from xsvggt_jax.attention.masks import KeyPrefix

LAYOUTS = tuple(q for q in QUANT_LAYOUTS if q != "none")


# ----------------------------------------------------------------------- upstream order, bit-exact
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("prune", ["none", "sliding"])
def test_quantized_storage_equals_upstream_fake_quant_then_prune(layout, prune):
    """Simulate upstream in numpy: cache = prune(fake_quant(cat(cache, current))) each step, the
    current step attending to cat(cache, current). Our packed storage must dequantize to exactly
    those values, and the staged attention inputs must equal cat(cache, current)."""
    b, h, n, d, steps, budget, group = 1, 2, 5, 16, 7, 12, 8
    cc = CacheConfig(prune=prune, budget=budget, quant=layout, bits=4, group=group, quant_head_dim=None)
    slots = budget if prune != "none" else steps * n
    plan = LayerPlan(1, h, d, n, slots, True, prune != "none")
    layers, length = _empty_layers(plan, cc, b, jnp.float32), jnp.zeros((), jnp.int32)
    k_axis, v_axis = (codec.axis for codec in CODECS[layout])
    rng = np.random.default_rng(1)
    ref_k = np.zeros((b, h, 0, d), np.float32)
    ref_v = np.zeros((b, h, 0, d), np.float32)
    for _ in range(steps):
        k, v, q = (rng.standard_normal((b, h, n, d)).astype(np.float32) for _ in range(3))
        att_k, att_v, mask, kv, length = update_layer(layers[0], length, jnp.asarray(q), jnp.asarray(k),
                                                      jnp.asarray(v), cache_cfg=cc, num_special=1,
                                                      key=jax.random.PRNGKey(0))
        layers = (kv,)
        cat_k, cat_v = np.concatenate([ref_k, k], 2), np.concatenate([ref_v, v], 2)
        t = cat_k.shape[2]
        np.testing.assert_array_equal(np.asarray(att_k)[:, :, :t], cat_k)
        np.testing.assert_array_equal(np.asarray(att_v)[:, :, :t], cat_v)
        if prune == "none":  # static capacity: attention walks the filled prefix
            assert isinstance(mask, KeyPrefix) and int(mask.length) == t
        else:
            assert np.all(np.isfinite(np.asarray(mask)[:t])) and np.all(np.isneginf(np.asarray(mask)[t:]))
        ref_k, ref_v = ref_quant(cat_k, 4, group, k_axis)[0], ref_quant(cat_v, 4, group, v_axis)[0]
        if prune == "sliding" and t > budget:
            ref_k, ref_v = ref_k[:, :, -budget:], ref_v[:, :, -budget:]
        keep = int(length)
        assert keep == ref_k.shape[2]
        np.testing.assert_array_equal(np.asarray(layers[0].k.decode())[:, :, :keep], ref_k)
        np.testing.assert_array_equal(np.asarray(layers[0].v.decode())[:, :, :keep], ref_v)
        assert layers[0].k.codes.dtype == jnp.uint8 and layers[0].k.codes.shape[-1] == d // 2  # int4 packed


# ------------------------------------------------------------------------------------ shapes, bytes
def test_cache_bytes_do_not_grow_with_frames(micro):
    cfg, params = micro
    cc = CacheConfig(prune="xstream", budget=20, pool=2, quant="kcvt", quant_head_dim=None)
    fn = step_mod.make_step(cfg, cc)
    cache = init_cache(cfg, cc, 1, (28, 28))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), cache)
    sizes = []
    for t, frame in enumerate(_frames(30)):
        cache, _ = fn(params, cache, jnp.asarray(frame))
        if t in (0, 29):
            sizes.append(cache_bytes(cache))
    assert sizes[0] == sizes[1]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), cache) == shapes
    assert int(cache.global_len) == cc.keep(cfg.tokens_per_frame(28, 28)) and int(cache.frame_index) == 30


def test_published_int4_cache_bytes():
    """Published model, 518x392 frames, budget 2048, KCVT int4 group 64 (shapes only)."""
    cfg = ModelConfig.published()
    cc = CacheConfig(prune="xstream", budget=2048, quant="kcvt", bits=4, group=64)
    cache = jax.eval_shape(lambda: init_cache(cfg, cc, 1, (392, 518)))
    p = cfg.tokens_per_frame(392, 518)                       # 1041
    keep = max(2048, 2 * p)                                  # upstream keeps the first + current frame
    rows = -(-(keep + p) // 64)                              # per-channel groups of one step's cache
    per_layer = (2 * 16 * keep * 64 // 2                     # K and V codes, two per byte
                 + 16 * rows * 64 * (4 + 1)                  # K: fp32 scale + uint8 zero per (group, channel)
                 + 16 * keep * 1 * (4 + 1)                   # V: fp32 scale + uint8 zero per (token, 64 dims)
                 + keep * 4)                                 # K: int32 group index per kept token
    glob = tree_bytes(cache.global_kv)
    assert glob == 24 * per_layer
    floor = 2048 * 24 * 2 * 1024 * 0.5
    fp32_200 = 200 * p * 24 * 2 * 1024 * 4                   # uncompressed after 200 frames
    print(f"global int4 cache {glob} B = {glob / floor:.3f} x packed floor; fp32 after 200 frames is "
          f"{fp32_200 / glob:.0f}x larger; camera cache {tree_bytes(cache.camera_kv)} B (fp32, as upstream)")
    assert all(leaf.dtype in (jnp.uint8, jnp.float32, jnp.int32) for leaf in jax.tree_util.tree_leaves(cache.global_kv))
    assert fp32_200 / glob >= 100


def test_published_int4_cache_within_115_percent_of_floor_with_fp16_scales():
    """The compact layout (float16 group scales) meets 1.15x the packed floor at the published size."""
    cfg = ModelConfig.published()
    cc = CacheConfig(prune="xstream", budget=2048, quant="kcvt", bits=4, group=64, scale_dtype="float16")
    cache = jax.eval_shape(lambda: init_cache(cfg, cc, 1, (392, 518)))
    floor = 2048 * 24 * 2 * 1024 * 0.5
    glob = tree_bytes(cache.global_kv)
    print(f"fp16-scale int4 global cache {glob} B = {glob / floor:.3f} x packed floor")
    assert glob <= 1.15 * floor


# -------------------------------------------------------------------------------------- tracing
PRUNES = ("none", "xstream", "sliding", "random")


def _tracing_config(prune: str, quant: str) -> CacheConfig:
    return CacheConfig(prune=prune, budget=24, pool=3, quant=quant, quant_head_dim=None)


def test_step_cache_is_a_fixed_point_every_policy_and_layout(micro):
    """jit reuses a trace when the arguments' tree and avals repeat. For every policy and layout the
    cache a step returns has exactly the tree and avals (shape, dtype, weak type) of the cache it was
    given, so a stream's next step matches the first step's trace (abstract evaluation: no compile)."""
    cfg, params = micro
    frame = jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32)
    aval = lambda x: (x.shape, x.dtype, getattr(x, "weak_type", False))
    for prune in PRUNES:
        for quant in QUANT_LAYOUTS:
            cc = _tracing_config(prune, quant)
            cache = init_cache(cfg, cc, 1, (28, 28), max_frames=20)
            new, _ = jax.eval_shape(lambda c, f: step_mod.step(cfg, cc, params, c, f), cache, frame)
            assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(cache), (prune, quant)
            before = [aval(jax.typeof(x)) for x in jax.tree_util.tree_leaves(cache)]
            assert [aval(x) for x in jax.tree_util.tree_leaves(new)] == before, (prune, quant)


# Real streams, each policy and each layout at least once (the fixed point above covers every pair):
# a second trace, from anything the abstract check cannot see, raises.
TRACED = [("none", "none"), ("xstream", "kcvt"), ("sliding", "ktvt"), ("random", "kcvc"), ("xstream", "ktvc")]


def test_traced_streams_cover_every_policy_and_layout():
    assert {p for p, _ in TRACED} == set(PRUNES) and {q for _, q in TRACED} == set(QUANT_LAYOUTS)


@pytest.mark.parametrize("prune,quant", TRACED)
def test_one_trace_per_stream(monkeypatch, micro, prune, quant):
    cfg, params = micro
    chex.clear_trace_counter()
    monkeypatch.setattr(step_mod, "step", chex.assert_max_traces(step_mod.step, n=1))  # make_step jits this
    cc = _tracing_config(prune, quant)
    fn = step_mod.make_step(cfg, cc)
    cache = init_cache(cfg, cc, 1, (28, 28), max_frames=20)  # no queries: the track head is not the subject
    for frame in _frames(20):
        cache, out = fn(params, cache, jnp.asarray(frame))  # a second trace raises AssertionError
    assert np.all(np.isfinite(np.asarray(out["depth"])))


# ----------------------------------------------------------------------------------- vmap, random
def test_vmap_over_streams_equals_separate_runs(micro):
    cfg, params = micro
    cc = CacheConfig(prune="xstream", budget=24, pool=3)  # float cache: no code flips from vmap's op order
    streams = [_frames(6, seed=s) for s in range(3)]
    queries = [jnp.full((1, 2, 2), 5.0 + s) for s in range(3)]
    fn = step_mod.make_step(cfg, cc)
    separate = []
    for s in range(3):
        cache = init_cache(cfg, cc, 1, (28, 28), query_points=queries[s])
        outs = []
        for frame in streams[s]:
            cache, out = fn(params, cache, jnp.asarray(frame))
            outs.append(out)
        separate.append(outs)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[init_cache(cfg, cc, 1, (28, 28), query_points=q)
                                                        for q in queries])
    vstep = jax.jit(jax.vmap(lambda c, f: step_mod.step(cfg, cc, params, c, f)))
    for t in range(6):
        stacked, out = vstep(stacked, jnp.asarray(np.stack([streams[s][t] for s in range(3)])))
        for s in range(3):
            chex.assert_trees_all_close(jax.tree.map(lambda x: x[s], out), separate[s][t], rtol=1e-5, atol=1e-6)


def test_random_policy_reproducible_from_seed(micro):
    cfg, params = micro

    def run(seed):
        cc = CacheConfig(prune="random", budget=16, seed=seed)
        fn = step_mod.make_step(cfg, cc)
        cache = init_cache(cfg, cc, 1, (28, 28))
        for frame in _frames(6):
            cache, out = fn(params, cache, jnp.asarray(frame))
        return np.asarray(cache.global_kv[0].k), np.asarray(out["depth"])

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_plan_rejects_unbounded_uncompressed_cache():
    with pytest.raises(ValueError, match="max_frames"):
        plan_layers(micro_cfg(), CacheConfig.uncompressed(), (28, 28), None)
    with pytest.raises(ValueError, match="prune"):
        CacheConfig(prune="lru")


# ------------------------------------------------------------------------------------ checkpointing
@pytest.mark.parametrize("cc,queries", [
    (CacheConfig("xstream", 24, 3, quant="kcvt", quant_head_dim=None), None),
    (CacheConfig.uncompressed(), jnp.full((1, 2, 2), 7.0)),
])
def test_cache_saves_and_restores_with_plain_orbax(tmp_path, micro, cc, queries):
    """Orbax's StandardCheckpointer refuses zero-size arrays; the cache used to hold some (no track
    queries: track_points [B, 0, 2]; per-token codecs: group_of [B, 0])."""
    cfg, params = micro
    cache = init_cache(cfg, cc, 1, (28, 28), max_frames=3, query_points=queries)
    fn = step_mod.make_step(cfg, cc)
    frames = _frames(3)
    cache, _ = fn(params, cache, jnp.asarray(frames[0]))
    assert all(x.size for x in jax.tree_util.tree_leaves(cache))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "cache", cache)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "cache", jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), cache))
    chex.assert_trees_all_equal(restored, cache)
    assert restored.cache_cfg == cc and restored.frame_hw == (28, 28)
    # the restored cache streams on exactly as the original
    _, want = fn(params, cache, jnp.asarray(frames[1]))
    _, got = fn(params, restored, jnp.asarray(frames[1]))
    chex.assert_trees_all_equal(got, want)


def test_restored_cache_is_refused_by_another_config_or_without_a_target(tmp_path, micro):
    """Orbax keeps only the leaves: restored into the tree of another CacheConfig with the same shapes
    (xstream saved, sliding restored) the cache used to stream on silently under the wrong policy,
    and restored without a target it reached the step as a dict (an AttributeError)."""
    cfg, params = micro
    saved_cc, other_cc = CacheConfig("xstream", 24, 3), CacheConfig("sliding", 24, 3)
    frames = _frames(2)
    cache, _ = step_mod.make_step(cfg, saved_cc)(params, init_cache(cfg, saved_cc, 1, (28, 28)), jnp.asarray(frames[0]))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "cache", cache)
        ckpt.wait_until_finished()
        other = jax.eval_shape(lambda: init_cache(cfg, other_cc, 1, (28, 28)))
        shape = lambda t: [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(t)]
        assert shape(other) == shape(cache)  # only the recorded config tells them apart
        wrong = ckpt.restore(tmp_path / "cache", other)
        untargeted = ckpt.restore(tmp_path / "cache")
    frame = jnp.asarray(frames[1])
    for run in (step_mod.make_step(cfg, other_cc), functools.partial(step_mod.step, cfg, other_cc)):
        with pytest.raises(CacheMismatchError, match="prune='xstream' .saved. vs 'sliding'"):
            run(params, wrong, frame)
    for run in (step_mod.make_step(cfg, saved_cc), functools.partial(step_mod.step, cfg, saved_cc)):
        with pytest.raises(CacheMismatchError, match="not a StreamCache .* without a target"):
            run(params, untargeted, frame)
