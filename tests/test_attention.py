"""Attention implementations against the dense reference; masks as objects; causal blocks skipped."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _imports import cycles, import_graph
from conftest import micro_cfg, rel_err
from xsvggt_jax.attention import kernels as A
from xsvggt_jax.attention.dispatch import (AUTO_DENSE_KEYS, AttentionConfigError, AttentionSpec, attend,
                                           attend_lse, attend_split, resolve_attention, split_selected)
from xsvggt_jax.attention.kernels import block_schedule
from xsvggt_jax.attention.masks import Additive, FrameCausal, Full, KeyPrefix
from xsvggt_jax.nn.model import StreamVGGT, param_shapes

HIGHEST = jax.lax.Precision.HIGHEST
TOKENS = 37                   # tokens per frame: no block size below divides S * TOKENS
QUERY_BLOCK, KEY_BLOCK = 64, 48


def qkv(seed: int, n: int, d: int = 16):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(kk, (1, 2, n, d)) for kk in ks)


def reference_bias(kind: str, n: int, length: int = 0):
    """The dense additive [n, n] bias of each mask, built in numpy (independently of the mask objects)."""
    fid = np.arange(n) // TOKENS
    if kind == "causal":
        return np.where(fid[:, None] >= fid[None, :], 0.0, -np.inf).astype(np.float32)
    if kind == "prefix":
        return np.broadcast_to(np.where(np.arange(n) < length, 0.0, -np.inf), (n, n)).astype(np.float32)
    if kind == "additive":
        rng = np.random.default_rng(0)
        return np.where(np.arange(n)[None, :] % 5 == 1, -np.inf, rng.standard_normal((n, n))).astype(np.float32)
    return None


def mask_object(kind: str, n: int, length: int):
    return {"full": Full(), "causal": FrameCausal(TOKENS), "prefix": KeyPrefix(length),
            "additive": Additive(jnp.asarray(reference_bias("additive", n)))}[kind]


@pytest.mark.parametrize("kind", ["full", "causal", "prefix", "additive"])
@pytest.mark.parametrize("impl", ["xla", "blocked", "cudnn", "auto"])
def test_every_implementation_equals_dense(impl, kind):
    n = 5 * TOKENS                           # 185: odd, not a multiple of either block
    length = 2 * TOKENS + 3
    q, k, v = qkv(1, n)
    ref = A._attend_dense(q, k, v, reference_bias(kind, n, length), HIGHEST)
    fn = jax.jit(lambda q, k, v, length: attend(
        q, k, v, mask=AttentionSpec(mask_object(kind, n, length), impl, query_block=QUERY_BLOCK,
                                    key_block=KEY_BLOCK)))
    assert rel_err(fn(q, k, v, jnp.int32(length)), ref) <= 1e-6


@pytest.mark.parametrize("kind", ["full", "causal"])
def test_blocked_single_frame(kind):
    q, k, v = qkv(2, TOKENS)
    ref = A._attend_dense(q, k, v, reference_bias(kind, TOKENS), HIGHEST)
    mask = FrameCausal(TOKENS) if kind == "causal" else Full()
    out = jax.jit(lambda q, k, v: A.attend_blocked(q, k, v, mask, query_block=16, key_block=16))(q, k, v)
    assert rel_err(out, ref) <= 1e-6


def test_causal_blocks_are_skipped_not_masked():
    """NaN keys/values in the last frame: a masked (visited) block would turn 0 * NaN into NaN, a
    skipped one leaves every earlier frame's output exact."""
    frames = 6
    n = frames * TOKENS
    q, k, v = qkv(3, n)
    ref = A._attend_dense(q, k, v, reference_bias("causal", n), HIGHEST)
    last = jnp.arange(n) >= (frames - 1) * TOKENS
    k_bad, v_bad = (jnp.where(last[:, None], jnp.nan, x) for x in (k, v))
    blocked = jax.jit(lambda mask, k, v: A.attend_blocked(q, k, v, mask, query_block=TOKENS, key_block=TOKENS),
                      static_argnums=0)
    out = blocked(FrameCausal(TOKENS), k_bad, v_bad)
    seen = (frames - 1) * TOKENS
    assert rel_err(out[:, :, :seen], ref[:, :, :seen]) <= 1e-6
    assert np.isnan(np.asarray(out[:, :, seen:])).all()      # the last frame does see them
    full = blocked(Full(), k_bad, v_bad)
    assert np.isnan(np.asarray(full)).all()                  # the check can fail


