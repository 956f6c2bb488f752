"""Pruning policies on tiny hand-made caches whose selections can be worked out by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xsvggt_jax.cache.prune import (POLICIES, PruneContext, cumulative, diversity, ffn, frame, keyframes, merge,
                                    pool_queries, random, sliding, xstream)


def _ctx(keys, queries, length, n_new, keep, pool=1, num_special=0, key=0) -> PruneContext:
    """keys [T, D] / queries [N, D] for one batch row and one head."""
    k = jnp.asarray(keys, jnp.float32)[None, None]
    q = jnp.asarray(queries, jnp.float32)[None, None]
    return PruneContext(k=k, q_new=q, length=jnp.int32(length), n_new=n_new, keep=keep, pool=pool,
                        num_special=num_special, key=jax.random.PRNGKey(key))


def test_registry_names_every_policy():
    assert POLICIES == {"none": None, "xstream": xstream, "sliding": sliding, "random": random,
                        "diversity": diversity, "cumulative": cumulative, "frame": frame, "ffn": ffn,
                        "keyframes": keyframes, "merge": merge}


def test_xstream_keeps_first_and_current_frame_and_the_best_middle_tokens():
    # 2 tokens a frame, 7 valid of 8 slots, keep 5: first frame (0, 1), current frame (5, 6), and the
    # one middle token (2..4) with the highest q.k. Query (1, 0): scores are the keys' x.
    keys = [[-9, 0], [-9, 0],            # first frame: kept despite the lowest scores
            [1, 0], [5, 0], [-1, 0],     # middle: token 3 wins
            [-9, 0], [-9, 0],            # current frame: kept
            [100, 0]]                    # slot 7 is past `length`: never kept
    idx = xstream(_ctx(keys, [[1, 0], [1, 0]], length=7, n_new=2, keep=5))
    assert np.asarray(idx).tolist() == [[0, 1, 3, 5, 6]]


def test_xstream_scores_with_head_mean_and_pooled_queries():
    # Two heads: a key that is large on one head and opposite on the other averages to 0. Queries:
    # one special token (1, 0) kept as is, two patch queries pooled into (0, 1) -> score = mean of the
    # key's x and y over heads.
    k = np.zeros((1, 2, 6, 2), np.float32)
    k[0, 0, 2], k[0, 1, 2] = [8, 0], [-8, 0]      # head mean (0, 0): score 0
    k[0, :, 3] = [1, 1]                            # score (1 + 1) / 2 = 1
    q = np.zeros((1, 2, 3, 2), np.float32)
    q[0, :, 0] = [1, 0]                            # special
    q[0, :, 1], q[0, :, 2] = [0, 2], [0, 0]        # pooled -> (0, 1)
    ctx = PruneContext(k=jnp.asarray(k), q_new=jnp.asarray(q), length=jnp.int32(6), n_new=1, keep=3, pool=2,
                       num_special=1, key=jax.random.PRNGKey(0))
    assert np.asarray(xstream(ctx)).tolist() == [[0, 3, 5]]


def test_pool_queries_keeps_special_tokens_and_averages_a_short_last_group():
    q = jnp.arange(6, dtype=jnp.float32).reshape(1, 1, 6, 1)      # rows 0..5
    pooled = pool_queries(q, num_special=1, pool=2)               # [0] + mean(1, 2), mean(3, 4), mean(5)
    assert np.asarray(pooled)[0, 0, :, 0].tolist() == [0.0, 1.5, 3.5, 5.0]


def test_sliding_keeps_the_newest_tokens():
    idx = sliding(_ctx(np.zeros((8, 2)), np.zeros((1, 2)), length=7, n_new=1, keep=3))
    assert np.asarray(idx).tolist() == [[4, 5, 6]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_is_a_sorted_valid_subset_fixed_by_the_key(seed):
    keys = np.zeros((64, 2))
    pick = lambda key: np.asarray(random(_ctx(keys, np.zeros((1, 2)), length=40, n_new=1, keep=8, key=key)))[0]
    a = pick(seed)
    assert len(set(a.tolist())) == 8 and (np.diff(a) > 0).all()           # distinct, time-ordered
    assert a.min() >= 0 and a.max() < 40                                 # valid slots only
    np.testing.assert_array_equal(pick(seed), a)                         # deterministic by key
    assert not np.array_equal(pick(seed + 100), a)                       # another key, another subset
