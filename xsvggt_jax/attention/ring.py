"""Sequence-parallel attention: the token sequence sharded contiguously over a mesh axis.

As **ring attention** every device keeps its queries while the K/V blocks travel the ring
(`lax.ppermute`, one hop per step); each visiting block is folded into the online softmax of
`kernels.blocked_states`, and blocks the mask empties are skipped (a zero trip count). The simpler
`gather` variant all-gathers K/V first, then attends blocked. Call inside `jax.shard_map`.
"""

from __future__ import annotations

import functools

import jax

from xsvggt_jax.attention.kernels import KEY_BLOCK, QUERY_BLOCK, blocked_states, unblock
from xsvggt_jax.attention.masks import Mask

Array = jax.Array
Precision = jax.lax.Precision


def attend_sequence_parallel(q: Array, k: Array, v: Array, mask: Mask, precision: Precision, axis: str, *,
                             ring: bool = True, query_block: int = QUERY_BLOCK,
                             key_block: int = KEY_BLOCK) -> Array:
    """Attention over a sequence sharded contiguously over mesh `axis` (call inside `jax.shard_map`).

    q, k, v: this device's slice [B, H, N, D] of the global [B, H, n * N, D] sequence; mask: global
    indices. ring: pass K/V around the ring (memory of one K/V slice); else all-gather them.
    Returns this device's [B, H, N, D] of the output.
    """
    n = jax.lax.axis_size(axis)
    idx = jax.lax.axis_index(axis)
    nq, nk = q.shape[2], k.shape[2]
    fold = functools.partial(blocked_states, q, mask=mask, precision=precision, query_block=query_block,
                             key_block=key_block, q_offset=idx * nq)
    if not ring:
        k_all = jax.lax.all_gather(k, axis, axis=2, tiled=True)
        v_all = jax.lax.all_gather(v, axis, axis=2, tiled=True)
        return unblock(fold(k=k_all, v=v_all, states=None, k_offset=0), nq, v.dtype)
    states = None
    perm = [(j, (j + 1) % n) for j in range(n)]
    for step in range(n):                      # step r holds the K/V slice of device (idx - r) mod n
        states = fold(k=k, v=v, states=states, k_offset=((idx - step) % n) * nk)
        if step + 1 < n:
            k, v = jax.lax.ppermute((k, v), axis, perm)
    return unblock(states, nq, v.dtype)