def test_causal_schedule_is_about_half_of_full():
    """The key blocks each query block visits (what `blocked_states` loops over): a published-size
    offline global layer at 64 frames does ~half the block products of full attention."""
    n = 64 * 1041
    causal = block_schedule(FrameCausal(1041), n, n, A.QUERY_BLOCK, A.KEY_BLOCK)
    full = block_schedule(Full(), n, n, A.QUERY_BLOCK, A.KEY_BLOCK)
    assert full.sum() == len(full) * -(-n // A.KEY_BLOCK)
    assert 0.45 <= causal.sum() / full.sum() <= 0.55


def test_resolve_attention():
    bf16 = jnp.bfloat16
    assert resolve_attention("auto", "cpu", FrameCausal(9)) == "blocked"
    assert resolve_attention("auto", "cpu", None, keys=100) == "xla"
    assert resolve_attention("auto", "cpu", None, keys=AUTO_DENSE_KEYS + 1) == "blocked"
    assert resolve_attention("auto", "gpu", Full(), bf16) == "cudnn"
    assert resolve_attention("auto", "gpu", FrameCausal(1), bf16) == "cudnn"
    assert resolve_attention("auto", "gpu", FrameCausal(9), bf16) == "blocked"   # not a cuDNN mask
    assert resolve_attention("cudnn", "gpu", Full(), jnp.float32) == "xla"        # cuDNN needs 16 bits
    assert resolve_attention("cudnn", "cpu", FrameCausal(9)) == "blocked"
    assert resolve_attention("xla", "gpu", FrameCausal(9)) == "xla"
    assert resolve_attention("ring", "cpu") == "ring"
    with pytest.raises(AttentionConfigError, match="unknown attention"):
        resolve_attention("flash", "cpu")
    with pytest.raises(AttentionConfigError, match="mesh axis"):
        AttentionSpec(Full(), "ring")


def test_offline_has_no_dense_sequence_mask():
    """The offline causal forward no longer builds a [S*P, S*P] bias (traced only, not compiled)."""
    cfg = micro_cfg()
    s, hw = 64, (28, 28)
    p = cfg.tokens_per_frame(*hw)
    n = s * p
    images = jax.ShapeDtypeStruct((1, s, *hw, 3), jnp.float32)
    fn = jax.jit(lambda w, x: StreamVGGT(cfg).apply({"params": w}, x, None, True, method=StreamVGGT.offline))
    text = fn.lower(param_shapes(cfg), images).as_text()
    assert f"1x{s}x{p}x" in text                 # shapes are spelled like this in the text
    assert f"{n}x{n}x" not in text
    with pytest.raises(AttentionConfigError, match="unknown attention"):
        StreamVGGT(cfg, attention="flash").init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 28, 28, 3)))


def test_options_unblock_cpu_queries_for_cost_analysis():
    """XLA's cost analysis counts a loop body once: benchmarks/stream.py counts FLOPs with the CPU's
    query blocks off (`options(cpu_query_block=None)`), which must trace the one-fusion attention."""
    q, k, v = qkv(4, 3 * A.CPU_QUERY_BLOCK)
    flops = lambda fn: jax.jit(fn).lower(q, k, v).compile().cost_analysis()["flops"]
    one = flops(lambda q, k, v: A.attend_xla(q, k, v, Full(), HIGHEST, query_block=q.shape[2]))
    with A.options(cpu_query_block=None) as opts:
        assert opts.cpu_query_block is None
        unblocked = flops(lambda q, k, v: attend(q, k, v))
    blocked = flops(lambda q, k, v: attend(q, k, v))        # the default: a lax.map of 3 blocks
    assert unblocked == one
    assert blocked < 0.5 * one


