"""The track head's query validity mask: padded query points leave the real points' outputs unchanged
(tiny reference weights; the head alone on random aggregator tokens, 3 frames so the tracker moves)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xsvggt_jax.stream.pool import pad_queries
from xsvggt_jax.nn.heads.track import TrackHead, key_mask

# Over 3 frames the tracker's two iterations resample correlations at the refined tracks, so the
# masked attention's rounding (a softmax over 5 keys, 2 of them at exp(-inf) = 0, vs over 3) grows:
# measured 6.1e-5 on tracks (pixels, ~50: 16 float32 ulps), 6.0e-6 / 3.5e-6 on vis / conf. Unmasked,
# the padded points move them by more than 1e-3. (Streaming steps see one frame; tests/test_parallel.py
# checks the pool there to 1e-6.)
TOL = 1e-5
TRACK_TOL = 1e-4
FRAMES, REAL, PADDED = 3, 3, 5


@pytest.fixture(scope="module")
def head(tiny_cfg, tiny_params, tiny_frames):
    """run(points [B, N, 2], valid [B, N] | None) -> (track, vis, conf) of the tiny track head."""
    images, queries = tiny_frames
    h, w = images.shape[2:]
    tokens = tiny_cfg.tokens_per_frame(h, w)
    rng = np.random.default_rng(0)
    aggregated = [jnp.asarray(rng.standard_normal((1, FRAMES, tokens, 2 * tiny_cfg.embed_dim)), jnp.float32)
                  for _ in range(tiny_cfg.depth)]
    jitted = jax.jit(lambda params, agg, pts, valid: TrackHead(tiny_cfg).apply({"params": params}, agg, h, w,
                                                                               pts, valid))
    return (lambda pts, valid: jitted(tiny_params["track_head"], aggregated, pts, valid)), queries.astype(np.float32)


def test_padded_points_do_not_change_the_real_ones(head):
    apply, queries = head
    ref = apply(jnp.asarray(queries[None, :REAL]), None)
    # padded with far-away points rather than pad_queries' copies, so that they would matter
    pts = np.concatenate([queries[:REAL], [[3.0, 50.0], [60.0, 5.0]]])[None]
    valid = (np.arange(PADDED) < REAL)[None]
    masked = apply(jnp.asarray(pts), jnp.asarray(valid))
    unmasked = apply(jnp.asarray(pts), None)
    errs, unmasked_errs = {}, {}
    for name, r, m, u in zip(("track", "vis", "conf"), ref, masked, unmasked):
        r, m, u = (np.asarray(x)[:, :, :REAL] for x in (r, m, u))
        errs[name], unmasked_errs[name] = float(np.abs(m - r).max()), float(np.abs(u - r).max())
    assert errs["vis"] <= TOL and errs["conf"] <= TOL, errs
    assert errs["track"] <= TRACK_TOL, errs
    assert min(unmasked_errs.values()) > 1e-3, unmasked_errs  # without the mask the padded points matter
    assert np.abs(np.asarray(ref[0])[:, 1:] - queries[None, None, :REAL]).max() > 0.1  # the tracker moved


def test_an_all_valid_mask_is_the_unmasked_head(head):
    apply, queries = head
    pts = jnp.asarray(queries[None, :PADDED])
    for a, b in zip(apply(pts, jnp.ones((1, PADDED), bool)), apply(pts, None)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=TOL)


def test_key_mask():
    assert key_mask(None, 2) is None
    _, valid = pad_queries([[1.0, 2.0]], 3)
    bias = np.asarray(key_mask(np.stack([valid, np.zeros(3, bool)]), 2).array)
    assert bias.shape == (4, 1, 1, 3)
    np.testing.assert_array_equal(bias[:2, 0, 0], [[0, -np.inf, -np.inf]] * 2)
    np.testing.assert_array_equal(bias[2:, 0, 0], np.zeros((2, 3)))  # no valid point: all keys, no NaN
