"""KV-cache pruning policies (XStreamVGGT): which cached tokens survive once a layer is over budget.

A policy is a pure function with one signature::

    policy(ctx: PruneContext) -> keep_idx  # int32 [B, keep], sorted (time order)

It is called after attention, on a layer buffer holding `length` valid tokens (the current frame's
`n_new` tokens last), and only takes effect when length > keep. Add a policy by writing such a function
and registering it in POLICIES; the model never needs to change.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PruneContext:
    """What a policy may look at. Shapes: B batch, H heads, T buffer slots, D head dim.

    k:        [B, H, T, D] keys in the buffer (after norm/RoPE; dequantized when quantizing).
    q_new:    [B, H, n_new, D] the current frame's queries.
    length:   int32 [] valid slots (the current frame occupies [length - n_new, length)).
    n_new:    static, tokens the current frame added.
    keep:     static, tokens kept after pruning.
    pool:     static, query pooling group size (xstream).
    num_special: static, leading special tokens of a frame's queries, never pooled (xstream).
    key:      a jax.random key (random policy).
    """

    k: Array
    q_new: Array
    length: Array
    n_new: int
    keep: int
    pool: int
    num_special: int
    key: Array


def _masked_top(scores: Array, valid: Array, count: int) -> Array:
    """Indices [B, count] of the `count` highest valid scores, sorted ascending (time order)."""
    if count == 0:
        return jnp.zeros(scores.shape[:1] + (0,), jnp.int32)
    _, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), count)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def head_mean(x: Array) -> Array:
    """[B, H, T, D] -> [B, T, D], the mean over heads as H - 1 unrolled adds.

    Same values as `x.mean(1)` (bit-identical here), but XLA:CPU fuses a head-axis `reduce` into the
    following score matmul as one XNNPACK fusion that runs ~14x slower than this elementwise form
    (1295 tokens x 6 heads x 64: 2.9 ms vs 0.2 ms; see benchmarks/README.md).
    """
    total = x[:, 0]
    for h in range(1, x.shape[1]):
        total = total + x[:, h]
    return total / x.shape[1]


def pool_queries(q_new: Array, num_special: int, pool: int) -> Array:
    """[B, H, N, D] -> [B, H, R, D]: special tokens as they are, then the rest mean-pooled in groups of
    `pool` (a shorter last group is averaged too)."""
    special, normal = q_new[:, :, :num_special], q_new[:, :, num_special:]
    n = normal.shape[2]
    if n <= 1:
        return jnp.concatenate([special, normal], 2)
    full = n // pool
    parts = [special]
    if full:
        b, h, _, d = normal.shape
        parts.append(normal[:, :, :full * pool].reshape(b, h, full, pool, d).mean(3))
    if n > full * pool:
        parts.append(normal[:, :, full * pool:].mean(2, keepdims=True))
    return jnp.concatenate(parts, 2)


def xstream(ctx: PruneContext) -> Array:
    """Query-guided top-k: keep the first `n_new` tokens (first frame) and the current frame, and the
    `keep - 2 n_new` middle tokens with the highest mean (head-averaged) q.k score."""
    b, _, t, _ = ctx.k.shape
    n = ctx.n_new
    q = head_mean(pool_queries(ctx.q_new, ctx.num_special, ctx.pool))  # [B, R, D]
    k = head_mean(ctx.k)                                                # [B, T, D]
    scores = jnp.einsum("brd,btd->brt", q, k, precision=jax.lax.Precision.HIGHEST).mean(1)  # [B, T]
    pos = jnp.arange(t)
    middle = (pos >= n) & (pos < ctx.length - n)
    top = _masked_top(scores, jnp.broadcast_to(middle, scores.shape), ctx.keep - 2 * n)
    first = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    last = jnp.broadcast_to(ctx.length - n + jnp.arange(n, dtype=jnp.int32), (b, n))
    return jnp.concatenate([first, top, last], -1)  # already in time order


def sliding(ctx: PruneContext) -> Array:
    """The newest `keep` tokens."""
    b = ctx.k.shape[0]
    return jnp.broadcast_to(ctx.length - ctx.keep + jnp.arange(ctx.keep, dtype=jnp.int32), (b, ctx.keep))


def random(ctx: PruneContext) -> Array:
    """A uniformly random subset of `keep` valid tokens (the same for every batch row), time-ordered."""
    b, _, t, _ = ctx.k.shape
    scores = jax.random.uniform(ctx.key, (t,))
    return jnp.broadcast_to(_masked_top(scores[None], (jnp.arange(t) < ctx.length)[None], ctx.keep), (b, ctx.keep))


Policy = Callable[[PruneContext], Array]
POLICIES: dict[str, Policy | None] = {"none": None, "xstream": xstream, "sliding": sliding, "random": random}