# ------------------------------------------------------------------------------------------ layering
def test_attention_imports_only_itself_and_no_cycle_runs_through_the_model():
    """The attention package is the bottom layer (masks <- kernels <- ring <- dispatch): it imports
    none of the package's other modules but the root's typed errors, and no import cycle (function-level
    imports included) runs through attention, nn, the cache core or the sharded forward."""
    graph = import_graph()
    attention = {m for m in graph if m == "xsvggt_jax.attention" or m.startswith("xsvggt_jax.attention.")}
    for m in attention:
        allowed = attention | {"xsvggt_jax.errors"}
        assert graph[m] <= allowed, (m, graph[m] - allowed)
    assert "xsvggt_jax.attention.ring" in attention and "xsvggt_jax.attention.masks" in attention
    layered = ("xsvggt_jax.attention", "xsvggt_jax.nn", "xsvggt_jax.cache.core", "xsvggt_jax.stream.sharded")
    bad = [c for c in cycles(graph) if any(m.startswith(layered) for m in c)]
    assert not bad, bad


def test_one_home_for_the_mask_types():
    """The layers, the cache and the heads use the attention package's mask types, not copies."""
    from xsvggt_jax.attention import masks
    from xsvggt_jax.cache import core
    from xsvggt_jax.nn import layers
    from xsvggt_jax.nn.heads import track
    assert core.Mask is masks.Mask and core.KeyPrefix is masks.KeyPrefix and layers.Mask is masks.Mask
    assert track.Additive is masks.Additive
    assert not hasattr(layers, "Prefix") and not hasattr(masks, "Prefix")


# ------------------------------------------------------------------ partial softmax, split cache attention
CAP, NEW = 3 * 16, 7          # cache capacity (3 chunks of 16) and current-frame tokens


