"""The newest cache policies: `ffn` (OVGGT's FFN-residual score), `keyframes` (eStreamVGGT's K whole
frames, camera trunk pruned with them) and `merge` (StreamCacheVGGT-style merge-instead-of-evict).
Hand-made layers whose selections are worked out by hand, stream invariants through `update_layer`
(one trace, fixed shapes, never over budget), the settings grammar, and one `xsvggt reconstruct` run
per policy on the micro model."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsvggt_jax.stream.pipeline as pipeline_mod
import xsvggt_jax.stream.step as step_mod
from conftest import micro_frames
from xsvggt_jax.app.cli import main
from xsvggt_jax.cache.core import CacheConfig, LayerCache, LayerKV, LayerPlan, _empty_layers, update_layer
from xsvggt_jax.cache.frames import frame_descriptor, keyframes
from xsvggt_jax.cache.merge import merge
from xsvggt_jax.cache.prune import PolicyError, PruneContext
from xsvggt_jax.nn.layers import Block
from xsvggt_jax.weights.params import save_params

KEY = jax.random.PRNGKey(0)


def _layer(t: int, d: int, *, mass: bool = False, frames: int = 0, c: int = 0, h: int = 1) -> LayerKV:
    z = jnp.zeros((1, h, t, d), jnp.float32)
    return LayerKV(z, z, jnp.zeros((1, t), jnp.float32) if mass else None,
                   jnp.zeros((1, frames, c), jnp.float32) if frames else None)


# ------------------------------------------------------------------------------------------------ ffn
def test_ffn_keeps_the_history_tokens_with_the_largest_residual_norm():
    """2 tokens a frame, keep 6 (first + current frame + 2 history tokens). Each token's score is the
    norm its block hands over after the FFN (`record_residual`), written where the token sits; the
    queries are zero, so an attention-style score would tie everywhere."""
    cc = CacheConfig("ffn", budget=6)
    norms = [[1, 1], [5, 0.5], [0.1, 3], [4, 0.2], [2, 2]]
    lc = LayerCache(_layer(8, 2, mass=True), jnp.int32(0), KEY, cc, 0)
    step = jax.jit(chex.assert_max_traces(
        lambda lc, k, h: lc.update(jnp.zeros_like(k), k, k)[3].record_residual(h), n=1))
    chex.clear_trace_counter()
    for f, pair in enumerate(norms):
        k = jnp.asarray([[f, 0], [f, 1]], jnp.float32)[None, None]          # key = (frame, token)
        h = jnp.asarray([[x, 0, 0] for x in pair], jnp.float32)[None]      # a residual of norm x
        lc = step(lc, k, h)
    held = [tuple(int(x) for x in key) for key in np.asarray(lc.kv.k)[0, 0, :int(lc.length)]]
    # frame 3: history f1t0 (5) and f2t1 (3) beat f1t1, f2t0; frame 4: f1t0 (5), f3t0 (4) beat f2t1, f3t1
    assert held == [(0, 0), (0, 1), (1, 0), (3, 0), (4, 0), (4, 1)]
    np.testing.assert_allclose(np.asarray(lc.kv.mass)[0, :6], [1, 1, 5, 4, 2, 2])  # each token's own norm


def test_block_hands_its_ffn_residual_norm_to_the_cache():
    """A Block with an ffn cache records ||ls2(mlp(norm2(x)))|| of the current tokens where they sit;
    with ls1 = 0 the residual is the block's output minus its input. Other policies' caches do not
    ask for it (the block's program is unchanged for them)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 8))
    block = Block(num_heads=2)
    params = jax.jit(block.init)(KEY, x)["params"]
    params = {**params, "ls1": {"gamma": jnp.zeros(8)}}
    lc = LayerCache(_layer(9, 4, mass=True, h=2), jnp.int32(2), KEY, CacheConfig("ffn", budget=6), 0)
    y, lc = jax.jit(lambda lc: block.apply({"params": params}, x, cache=lc))(lc)
    mass = np.asarray(lc.kv.mass)[0]
    np.testing.assert_allclose(mass[2:5], np.linalg.norm(np.asarray(y - x)[0], axis=-1), rtol=1e-5)
    assert not mass[:2].any() and not mass[5:].any()
    assert not any(LayerCache(_layer(9, 4), jnp.int32(0), KEY, CacheConfig(p), 0).records_residual
                   for p in ("xstream", "cumulative", "merge", "keyframes"))


# ------------------------------------------------------------------------------------------ keyframes
def test_keyframes_keeps_anchor_recent_and_the_least_redundant_history_frame():
    # 5 frames of 2 tokens, keep 4 frames: anchor 0, recent R = 2 (frames 3, 4); of the history frames
    # 1 and 2 one goes: frame 1 looks like recent frame 3 (cosine 1), frame 2 like none (cosine 0).
    e = np.eye(4, dtype=np.float32)
    feat = jnp.asarray([e[0], e[1], e[2], e[1], e[3]])[None]
    ctx = PruneContext(k=jnp.zeros((1, 1, 10, 2)), q_new=jnp.zeros((1, 1, 2, 2)), length=jnp.int32(10), n_new=2,
                       keep=8, pool=1, num_special=0, key=KEY, frame_feat=feat, frame_tokens=2)
    assert np.asarray(keyframes(ctx)).tolist() == [[0, 1, 4, 5, 6, 7, 8, 9]]
    feat = feat.at[0, 2].set(e[3])                                   # now frame 2 repeats frame 4: it goes
    assert np.asarray(keyframes(dataclasses.replace(ctx, frame_feat=feat))).tolist() == [[0, 1, 2, 3, 6, 7, 8, 9]]


@pytest.mark.parametrize("quant", ["none", "kcvt"])
def test_keyframes_global_and_camera_layers_keep_the_same_whole_frames(quant):
    """Budget 9: K = 3 frames of 3 tokens in the aggregator layer (one call a frame) and of 4 tokens
    in the camera-trunk layer (4 calls of 1 token a frame), both fed the same frame features: after
    every frame both hold the frames eStreamVGGT's rule picks (numpy: anchor, R = 1 recent, and of
    the history the frame least similar to the recent one), whole, with their features, never more
    than K of them; one trace each over the stream."""
    cc = CacheConfig("keyframes", budget=9, quant=quant, bits=8, group=4, quant_head_dim=None)
    p, it, k_frames, c = 3, 4, 3, 5
    layers = {}
    for name, ft, n in (("global", p, p), ("camera", it, 1)):
        plan = LayerPlan(1, 1, 2, n, (k_frames + 1) * ft - (n if quant != "none" else 0), quant != "none", True,
                         k_frames + 1, c)
        layers[name] = [_empty_layers(plan, cc, 1, jnp.float32)[0], jnp.int32(0), n]
    call = jax.jit(chex.assert_max_traces(lambda kv, length, k, feature: update_layer(
        kv, length, jnp.zeros_like(k), k, k, cache_cfg=cc, num_special=0, key=KEY, frame_feature=feature)[3:], n=2))
    chex.clear_trace_counter()                                        # one trace per layer shape
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((8, c)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ref = []
    for f in range(8):
        feature = jnp.asarray(feats[f])[None]
        ref.append(f)
        if len(ref) > k_frames:   # drop the history frame most similar to the recent one (the newest)
            ref.pop(1 + int(np.argmax([feats[h] @ feats[f] for h in ref[1:-1]])))
        for name, state in layers.items():
            kv, length, n = state
            for call_i in range(p // n if name == "global" else it):  # the camera: one token an iteration
                # key (+-(f + 1), j): every group of the codes spans 0 (upstream's zero point is in
                # [0, 2**bits - 1], so a group of one sign would not decode to itself)
                k = jnp.asarray([[(f + 1) * (-1) ** (call_i + j), j] for j in range(n)], jnp.float32)[None, None]
                kv, length = call(kv, length, k, feature)
            state[:2] = kv, length
        held = {}
        for name, (kv, length, _) in layers.items():
            ft = p if name == "global" else it
            keys = np.asarray(kv.k if quant == "none" else kv.k.decode())[0, 0, :int(length)]
            frames = np.round(np.abs(keys[:, 0])).astype(int).reshape(-1, ft) - 1
            assert (frames == frames[:, :1]).all(), (name, frames)    # whole frames, in order
            held[name] = frames[:, 0].tolist()
            assert int(length) == ft * min(f + 1, k_frames)           # never over K frames
            feat = np.asarray(kv.feat)[0]
            np.testing.assert_allclose(feat[:len(ref)], feats[held[name]], rtol=1e-6)  # features follow
            assert not feat[len(ref):].any()
        assert held["global"] == held["camera"] == ref, (held, ref)  # anchor, recent, diverse history


def test_frame_descriptor_is_the_unit_mean_patch_token_of_the_newest_frame():
    tokens = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, 4)), jnp.float32)
    want = np.asarray(tokens)[:, -1].mean(1)
    np.testing.assert_allclose(frame_descriptor(tokens), want / np.linalg.norm(want, axis=-1, keepdims=True),
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("quant", ["none", "kcvt"])
def test_merge_folds_the_best_evicted_token_into_its_nearest_kept_key_by_counts(quant):
    """2 tokens a frame, keep 6: the fourth frame fills slots 6, 7 and the layer keeps the first frame
    (0, 1), the current one (6, 7) and the best middle tokens 2, 3 by q.k (query e0: the key's x). Of
    the evicted 4 and 5, floor(0.5 x 2) = 1 merges: 4 (score 3), into its nearest kept key outside the
    first frame: 3 (cosine .997), not the anchor token 0 (same direction) nor 2 (.93). The slots'
    counts c weight the mean; 5 is dropped. Quantized (KCVT int8): the merged means are quantized
    (to within the codes' step), not the tokens before the merge."""
    keys = np.array([[3, 0, 1], [-9, 0, 0], [5, 1, 0], [4, 0, 1], [3, 0, 1], [1, 1, 0], [-9, 1, 0], [-9, 0, 1]],
                    np.float32)
    vals = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    count = np.array([1, 1, 2, 3, 2, 1], np.float32)
    cc = CacheConfig("merge", budget=6, quant=quant, bits=8, group=8, quant_head_dim=None)
    plan = LayerPlan(1, 1, 3, 2, 6 if quant != "none" else 8, quant != "none", True)
    kv, length = _empty_layers(plan, cc, 1, jnp.float32)[0], jnp.int32(0)
    q = jnp.asarray([[1, 0, 0], [1, 0, 0]], jnp.float32)[None, None]
    call = jax.jit(lambda kv, length, k, v: update_layer(kv, length, q, k, v, cache_cfg=cc, num_special=0, key=KEY))
    for f in range(4):
        if f == 3:                                         # the slots' counts before this call
            kv = kv.replace(mass=kv.mass.at[0, :6].set(count))
        k_att, v_att, _, kv, length = call(kv, length, jnp.asarray(keys[2 * f:2 * f + 2])[None, None],
                                           jnp.asarray(vals[2 * f:2 * f + 2])[None, None])
    past_k, past_v = np.asarray(k_att)[0, 0], np.asarray(v_att)[0, 0]   # as attended: dequantized past
    kept = [0, 1, 2, 3, 6, 7]
    want_k, want_v = past_k[kept], past_v[kept]
    want_k[3] = (3 * past_k[3] + 2 * past_k[4]) / 5
    want_v[3] = (3 * past_v[3] + 2 * past_v[4]) / 5
    got_k = np.asarray(kv.k if quant == "none" else kv.k.decode())[0, 0, :6]
    got_v = np.asarray(kv.v if quant == "none" else kv.v.decode())[0, 0, :6]
    assert int(length) == 6
    np.testing.assert_array_equal(np.asarray(kv.mass)[0, :6], [1, 1, 2, 5, 1, 1])
    tol = dict(rtol=1e-6) if quant == "none" else dict(atol=0.04)     # 8-bit step over a range of 14: .055
    np.testing.assert_allclose(got_k, want_k, **tol)
    np.testing.assert_allclose(got_v, want_v, **tol)
    if quant == "none":                                    # kept, received nothing: bit-exact
        np.testing.assert_array_equal(got_k[[0, 1, 2, 4, 5]], keys[[0, 1, 2, 6, 7]])


@pytest.mark.parametrize("quant", ["none", "kcvt"])
def test_merge_stream_slots_are_the_means_of_the_tokens_merged_into_them(quant):
    """3 tokens a frame, budget 7 (keep 7), 6 frames, one trace. Each token's value is a one-hot of its
    id, so a slot's value times its count lists the original tokens it stands for: the slot's key must
    be their mean, its count their number, and the layer holds exactly `keep` slots once pruning.
    Quantized (KCVT int8): the counts and the budget hold, the keys are the means within the codes'
    error."""
    n, keep, frames, d = 3, 7, 6, 4
    ids = n * frames
    cc = CacheConfig("merge", budget=keep, merge_share=0.67, quant=quant, bits=8, group=4, quant_head_dim=None)
    plan = LayerPlan(1, 1, d, n, keep + (0 if quant != "none" else n), quant != "none", True)
    kv, length = _empty_layers(plan, cc, 1, jnp.float32)[0], jnp.int32(0)
    # the values' width is the keys' in a layer: one-hot ids live in their own layer
    vplan = LayerPlan(1, 1, ids, n, keep + n, False, True)
    vkv = _empty_layers(vplan, CacheConfig("merge", budget=keep, merge_share=0.67), 1, jnp.float32)[0]
    call = jax.jit(chex.assert_max_traces(lambda kv, length, q, k, v, c: update_layer(
        kv, length, q, k, v, cache_cfg=c, num_special=0, key=KEY)[3:], n=2), static_argnums=5)
    chex.clear_trace_counter()
    rng = np.random.default_rng(2)
    all_k = rng.standard_normal((ids, d)).astype(np.float32)
    for f in range(frames):
        new = slice(f * n, (f + 1) * n)
        q = jnp.asarray(rng.standard_normal((1, 1, n, d)), jnp.float32)
        k = jnp.asarray(all_k[new])[None, None]
        onehot = jnp.asarray(np.eye(ids, dtype=np.float32)[new])[None, None]
        if quant == "none":   # one layer: keys and the one-hot ids as values
            kv2, length2 = call(vkv, length, jnp.pad(q, ((0, 0),) * 3 + ((0, ids - d),)),
                                jnp.pad(k, ((0, 0),) * 3 + ((0, ids - d),)), onehot, cc)
            vkv = kv2
        kv, length = call(kv, length, q, k, k, cc)
        assert int(length) == min((f + 1) * n, keep)
    counts = np.asarray(kv.mass)[0, :keep]
    assert counts.min() >= 1 and counts.sum() <= ids and counts.sum() > keep     # some tokens merged
    keys = np.asarray(kv.k if quant == "none" else kv.k.decode())[0, 0, :keep]
    if quant == "none":
        members = np.asarray(vkv.v)[0, 0, :keep] * counts[:, None]                 # [slot, token id]
        np.testing.assert_allclose(members, np.round(members), atol=1e-4)
        np.testing.assert_array_equal(np.round(members).sum(1), counts)
        np.testing.assert_allclose(np.asarray(vkv.k)[0, 0, :keep, :d], np.round(members) @ all_k / counts[:, None],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(vkv.k)[0, 0, :keep, :d], keys)    # same selections, same keys
    else:
        assert np.isfinite(keys).all()


# --------------------------------------------------------------------------------- settings and errors
def test_settings_grammar_and_refusals():
    assert CacheConfig.from_text("ffn:64").prune == "ffn"
    kf = CacheConfig.from_text("keyframes-int4:36")
    assert (kf.prune, kf.quant, kf.bits, kf.keep(9)) == ("keyframes", "kcvt", 4, 36)
    assert CacheConfig.from_text("merge-kcvt8:64,merge_share=0.25").merge_share == 0.25
    assert CacheConfig("ffn", budget=8).keep(9) == 18 and CacheConfig("merge", budget=8).keep(9) == 18
    assert CacheConfig("keyframes", budget=8).keep(9) == 18                    # two frames at least
    assert all(CacheConfig(p).carries_mass for p in ("cumulative", "ffn", "merge"))
    for bad in (dict(prune="keyframes", camera_budget=8), dict(prune="keyframes", protect="budget"),
                dict(prune="ffn", protect="budget"), dict(prune="merge", merge_share=1.5)):
        with pytest.raises(ValueError):
            CacheConfig(**bad)
    ctx = PruneContext(k=jnp.zeros((1, 1, 6, 2)), q_new=jnp.zeros((1, 1, 2, 2)), length=jnp.int32(6), n_new=2,
                       keep=4, pool=1, num_special=0, key=KEY)
    for policy, what in ((keyframes, "features"), (merge, "values")):
        with pytest.raises(PolicyError, match=what):
            policy(ctx)


# ------------------------------------------------------------------------------- through the command
@pytest.fixture(scope="module")
def micro_inputs(micro, tmp_path_factory):
    cfg, params = micro
    root = tmp_path_factory.mktemp("micro-cli")
    np.savez(root / "in.npz", images=micro_frames(3)[:, 0].transpose(0, 3, 1, 2))
    return cfg, save_params(params, root / "params", cfg), root / "in.npz"


@pytest.mark.parametrize("prune", ["ffn", "keyframes", "merge"])
def test_reconstruct_streams_with_the_policy(prune, micro_inputs, tmp_path, monkeypatch):
    """`xsvggt reconstruct --prune NAME` on the micro model (9 tokens a frame, budget 18: the third
    frame prunes): one trace of the step, a cache of fixed shapes and bytes, finite outputs. keyframes:
    every global and camera-trunk layer holds the features of the same 2 frames; merge: the counts
    say tokens were merged; ffn: every held token has its residual norm."""
    cfg, params, frames = micro_inputs
    caches = []
    monkeypatch.setattr(step_mod, "step", chex.assert_max_traces(step_mod.step, n=1))
    monkeypatch.setattr(pipeline_mod, "filled_bytes", lambda c, f=pipeline_mod.filled_bytes: caches.append(c) or f(c))
    chex.clear_trace_counter()
    out = tmp_path / "out"
    assert main(["reconstruct", str(frames), "--params", str(params), "--out", str(out), "--prune", prune,
                 "--cache-size", "18", "--quiet"]) == 0
    preds = np.load(out / "predictions.npz")
    assert all(np.isfinite(preds[k]).all() for k in ("depth", "camera_pose", "pts3d_in_other_view"))
    avals = lambda c: [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(c)]
    assert len(caches) == 3 and all(avals(c) == avals(caches[0]) for c in caches)
    last = caches[-1]
    layers = last.global_kv + last.camera_kv
    if prune == "keyframes":
        assert (int(last.global_len), int(last.camera_len)) == (18, 2 * cfg.camera.iterations)
        assert all(np.array_equal(np.asarray(kv.feat), np.asarray(layers[0].feat)) for kv in layers)
        assert np.asarray(layers[0].feat)[0, :2].any(axis=-1).all()
    elif prune == "merge":
        assert int(last.global_len) == 18 and np.asarray(last.global_kv[0].mass)[0, :18].sum() > 18
    else:
        assert all((np.asarray(kv.mass)[0, :int(last.global_len)] > 0).all() for kv in last.global_kv)
