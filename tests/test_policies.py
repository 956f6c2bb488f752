"""The peers' cache policies (diversity, cumulative, frame), budget-aware protection and the camera
cache's own budget/quantization: hand-made q/k tensors with selections worked out by hand, the
invariants every policy keeps (one trace, fixed shapes, protected tokens, budget, vmap), and one short
micro-model stream per policy through `make_step`."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsvggt_jax.stream.step as step_mod
from conftest import micro_frames
from xsvggt_jax.cache.core import CacheConfig, LayerKV, cache_bytes, init_cache, tree_bytes, update_layer
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.cache.prune import (PolicyError, PruneContext, attention_mass, cumulative, diversity, frame,
                              protected_top, xstream, xstream_scores)


def _ctx(keys, queries, length, n_new, keep, *, pool=1, num_special=0, protect="full", share=0.5, mass=None):
    """keys [T, D] / queries [N, D] for one batch row and one head."""
    return PruneContext(k=jnp.asarray(keys, jnp.float32)[None, None], q_new=jnp.asarray(queries, jnp.float32)[None, None],
                        length=jnp.int32(length), n_new=n_new, keep=keep, pool=pool, num_special=num_special,
                        key=jax.random.PRNGKey(0), mass=None if mass is None else jnp.asarray(mass, jnp.float32)[None],
                        protect=protect, protect_share=share)


# ------------------------------------------------------------------------- hand-computed selections
def test_diversity_drops_the_older_copy_of_a_duplicated_key():
    # 2 tokens a frame, 7 valid tokens, keep 6: first (0, 1) and current (5, 6) frames, two of the
    # middle tokens 2..4. Token 3 points the same way as token 2 (cosine 1, other length): the older
    # copy (2) is redundant; 3 and 4 are orthogonal to every newer key (redundancy 0).
    keys = [[0, 1], [0, 1], [1, 0], [5, 0], [0, 1], [-1, 0], [-1, 0], [1, 0]]
    idx = diversity(_ctx(keys, [[1, 0], [1, 0]], length=7, n_new=2, keep=6))
    assert np.asarray(idx).tolist() == [[0, 1, 3, 4, 5, 6]]


def test_frame_keeps_the_whole_frame_with_the_best_mean_score():
    # 2 tokens a frame, 5 frames, keep 3 frames: first, current, and the best of frames 1..3 by mean
    # q.k (query (1, 0): a token's score is its x). Frame 2 (10, -2: mean 4) beats frame 3 (3, 3) and
    # frame 1 (1, 1) although its token 5 scores lowest of all middle tokens.
    xs = [-9, -9, 1, 1, 10, -2, 3, 3, -9, -9]
    idx = frame(_ctx([[x, 0] for x in xs], [[1, 0], [1, 0]], length=10, n_new=2, keep=6))
    assert np.asarray(idx).tolist() == [[0, 1, 4, 5, 8, 9]]


@pytest.mark.parametrize("decay,survivor", [(0.9, 1), (0.3, 2)])
def test_cumulative_keeps_the_largest_decayed_attention_mass(decay, survivor):
    # One token a step (n = 1), keep 3 of 4 slots. Keys are orthonormal e0..e3; each query is 100 x
    # one key, so its softmax (logit 50 vs 0) sends all its mass (1) to that key. Step 1 attends A, steps
    # 2 and 3 attend B, step 4 attends C. Masses before pruning at step 4: A d^3, B d^2 + d, C 1, D 0;
    # A and D are protected, so B survives iff d^2 + d > 1.
    cc = CacheConfig(prune="cumulative", budget=3, mass_decay=decay)
    eye = np.eye(4, dtype=np.float32)
    kv = LayerKV(jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 4)))
    length = jnp.int32(0)
    for step, target in enumerate([0, 1, 1, 2]):
        k = jnp.asarray(eye[step])[None, None, None]
        q = 100 * jnp.asarray(eye[target])[None, None, None]
        *_, kv, length = update_layer(kv, length, q, k, k, cache_cfg=cc, num_special=0, key=jax.random.PRNGKey(0))
    d = decay
    masses = {0: d ** 3, 1: d ** 2 + d, 2: 1.0, 3: 0.0}
    kept = [0, survivor, 3]
    assert int(length) == 3
    np.testing.assert_array_equal(np.asarray(kv.k)[0, 0, :3], eye[kept])           # the keys that survived
    np.testing.assert_allclose(np.asarray(kv.mass)[0, :3], [masses[i] for i in kept], atol=1e-6)


def test_attention_mass_is_the_weighted_pooled_query_softmax():
    rng = np.random.default_rng(0)
    b, h, n, t, d, pool, special, length = 2, 3, 8, 12, 4, 3, 1, 10
    q, k = rng.standard_normal((b, h, n, d)).astype(np.float32), rng.standard_normal((b, h, t, d)).astype(np.float32)
    got = np.asarray(attention_mass(jnp.asarray(q), jnp.asarray(k), jnp.int32(length), pool, special))
    # numpy: rows = special query, mean of queries 1-3, 4-6, 7 (weights 1, 3, 3, 1)
    rows = [q[:, :, 0], q[:, :, 1:4].mean(2), q[:, :, 4:7].mean(2), q[:, :, 7]]
    want = np.zeros((b, t))
    for row, w in zip(rows, [1, 3, 3, 1]):
        logits = np.einsum("bhd,bhtd->bht", row.astype(np.float64), k[:, :, :length]) / np.sqrt(d)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        want[:, :length] += w * (p / p.sum(-1, keepdims=True)).mean(1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), n, rtol=1e-5)      # a call hands out one unit per query


def test_budget_protection_keeps_special_tokens_a_share_of_each_frame_and_the_best_history():
    # 5 tokens a frame (1 special), keep 8 < 2 x 5: the two frames do not fit. Share 0.5: each frame
    # keeps q = floor(0.5 x 8 / 2) = 2 tokens: its special token and its best other token.
    # First pruning call: frames [0, 5) and [5, 10). Protected: 0, 2 (9), 5, 9 (8). The 4 free slots take
    # the current frame's other tokens 6, 7, 8, then the best first-frame filler, 1 (3). The first
    # frame's protected tokens lead (they are the first frame at [0, 2) on later calls).
    xs = [-5, 3, 9, 1, 2,   -5, 4, 0, 7, 8]
    ctx = _ctx([[x, 0] for x in xs], [[1, 0]] * 5, length=10, n_new=5, keep=8, num_special=1, protect="budget")
    assert np.asarray(xstream(ctx)).tolist() == [[0, 2, 1, 5, 6, 7, 8, 9]]
    # A later call: the first frame's 2 tokens at [0, 2), history [2, 8), the current frame [8, 13).
    # Protected: 0, 1 (whatever their score), 8, 10 (6). Free slots: history 3 (9), 5 (8), current 12, 11.
    xs = [-5, -5,   0.1, 9, 0.2, 8, 0.3, 0.4,   -5, 0.5, 6, 0.6, 0.7]
    ctx = dataclasses.replace(ctx, k=jnp.asarray([[x, 0] for x in xs], jnp.float32)[None, None], length=jnp.int32(13))
    assert np.asarray(xstream(ctx)).tolist() == [[0, 1, 3, 5, 8, 10, 11, 12]]
    # XStreamVGGT's rule keeps both frames whole: 10 tokens, over the budget of 8
    assert CacheConfig(budget=8).keep(5) == 10 and CacheConfig(budget=8, protect="budget").keep(5) == 8


def test_budget_protection_keeps_the_same_first_frame_tokens_along_a_stream():
    """Through `update_layer`: 5-token frames (1 special), keep 8, six frames with random scores. Every
    prune keeps the same q = 2 first-frame tokens at the front (its special token and its best other
    one; other first-frame tokens that filled the budget at the first prune live on as history, by
    score) and the current frame's special token; the layer holds 8 tokens."""
    cc = CacheConfig(prune="xstream", budget=8, pool=1, protect="budget")
    rng = np.random.default_rng(5)
    kv = LayerKV(jnp.zeros((1, 1, 13, 3)), jnp.zeros((1, 1, 13, 3)))
    length = jnp.int32(0)
    for f in range(6):
        # key = (score, frame, token): the query (1, 0, 0) scores a token by its first entry
        k = np.stack([rng.standard_normal(5), np.full(5, f), np.arange(5)], -1).astype(np.float32)
        q = np.tile([1.0, 0, 0], (5, 1)).astype(np.float32)
        *_, kv, length = update_layer(kv, length, jnp.asarray(q)[None, None], jnp.asarray(k)[None, None],
                                      jnp.asarray(k)[None, None], cache_cfg=cc, num_special=1, key=jax.random.PRNGKey(0))
        if f == 0:
            best0 = 1 + int(np.argmax(k[1:, 0]))             # the first frame's best non-special token
            continue
        held = np.asarray(kv.k)[0, 0, :int(length)]
        assert int(length) == 8
        assert held[:2, 1:].tolist() == [[0, 0], [0, best0]]             # leading the buffer
        assert (f, 0) in {(int(fr), int(t)) for fr, t in held[:, 1:]}   # the current frame's special token


