"""Attention kernels: the chunked filled-prefix path against the dense masked one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from xsvggt_jax.attention import kernels as attention
from xsvggt_jax.attention.dispatch import attend
from xsvggt_jax.attention.masks import KeyPrefix, as_mask
from xsvggt_jax.nn import layers

CHUNK = 16


def _qkv(seed: int, nq: int = 5, cap: int = 4 * CHUNK, d: int = 8):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (2, 3, nq, d))
    k = jax.random.normal(ks[1], (2, 3, cap, d))
    v = jax.random.normal(ks[2], (2, 3, cap, d))
    return q, k, v


@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 4 * CHUNK])
def test_prefix_attention_equals_dense_masked(length):
    q, k, v = _qkv(length)
    # slots past `length` hold large garbage: the prefix path must never let it through
    garbage = jnp.arange(k.shape[2]) >= length
    k = jnp.where(garbage[:, None], 1e3, k)
    v = jnp.where(garbage[:, None], -1e3, v)
    dense = attend(q, k, v, mask=jnp.where(garbage, -jnp.inf, 0.0))
    ours = jax.jit(lambda q, k, v, n: attend(q, k, v, mask=KeyPrefix(n, CHUNK)))(q, k, v, jnp.int32(length))
    assert ours.shape == dense.shape
    assert rel_err(ours, dense) <= 1e-6


def test_prefix_length_is_traced_not_static():
    q, k, v = _qkv(0)
    fn = jax.jit(lambda q, k, v, n: attend(q, k, v, mask=KeyPrefix(n, CHUNK)))
    outs = [fn(q, k, v, jnp.int32(n)) for n in (3, 20, 64)]
    assert fn._cache_size() == 1
    np.testing.assert_allclose(outs[-1], attend(q, k, v), rtol=1e-5, atol=1e-6)


def test_prefix_capacity_must_be_whole_chunks():
    q, k, v = _qkv(0, cap=4 * CHUNK + 1)
    with pytest.raises(ValueError, match="multiple of the chunk"):
        attend(q, k, v, mask=KeyPrefix(jnp.int32(3), CHUNK))


@pytest.mark.parametrize("query_block", [attention.CPU_QUERY_BLOCK, 16])  # unrolled; lax.map
@pytest.mark.parametrize("bias_kind", ["none", "per_key", "per_query"])
def test_query_blocked_attention_equals_dense(bias_kind, query_block):
    """The CPU path walks queries in blocks; it must give the dense values for any mask shape (a key
    mask of a pruned cache, a causal [Nq, Nk] mask)."""
    nq = 2 * attention.CPU_QUERY_BLOCK + 37  # blocked, with a padded last block
    q, k, v = _qkv(3, nq=nq, cap=nq)
    if bias_kind == "per_key":
        bias = jnp.where(jnp.arange(nq) % 5 == 0, -jnp.inf, 0.0)
    elif bias_kind == "per_query":
        bias = jnp.where(jnp.arange(nq)[:, None] >= jnp.arange(nq)[None, :], 0.0, -jnp.inf)
    else:
        bias = None
    dense = attention._attend_dense(q, k, v, bias, layers.Precision.HIGHEST)
    blocked = attention.attend_xla(q, k, v, as_mask(bias), layers.Precision.HIGHEST,
                                          query_block=query_block)
    assert blocked.shape == dense.shape
    assert rel_err(blocked, dense) <= 1e-6
