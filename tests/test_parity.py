"""Numerical parity with the upstream PyTorch outputs in ../shared/reference/tiny (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from _refs import OFFLINE_TRACK_SCORE_TOL, OUTPUTS, TOL, assert_ktvt_parity
from conftest import nhwc as _nhwc
from conftest import rel_err
from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.nn.dino import interpolate_pos_embed
from xsvggt_jax.nn.model import StreamVGGT
from xsvggt_jax.stream.step import make_step


def stream_outputs(cfg, cache_cfg, params, images, queries, return_aggregated: bool = False) -> dict:
    """Frame-by-frame streaming through the jitted step; outputs stacked [S, ...] (batch dropped).
    return_aggregated: also `aggregated_<i>` [S, P', 2C], the streaming aggregator outputs."""
    s, _, h, w = images.shape
    cache = init_cache(cfg, cache_cfg, 1, (h, w), s, jnp.asarray(queries)[None])
    fn = make_step(cfg, cache_cfg, return_aggregated=return_aggregated)
    outs = []
    for t in range(s):
        cache, out = fn(params, cache, _nhwc(images[t:t + 1]))
        out = jax.tree.map(np.asarray, out)
        for i, a in enumerate(out.pop("aggregated", ())):
            out[f"aggregated_{i}"] = a
        outs.append(out)
    return {k: np.stack([o[k][0] for o in outs]) for k in outs[0]}


@pytest.fixture(scope="module")
def stream_none_run(tiny_cfg, tiny_params, tiny_frames) -> dict:
    """The uncompressed stream, with its aggregator outputs (shared by three tests)."""
    return stream_outputs(tiny_cfg, CacheConfig.uncompressed(), tiny_params, *tiny_frames, return_aggregated=True)


def _errors(out, ref, frames=slice(None)) -> dict:
    return {k: rel_err(out[k][frames], ref[k][frames]) for k in OUTPUTS}


# Quantized runs: a float difference can flip a code by one step (reference README), so they get their
# own bounds, each <= 2x what this port measures (float32 CPU, max over outputs of the relative error);
# per-token KTVT + pruning: KTVT_TOL and KTVT_NEAR_TIE_FRAME in _refs.py.
QUANT_ONLY_KCVT_TOL = 1e-4   # per-channel K, no pruning: measured 5.0e-5 (camera_pose)
FP16_SCALE_TOL = 5e-4        # KTVT with float16 group scales (11 significant bits): measured 3.0e-4 (camera_pose)


# Per-channel groups + pruning (KCVT, KCVC, KTVC) are NOT reproducible to 1e-3 by any implementation whose
# keys differ from upstream's by one ulp, upstream's own code included: rerun here (torch 2.13 CPU, same
# weights and frames) it misses its reference camera_pose by 2.6e-3 / 1.9e-2 / 7.3e-3. The cause is exact
# rounding ties. Each step re-quantizes the whole cache, and once tokens join or leave a per-channel group
# (a new frame, pruning) values that already sit on the old group's grid are rounded onto a new grid whose
# step is a simple ratio of the old one, so x / scale lands EXACTLY on k + 0.5 in float32 for ~100 values
# a step (measured, KCVT: 0 at frames 0-1, 7 at frame 2, 112 at frame 3, 46..252 a step after; a random
# float hits within 1e-6 of .5 0.2 times a step). Which way each tie rounds is decided by the last ulp of
# the old scale, i.e. by matmul summation order. Breaking every tie up, or every tie down, instead of
# to even moves our outputs to 1.3e-2 .. 1.9e-2 from the reference; ours (to even) are at 5.4e-3 / 1.3e-2 /
# 7.5e-3 (the first gap is at frame 4, after frame 3's 112 ties in every global layer's K). So for these
# runs we assert what is reproducible: frame 0-1 outputs, which only read values quantized once (no
# re-quantization, hence no structural ties), to 1e-5 like unquantized parity (the layouts differ from each
# other there by >= 1.1e-2), and the whole stream within the tie envelope. Storage itself is checked
# bit-exact against upstream's quantize-then-prune order in test_cache.py.
TIE_FREE_FRAMES = 2
TIE_ENVELOPE_TOL = 2.5e-2


@pytest.mark.parametrize("run,cache_cfg,tol", [
    ("stream_none", CacheConfig.uncompressed(), TOL),            # measured 1.3e-6
    ("stream_none", CacheConfig(prune="none", chunk=64), TOL),  # the filled-prefix loop over many chunks
    ("stream_xs_c64_p16", CacheConfig(prune="xstream", budget=64, pool=16), TOL),
    ("stream_sliding_c64", CacheConfig(prune="sliding", budget=64), TOL),
    ("stream_quant_KCVT", CacheConfig("none", quant="kcvt"), QUANT_ONLY_KCVT_TOL),
    ("stream_xs_c64_p16_KTVT", CacheConfig("xstream", 64, 16, quant="ktvt", scale_dtype="float16"), FP16_SCALE_TOL),
])
def test_stream_outputs(run, cache_cfg, tol, request, tiny_dir, tiny_cfg, tiny_params, tiny_frames):
    if cache_cfg == CacheConfig.uncompressed():
        out = request.getfixturevalue("stream_none_run")
    else:
        out = stream_outputs(tiny_cfg, cache_cfg, tiny_params, *tiny_frames)
    errs = _errors(out, np.load(tiny_dir / f"{run}.npz"))
    print(f"{run} relative errors:", errs)
    assert all(e <= tol for e in errs.values()), errs


def test_stream_per_token_pruned(tiny_dir, tiny_cfg, tiny_params, tiny_frames):
    """KTVT + xstream: exact frame by frame up to the reference's near tie, within 2x the measured
    flip states after (see KTVT_NEAR_TIE_FRAME)."""
    out = stream_outputs(tiny_cfg, CacheConfig("xstream", 64, 16, quant="ktvt"), tiny_params, *tiny_frames)
    assert_ktvt_parity(out, np.load(tiny_dir / "stream_xs_c64_p16_KTVT.npz"))


@pytest.mark.parametrize("layout", ["kcvt", "kcvc", "ktvc"])
def test_stream_per_channel_pruned(layout, tiny_dir, tiny_cfg, tiny_params, tiny_frames):
    """Per-channel quantization with pruning: exact where no rounding tie is possible, within the tie
    envelope after (see the comment above TIE_FREE_FRAMES)."""
    out = stream_outputs(tiny_cfg, CacheConfig("xstream", 64, 16, quant=layout), tiny_params, *tiny_frames)
    ref = np.load(tiny_dir / f"stream_xs_c64_p16_{layout.upper()}.npz")
    head, whole = _errors(out, ref, slice(0, TIE_FREE_FRAMES)), _errors(out, ref)
    print(f"{layout} relative errors, frames < {TIE_FREE_FRAMES}:", head, "all frames:", whole)
    assert all(e <= TOL for e in head.values()), head
    assert all(e <= TIE_ENVELOPE_TOL for e in whole.values()), whole


def test_streaming_tracks_stay_at_queries(stream_none_run, tiny_dir, tiny_frames):
    """A streaming step sees one frame (S = 1): the tracker's flows are 0 and every frame's tracks are
    exactly the query points, upstream's and ours. So streaming track parity cannot fail; this says so
    by name, and the tracker is checked where it moves: offline (test_offline_outputs)."""
    _, queries = tiny_frames
    want = np.broadcast_to(queries, stream_none_run["track"].shape)
    np.testing.assert_array_equal(stream_none_run["track"], want)
    np.testing.assert_array_equal(np.load(tiny_dir / "stream_none.npz")["track"], want)


@pytest.mark.parametrize("mode", ["offline_causal", "offline_full"])
def test_offline_outputs(mode, tiny_dir, tiny_cfg, tiny_params, tiny_frames):
    images, queries = tiny_frames
    fn = jax.jit(lambda p, x, q: StreamVGGT(tiny_cfg).apply({"params": p}, x, q, mode == "offline_causal",
                                                            method=StreamVGGT.offline))
    out = fn(tiny_params, _nhwc(images)[None], jnp.asarray(queries)[None])
    ref = np.load(tiny_dir / f"{mode}.npz")
    assert np.abs(ref["track"][1:] - queries).max() > 1.0  # offline the tracker moves: the check has teeth
    errs = {k: rel_err(np.asarray(out[k][0]), ref[k]) for k in OUTPUTS}
    print(f"{mode} relative errors:", errs)
    for k, e in errs.items():
        assert e <= (OFFLINE_TRACK_SCORE_TOL if k in ("vis", "track_conf") else TOL), (k, e)


def test_intermediates(stream_none_run, tiny_dir, tiny_cfg, tiny_params, tiny_frames):
    """DINOv2 patch tokens, and every aggregator output frame by frame: streaming (the reference's
    `layer_aggregated_<i>` come from upstream's streaming inference) and causal offline, which the
    README says agree with it."""
    images, _ = tiny_frames
    ref = np.load(tiny_dir / "stream_none.npz")
    model = StreamVGGT(tiny_cfg)
    dino = model.apply({"params": tiny_params}, _nhwc(images), method=StreamVGGT.dino_tokens)
    assert rel_err(dino, ref["layer_dino_patch_tokens"]) <= TOL

    offline = jax.jit(lambda p, x: model.apply({"params": p}, x, None, True, True, method=StreamVGGT.offline))(
        tiny_params, _nhwc(images)[None])
    for i in range(tiny_cfg.depth):
        want = ref[f"layer_aggregated_{i}"]                              # [S, 1, P', 2C]
        streamed = rel_err(stream_none_run[f"aggregated_{i}"][:, None], want)
        causal = rel_err(np.asarray(offline["aggregated"][i][0])[:, None], want)
        print(f"layer_aggregated_{i}: streaming {streamed:.2e}, causal offline {causal:.2e}")
        assert streamed <= TOL and causal <= TOL, (i, streamed, causal)


@pytest.mark.parametrize("m,h,w", [(37, 28, 37), (5, 4, 5), (37, 74, 20), (5, 9, 3), (16, 16, 16)])
def test_pos_embed_interpolation_matches_pil_antialiased_bicubic(m, h, w):
    """torch's bicubic(antialias=True) is PIL's resampling filter (a = -0.5, support scaled when
    downsampling); PIL's float ('F') resize is an independent implementation of it."""
    rng = np.random.default_rng(m * 100 + h)
    grid = rng.standard_normal((m, m, 4)).astype(np.float32)
    ours = np.asarray(interpolate_pos_embed(jnp.asarray(grid), h, w))
    pil = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize((w, h), Image.Resampling.BICUBIC))
                    for c in range(grid.shape[-1])], -1)
    assert ours.shape == (h, w, 4)
    assert rel_err(ours, pil) <= 1e-6


BF16_TOL = 5e-2  # bfloat16 keeps 8 significant bits (2^-8 = 3.9e-3 per rounding), compounded over the network


def test_bfloat16_stream_close_to_reference(tiny_dir, tiny_cfg, tiny_params, tiny_frames):
    """bf16 compute (params stay float32; LayerNorm and softmax in float32) against the float32 reference."""
    out = stream_outputs(tiny_cfg.replace(dtype="bfloat16"), CacheConfig("xstream", 64, 16), tiny_params, *tiny_frames)
    ref = np.load(tiny_dir / "stream_xs_c64_p16.npz")
    errs = {k: rel_err(out[k].astype(np.float32), ref[k]) for k in OUTPUTS if k != "track"}
    print("bfloat16 relative errors:", errs)
    assert max(errs.values()) <= BF16_TOL, errs
