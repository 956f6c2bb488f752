"""Quantize once (`CacheConfig.quant_once`, `cache.kivi`): a token's codes are written once and never
change; the cache equals a KIVI cache built by hand; pruning moves whole codes (whole per-channel
groups); one trace per stream; the setting reads, writes and is refused like the other fields."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsvggt_jax.stream.step as step_mod
from _refs import ref_quant
from conftest import run_error
from xsvggt_jax.cache import quant
from xsvggt_jax.cache.codec import LAYOUTS as CODECS, PerChannel
from xsvggt_jax.cache.core import (CacheConfig, LayerPlan, _built_for_json, _empty_layers, init_cache, tree_bytes,
                                   update_layer)
from xsvggt_jax.errors import ConfigError

LAYOUTS = tuple(CODECS)
B, H, N, D, GROUP, BITS = 1, 2, 5, 16, 4, 4


def _stream(cc: CacheConfig, steps: int, slots: int, seed: int = 0):
    """update_layer over `steps` calls of N random tokens; yields (k, v, k_att, v_att, kv, length) per call."""
    plan = LayerPlan(1, H, D, N, slots, True, cc.pruned)
    kv, length = _empty_layers(plan, cc, B, jnp.float32)[0], jnp.zeros((), jnp.int32)
    traces = []

    def one_call(kv, length, q, k, v):
        traces.append(1)
        k_att, v_att, _, kv, length = update_layer(kv, length, q, k, v, cache_cfg=cc, num_special=1,
                                                   key=jax.random.PRNGKey(0))
        return k_att, v_att, kv, length

    call = jax.jit(one_call)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        q, k, v = (rng.standard_normal((B, H, N, D)).astype(np.float32) for _ in range(3))
        k_att, v_att, kv, length = call(kv, length, q, k, v)
        yield k, v, np.asarray(k_att), np.asarray(v_att), kv, int(length)
    assert len(traces) == 1, "the layer update traced more than once in a stream"


def _codes(p):
    return np.asarray(quant.unpack(p.codes, p.codec.bits, p.dim))


def _encoded(codec, length: int) -> int:
    return length - length % codec.group if isinstance(codec, PerChannel) else length


# --------------------------------------------------------------------------- codes never change
@pytest.mark.parametrize("layout", ["kcvt", "ktvc"])   # each codec as K and as V
def test_codes_never_change_after_insertion(layout):
    """Uncompressed layout (tokens never move): once a token's codes are written (per token: when it
    enters; per channel: when its group fills), its codes and its group's scale and zero stay
    bit-identical on every later step. Upstream's order fails this on the same stream (its codes drift:
    the check can see re-quantization)."""
    steps = 6

    def drift(once: bool) -> int:
        cc = CacheConfig(prune="none", quant=layout, bits=BITS, group=GROUP, quant_head_dim=None, quant_once=once)
        first: dict = {}   # (which, slot) -> (codes, scale, zero) when first encoded
        changed = 0
        for *_, kv, length in _stream(cc, steps, steps * N):
            for which, p in (("k", kv.k), ("v", kv.v)):
                codes, scale, zero = _codes(p), np.asarray(p.scale), np.asarray(p.zero)
                for s in range(_encoded(p.codec, length)):
                    row = s // p.codec.group if isinstance(p.codec, PerChannel) else s
                    got = (codes[:, :, s], scale[:, :, row], zero[:, :, row])
                    if (which, s) not in first:
                        first[which, s] = got
                    changed += not all(np.array_equal(a, b) for a, b in zip(got, first[which, s]))
        return changed

    assert drift(True) == 0
    assert drift(False) > 0


# ------------------------------------------------------------------------------- hand-built KIVI
@pytest.mark.parametrize("layout", LAYOUTS)
def test_equals_a_hand_built_kivi_cache(layout):
    """numpy KIVI: every full group of `group` tokens of a per-channel codec quantized on its own (its
    tokens only), the newest length % group tokens kept in float; a per-token codec quantizes each token
    on its own. The stored codes, scales, zero points and windows equal it, and each call attends to
    [past as stored (decoded codes, window floats); current frame in float]."""
    steps = 7
    cc = CacheConfig(prune="none", quant=layout, bits=BITS, group=GROUP, quant_head_dim=None, quant_once=True)
    seen = {"k": np.zeros((B, H, 0, D), np.float32), "v": np.zeros((B, H, 0, D), np.float32)}
    past = dict(seen)
    for k, v, k_att, v_att, kv, length in _stream(cc, steps, steps * N, seed=3):
        for which, new, att in (("k", k, k_att), ("v", v, v_att)):
            t0 = seen[which].shape[2]
            np.testing.assert_array_equal(att[:, :, :t0], past[which])      # the past, as stored
            np.testing.assert_array_equal(att[:, :, t0:t0 + N], new)        # the current frame, float
            seen[which] = np.concatenate([seen[which], new], 2)
        assert length == seen["k"].shape[2]
        for which, p, win in (("k", kv.k, kv.k_win), ("v", kv.v, kv.v_win)):
            x, codes = seen[which], _codes(p)
            if isinstance(p.codec, PerChannel):
                ng = length // GROUP
                parts = [ref_quant(x[:, :, j * GROUP:(j + 1) * GROUP], BITS, GROUP, axis=-2) for j in range(ng)]
                for j, (_, q, s, z) in enumerate(parts):
                    np.testing.assert_array_equal(codes[:, :, j * GROUP:(j + 1) * GROUP], q)
                    np.testing.assert_array_equal(np.asarray(p.scale)[:, :, j], s[:, :, 0])
                    np.testing.assert_array_equal(np.asarray(p.zero)[:, :, j], z[:, :, 0])
                r = length - ng * GROUP
                np.testing.assert_array_equal(np.asarray(win)[:, :, :r], x[:, :, ng * GROUP:])
                past[which] = np.concatenate([p[0] for p in parts] + [x[:, :, ng * GROUP:]], 2)
            else:
                deq, q, s, z = ref_quant(x, BITS, GROUP, axis=-1)
                np.testing.assert_array_equal(codes[:, :, :length], q)
                np.testing.assert_array_equal(np.asarray(p.scale)[:, :, :length], s)
                np.testing.assert_array_equal(np.asarray(p.zero)[:, :, :length], z)
                assert win is None
                past[which] = deq


# ------------------------------------------------------------------------------ pruning, whole codes
def _units(p, length: int):
    """A layer's stored units as hashable bytes: per channel whole groups (codes + their row), per
    token tokens (codes + scale + zero)."""
    codes, scale, zero = _codes(p), np.asarray(p.scale), np.asarray(p.zero)
    if isinstance(p.codec, PerChannel):
        g = p.codec.group
        return [(codes[:, :, j * g:(j + 1) * g].tobytes(), scale[:, :, j].tobytes(), zero[:, :, j].tobytes())
                for j in range(length // g)]
    return [(codes[:, :, s].tobytes(), scale[:, :, s].tobytes(), zero[:, :, s].tobytes()) for s in range(length)]


@pytest.mark.parametrize("layout,prune", [("kcvt", "xstream"), ("ktvt", "xstream"), ("kcvc", "sliding")])
def test_pruning_keeps_whole_codes(layout, prune):
    """After every pruning call each stored unit (a whole per-channel group with its scale/zero row, or
    a per-token token) is one the layer held before the call or one this call encoded from its window
    and frame: pruning drops or keeps whole codes, never re-encodes or splits a group. The layer never
    holds more than its budget, and per-channel groups are whole: the fill is groups + window."""
    budget, steps = 13, 9
    cc = CacheConfig(prune=prune, budget=budget, pool=2, quant=layout, bits=BITS, group=GROUP, quant_head_dim=None,
                     quant_once=True)
    keep = cc.keep(N)
    held = {"k": set(), "v": set()}
    pruned_calls = 0
    prev_length = 0
    for k, v, _, _, kv, length in _stream(cc, steps, keep, seed=5):
        assert length <= keep
        pruned_calls += prev_length + N > keep
        for which, p in (("k", kv.k), ("v", kv.v)):
            units = _units(p, length)
            # what this call could have encoded: the tokens of its window and frame (not yet held)
            fresh = set(units) - held[which]
            enc = _encoded(p.codec, length)
            # at most the groups [window; frame] filled (per channel), the frame's tokens (per token)
            assert len(fresh) <= ((prev_length % GROUP + N) // GROUP if isinstance(p.codec, PerChannel) else N), which
            if isinstance(p.codec, PerChannel):  # fresh groups are the newest encoded ones
                assert all(u in fresh for u in units[len(units) - len(fresh):]) and enc == len(units) * GROUP
            held[which] = set(units)
        prev_length = length
    assert pruned_calls >= steps // 2


def test_pruned_groups_follow_the_policys_votes():
    """sliding keeps the newest `keep` tokens: with whole groups, the newest groups that fit beside the
    window, so the stored K groups are exactly the hand-quantized newest groups of the stream."""
    budget, steps = 13, 9
    cc = CacheConfig(prune="sliding", budget=budget, quant="kcvt", bits=BITS, group=GROUP, quant_head_dim=None,
                     quant_once=True)
    seen = np.zeros((B, H, 0, D), np.float32)
    for k, _, _, _, kv, length in _stream(cc, steps, cc.keep(N), seed=7):
        seen = np.concatenate([seen, k], 2)
        t = seen.shape[2]
        r = t % GROUP
        if t <= budget:
            assert length == t
            continue
        count = min(t // GROUP, (budget - r) // GROUP)
        assert length == count * GROUP + r
        first = t - r - count * GROUP      # the kept groups: the newest `count` whole groups
        for j in range(count):
            _, q, s, _ = ref_quant(seen[:, :, first + j * GROUP:first + (j + 1) * GROUP], BITS, GROUP, axis=-2)
            np.testing.assert_array_equal(_codes(kv.k)[:, :, j * GROUP:(j + 1) * GROUP], q)
            np.testing.assert_array_equal(np.asarray(kv.k.scale)[:, :, j], s[:, :, 0])
        np.testing.assert_array_equal(np.asarray(kv.k_win)[:, :, :r], seen[:, :, t - r:])


# ------------------------------------------------------------------------------------ streams, trace
@pytest.mark.parametrize("prune,quant", [("xstream", "kcvt"), ("none", "ktvc")])
def test_step_cache_is_a_fixed_point(micro, prune, quant):
    """One trace per stream: the cache a quantize-once step returns has exactly the tree and avals
    (shape, dtype, weak type) of the cache it was given, so jit reuses the first step's trace
    (abstract evaluation, no compile; the camera trunk is quantized too). Every `_stream` above also
    counts its traces: one for the whole stream."""
    cfg, params = micro
    cc = CacheConfig(prune=prune, budget=24, pool=3, quant=quant, group=4, quant_head_dim=None, quant_once=True)
    cache = init_cache(cfg, cc, 1, (28, 28), max_frames=6)
    frame = jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32)
    new, _ = jax.eval_shape(lambda c, f: step_mod.step(cfg, cc, params, c, f), cache, frame)
    aval = lambda x: (x.shape, x.dtype, getattr(x, "weak_type", False))
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(cache)
    assert [aval(x) for x in jax.tree_util.tree_leaves(new)] == [aval(jax.typeof(x))
                                                                for x in jax.tree_util.tree_leaves(cache)]
    assert cache.global_kv[0].k_win is not None and cache.camera_kv[0].k_win is not None or quant == "ktvc"


def test_window_bytes_are_counted_and_codes_stay_packed():
    """Published size, KCVT int4 group 64, budget 2048: the cache holds whole-group rows of the stored
    slots (not of [stored; current]) and a float K window of 63 tokens a layer, all in cache_bytes."""
    from xsvggt_jax.config import ModelConfig
    cfg = ModelConfig.published()
    kw = dict(prune="xstream", budget=2048, quant="kcvt", bits=4, group=64)
    once = jax.eval_shape(lambda: init_cache(cfg, CacheConfig(**kw, quant_once=True), 1, (392, 518)))
    keep = max(2048, 2 * cfg.tokens_per_frame(392, 518))
    layer = once.global_kv[0]
    assert layer.k_win.shape == (1, 16, 63, 64) and layer.v_win is None
    assert layer.k.scale.shape == (1, 16, -(-keep // 64), 64) and layer.k.codes.shape == (1, 16, keep, 32)
    per_layer = (2 * 16 * keep * 32 + 16 * (-(-keep // 64)) * 64 * 5 + 16 * keep * 5 + keep * 4
                 + 16 * 63 * 64 * jnp.dtype(cfg.trunk_jnp_dtype).itemsize)
    assert tree_bytes(once.global_kv) == 24 * per_layer
    print(f"quant-once int4 global cache {tree_bytes(once.global_kv)} B")


# --------------------------------------------------------------------------------- the setting
def test_setting_parses_serialises_and_refuses(capsys):
    cc = CacheConfig.from_text("xstream-int4:64,quant_once=true")
    assert cc.quant_once and cc.quant == "kcvt" and cc.budget == 64
    assert not CacheConfig.from_text("xstream-int4:64").quant_once
    saved = json.loads(_built_for_json(cc, (28, 28), None))["cache_cfg"]
    assert CacheConfig(**saved) == cc and dataclasses.asdict(cc)["quant_once"] is True
    with pytest.raises(ConfigError, match="quant_once must be true or false"):
        CacheConfig.from_text("xstream-int4,quant_once=maybe")
    with pytest.raises(ConfigError, match="quantized cache"):
        CacheConfig(prune="xstream", quant_once=True)
    with pytest.raises(ConfigError, match="prune='frame'"):
        CacheConfig(prune="frame", quant="kcvt", quant_once=True)
    CacheConfig(prune="frame", quant="ktvt", quant_once=True)  # per token: any token may go
    with pytest.raises(ConfigError, match="budget 8 cannot hold one group"):
        CacheConfig(prune="sliding", budget=8, quant="kcvt", group=16, quant_once=True)
    with pytest.raises(ConfigError, match="camera_budget 8 cannot hold one group"):
        CacheConfig(prune="sliding", quant="ktvt", camera_quant="kcvt", camera_budget=8, group=16, quant_once=True)
    err = run_error(["reconstruct", "nothing.npz", "--out", "o", "--params", "p", "--quant-once"], capsys)
    assert "quant_once applies to a quantized cache" in err