def split_inputs(seed: int, length: int):
    """q [1, 2, NEW, 16]; a cache [1, 2, CAP, 16] filled to `length` (large garbage past it); current k/v."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v = (jax.random.normal(kk, (1, 2, NEW, 16)) for kk in ks[:3])
    pk, pv = (jax.random.normal(kk, (1, 2, CAP, 16)) for kk in ks[3:])
    garbage = (jnp.arange(CAP) >= length)[:, None]
    return q, jnp.where(garbage, 1e3, pk), jnp.where(garbage, -1e3, pv), k, v


@pytest.mark.parametrize("length", [0, 1, 16, 23, CAP])
@pytest.mark.parametrize("impl", ["xla", "blocked", "cudnn", "auto"])
def test_split_cache_attention_equals_dense(impl, length):
    """The cache (KeyPrefix of `length`) and the current frame attended separately and merged by
    log-sum-exp == dense attention over [filled prefix; current] (cudnn falls back on CPU)."""
    q, pk, pv, k, v = split_inputs(length, length)
    ref = A._attend_dense(q, jnp.concatenate([pk[:, :, :length], k], 2),
                          jnp.concatenate([pv[:, :, :length], v], 2), None, HIGHEST)
    fn = jax.jit(lambda q, pk, pv, k, v, n: attend_split(q, pk, pv, KeyPrefix(n, 16), k, v, impl=impl))
    ours = fn(q, pk, pv, k, v, jnp.int32(length))
    assert ours.dtype == q.dtype
    assert rel_err(ours, ref) <= 1e-6


@pytest.mark.parametrize("length", [0, 1, 23, CAP])
@pytest.mark.parametrize("impl", ["xla", "blocked", "cudnn"])
def test_prefix_partial_softmax_alone(impl, length):
    """Without the current frame: the prefix piece's out is the prefix attention, its lse the
    log-sum-exp of the filled logits; an empty prefix gives lse -inf and out 0 (weight 0 in a merge)."""
    q, pk, pv, _, _ = split_inputs(7, length)
    out, lse = jax.jit(lambda q, k, v, n: attend_lse(q, k, v, mask=AttentionSpec(KeyPrefix(n, 16), impl)))(
        q, pk, pv, jnp.int32(length))
    assert out.dtype == lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
    logits = np.einsum("bhqd,bhkd->bhqk", np.float64(q), np.float64(pk[:, :, :length])) / 4.0
    if length == 0:
        assert np.all(np.asarray(lse) == -np.inf) and not np.asarray(out).any()
        return
    ref_lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-6, atol=1e-6)
    ref = A._attend_dense(q, pk[:, :, :length], pv[:, :, :length], None, HIGHEST)
    assert rel_err(out, ref) <= 1e-6
    assert rel_err(A.merge_lse([(out, lse)], jnp.float32), ref) <= 1e-6


@pytest.mark.parametrize("cut", [0, 1, 60, 185])
def test_merge_of_disjoint_key_sets_equals_dense(cut):
    """merge_lse of xla pieces over keys [0, cut) and [cut, n), an empty side included, == dense."""
    q, k, v = qkv(5, 185)
    ref = A._attend_dense(q, k, v, None, HIGHEST)
    part = lambda a, b: A.attend_xla_lse(q, k[:, :, a:b], v[:, :, a:b], Full(), HIGHEST)
    assert rel_err(A.merge_lse([part(0, cut), part(cut, 185)], q.dtype), ref) <= 1e-6


def test_streaming_step_split_path_equals_the_single_pass(monkeypatch, micro):
    """The whole streaming step with the split cache/current attention (forced on CPU by
    `options(cache_split=True)`) == the default single pass over [past; current], 4 frames."""
    import xsvggt_jax.stream.step as step_mod
    from conftest import micro_frames
    from xsvggt_jax.cache.core import CacheConfig, init_cache
    from xsvggt_jax.nn import layers

    cfg, params = micro
    cc = CacheConfig.uncompressed()
    frames = jnp.asarray(micro_frames(4, seed=3))
    calls = []
    monkeypatch.setattr(layers, "attend_split", lambda *a, **kw: calls.append(1) or attend_split(*a, **kw))

    def run():
        fn = jax.jit(lambda c, f: step_mod.step(cfg, cc, params, c, f))
        cache, outs = init_cache(cfg, cc, 1, (28, 28), max_frames=4), []
        for t in range(4):
            cache, out = fn(cache, frames[t])
            outs.append(out)
        return cache, outs

    base_cache, base = run()
    assert not calls                                      # the CPU default: one pass, unchanged
    with A.options(cache_split=True):
        cache, split = run()
    assert calls                                          # every cached layer took the split path
    for a, b in zip(base, split):
        for name in ("depth", "pts3d_in_other_view", "camera_pose", "conf"):
            assert rel_err(b[name], a[name]) <= 1e-6, name
    for x, y in zip(jax.tree.leaves(base_cache), jax.tree.leaves(cache)):   # the next state: same keys
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert rel_err(y, x) <= 1e-6
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cudnn_fit_checks_head_dim_and_logs_the_fallback_once(caplog):
    bf16 = jnp.bfloat16
    assert resolve_attention("auto", "gpu", Full(), bf16, head_dim=64) == "cudnn"
    assert resolve_attention("auto", "gpu", KeyPrefix(3), bf16, head_dim=128) == "cudnn"
    assert resolve_attention("auto", "gpu", Full(), bf16, head_dim=60) == "xla"
    with caplog.at_level(logging.INFO, logger="xsvggt_jax.attention.dispatch"):
        for _ in range(3):
            assert resolve_attention("cudnn", "gpu", KeyPrefix(3), bf16, head_dim=256) == "blocked"
    notes = [r.getMessage() for r in caplog.records if "head dim 256" in r.getMessage()]
    assert len(notes) <= 1                                # once per process (an earlier test may have)
    assert not split_selected("auto", jnp.float32, 64)    # CPU: the single pass stays the default
    with A.options(cache_split=True):
        assert split_selected("auto", jnp.float32, 64)