def test_full_protection_ranking_equals_xstream():
    """`protected_top` under protect="full" is XStreamVGGT's selection (random scores, no ties)."""
    rng = np.random.default_rng(3)
    k, q = rng.standard_normal((2, 2, 20, 4)), rng.standard_normal((2, 2, 3, 4))
    ctx = PruneContext(k=jnp.asarray(k, jnp.float32), q_new=jnp.asarray(q, jnp.float32), length=jnp.int32(17),
                       n_new=3, keep=10, pool=2, num_special=1, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(protected_top(ctx, xstream_scores(ctx)), xstream(ctx))


# ------------------------------------------------------------------------ invariants of every policy
N, SPECIAL, T, B = 3, 1, 18, 2
CASES = {  # name -> (policy, protect, keep)
    "diversity": (diversity, "full", 9), "cumulative": (cumulative, "full", 9), "frame": (frame, "full", 9),
    "xstream-budget": (xstream, "budget", 5), "diversity-budget": (diversity, "budget", 5),
    "cumulative-budget": (cumulative, "budget", 5),
}


def _random_ctx(seed: int, length, protect: str, keep: int) -> PruneContext:
    rng = np.random.default_rng(seed)
    return PruneContext(k=jnp.asarray(rng.standard_normal((B, 2, T, 4)), jnp.float32),
                        q_new=jnp.asarray(rng.standard_normal((B, 2, N, 4)), jnp.float32),
                        length=length, n_new=N, keep=keep, pool=2, num_special=SPECIAL, key=jax.random.PRNGKey(0),
                        mass=jnp.asarray(rng.uniform(size=(B, T)), jnp.float32), protect=protect)


@pytest.mark.parametrize("name", list(CASES))
def test_policy_invariants(name):
    policy, protect, keep = CASES[name]
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def select(k, q, mass, length):
        ctx = dataclasses.replace(_random_ctx(0, length, protect, keep), k=k, q_new=q, mass=mass)
        return policy(ctx)

    lengths = [6, 12, 18] if protect == "budget" else [12, 15, 18]   # whole frames over the budget; 6: a first prune
    for seed, length in enumerate(lengths):
        ctx = _random_ctx(seed, jnp.int32(length), protect, keep)
        idx = np.asarray(select(ctx.k, ctx.q_new, ctx.mass, ctx.length))   # a second trace would raise
        assert idx.shape == (B, keep) and idx.dtype == np.int32             # fixed shape, never over budget
        for row in idx:                                                     # unique, in time order ...
            assert len(set(row.tolist())) == keep
            later = row[(row >= N).argmax():]                               # ... but under "budget" the
            assert (row[:len(row) - len(later)] < N).all() and (np.diff(later) > 0).all()  # first frame leads
            if protect == "full":
                assert (np.diff(row) > 0).all()
        assert idx.min() >= 0 and idx.max() < length                       # valid slots only
        cur = length - N
        must = (range(SPECIAL) if protect == "budget" else range(N),
                range(cur, cur + (SPECIAL if protect == "budget" else N)))
        for row in idx:
            assert set(must[0]) | set(must[1]) <= set(row.tolist()), (row, must)
    # vmap over streams: two streams stacked equal the streams one by one
    one, other = _random_ctx(20, jnp.int32(15), protect, keep), _random_ctx(21, jnp.int32(12), protect, keep)
    fields = lambda c: (c.k, c.q_new, c.mass, c.length)
    stacked = [jnp.stack(pair) for pair in zip(fields(one), fields(other))]
    per_stream = lambda k, q, m, l: policy(dataclasses.replace(one, k=k, q_new=q, mass=m, length=l))
    both = jax.jit(jax.vmap(per_stream))(*stacked)
    np.testing.assert_array_equal(both[0], policy(one))
    np.testing.assert_array_equal(both[1], policy(other))


# ----------------------------------------------------------------------------------- configuration
def test_config_rules_and_defaults():
    default = CacheConfig()
    assert default.camera() is default                                      # camera follows the globals
    assert not default.carries_mass and default.keep(1041) == 2082           # upstream's rule unchanged
    assert CacheConfig(prune="frame", budget=2048).keep(1041) == 2082         # 2 whole frames at least
    assert CacheConfig(prune="frame", budget=20).keep(3) == 18                # floor(20 / 3) frames
    assert CacheConfig(prune="diversity", budget=20, protect="budget").keep(15) == 20
    cam = CacheConfig(budget=2048, quant="kcvt", camera_budget=64, camera_quant="ktvt", camera_bits=2).camera()
    assert (cam.budget, cam.quant, cam.bits, cam.quant_head_dim, cam.camera_budget) == (64, "ktvt", 2, None, None)
    assert CacheConfig(quant="kcvt", camera_quant="none").camera().quant == "none"
    for bad in (dict(protect="half"), dict(prune="frame", protect="budget"), dict(protect_share=0.0),
                dict(mass_decay=1.5), dict(camera_budget=0), dict(camera_quant="int4"), dict(camera_bits=5)):
        with pytest.raises(ValueError):
            CacheConfig(**bad)


def test_policies_refuse_what_they_cannot_protect():
    keys, queries = np.zeros((12, 2)), np.zeros((4, 2))
    with pytest.raises(PolicyError, match="special tokens"):    # 2 x 2 special tokens > keep 3
        xstream(_ctx(keys, queries, length=12, n_new=4, keep=3, num_special=2, protect="budget"))
    with pytest.raises(PolicyError, match="mass"):
        cumulative(_ctx(keys, queries, length=12, n_new=4, keep=8))


def test_camera_cache_bytes_as_configured():
    """Published model, 518x392 frames: the camera trunk (4 layers, 16 heads of 128 dims, one token a
    call) under its own budget and KCVT int4 (group 64); the global cache is untouched by it."""
    cfg = ModelConfig.published()
    base = CacheConfig(prune="xstream", budget=2048, quant="kcvt", bits=4, group=64)
    shapes = lambda cc: jax.eval_shape(lambda: init_cache(cfg, cc, 1, (392, 518)))
    default, cam = shapes(base), shapes(dataclasses.replace(base, camera_budget=256, camera_quant="kcvt"))
    layers, heads, hd = 4, 16, 128
    fp32 = layers * 2 * heads * (2048 + 1) * hd * 4          # today: float32, budget + current token
    assert tree_bytes(default.camera_kv) == fp32
    keep, rows = 256, -(-(256 + 1) // 64)                    # staged [keep; current] in groups of 64 tokens
    per_layer = (2 * heads * keep * hd // 2                  # K and V codes, two per byte
                 + heads * rows * hd * (4 + 1)               # K: fp32 scale + uint8 zero per (group, channel)
                 + heads * keep * (hd // 64) * (4 + 1)       # V: fp32 scale + uint8 zero per (token, 64 dims)
                 + keep * 4)                                 # K: int32 group index per kept token
    assert tree_bytes(cam.camera_kv) == layers * per_layer
    assert tree_bytes(cam.global_kv) == tree_bytes(default.global_kv)
    assert fp32 / (layers * per_layer) > 40


# ------------------------------------------------------------------------ through the streaming step
@pytest.mark.parametrize("cc", [
    CacheConfig("diversity", 20, 2),
    CacheConfig("cumulative", 20, 2, quant="kcvt", quant_head_dim=None, camera_budget=3, camera_quant="ktvt",
                camera_bits=2),
    CacheConfig("frame", 20, 2),
    CacheConfig("xstream", 12, 2, protect="budget"),
], ids=["diversity", "cumulative-int4-camera-int2", "frame", "xstream-budget"])
def test_policy_streams_through_make_step(monkeypatch, micro, cc):
    cfg, params = micro
    chex.clear_trace_counter()
    monkeypatch.setattr(step_mod, "step", chex.assert_max_traces(step_mod.step, n=1))
    fn = step_mod.make_step(cfg, cc, heads=False)              # aggregator + camera head
    cache = init_cache(cfg, cc, 1, (28, 28))
    start = cache_bytes(cache)
    for frame_ in micro_frames(4):                             # 4 x 9 tokens > every budget here
        cache, out = fn(params, cache, jnp.asarray(frame_))
        assert cache_bytes(cache) == start
        assert np.isfinite(np.asarray(out["camera_pose"])).all()
    assert int(cache.global_len) == cc.keep(cfg.tokens_per_frame(28, 28))
    assert int(cache.camera_len) == min(4 * cfg.camera.iterations, cc.camera().keep(1))
    if cc.carries_mass:
        assert all(kv.mass.shape == (1, kv.k.slots) for kv in cache.global_kv + cache.camera_kv)
