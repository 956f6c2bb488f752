"""What a pruning policy sees (`PruneContext`) and the ranking helpers the policies share: masked
top-k, the tiered sort, budget-aware protection of the first and current frame, and XStreamVGGT's
pooled-query score. The policies themselves and their registry are in `xsvggt_jax.cache.prune`
(`frames.py` and `merge.py` hold the larger ones); all of them build on this module, which imports
none of them.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from xsvggt_jax.errors import ConfigError

Array = jax.Array

PROTECT = ("full", "budget")       # registry of protection modes (CacheConfig.protect)
_HIGHEST = jax.lax.Precision.HIGHEST


class PolicyError(ConfigError):
    """A policy called with a context it cannot serve (e.g. a budget below what it must protect)."""


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
    mass:     float32 [B, T] the per-slot value the layer carries with its tokens, this call's
              included: the decayed running attention mass (`cumulative`), each token's FFN residual
              norm (`ffn`; 0 for the current frame, scored after its FFN), the number of tokens a slot
              stands for (`merge`); None for the other policies.
    protect:  static, a key of PROTECT: "full" | "budget" (see `protected_top`).
    protect_share: static, the budget share the first + current frame keep under protect="budget".
    v:        [B, H, T, D] values in the buffer (`merge` only; None otherwise).
    merge_share: static, `merge`: tokens merged a call = floor(merge_share x n_new).
    frame_feat: float32 [B, F, C] one unit feature per whole frame in the buffer, the current frame's
              included (`keyframes` only; None otherwise).
    frame_tokens: static, tokens one frame adds to the layer (`keyframes`; n_new in the aggregator,
              the refinement iterations in the camera trunk); 0 when unused.
    """

    k: Array
    q_new: Array
    length: Array
    n_new: int
    keep: int
    pool: int
    num_special: int
    key: Array
    mass: Optional[Array] = None
    protect: str = "full"
    protect_share: float = 0.5
    v: Optional[Array] = None
    merge_share: float = 0.5
    frame_feat: Optional[Array] = None
    frame_tokens: int = 0


class Rewrite(NamedTuple):
    """What a policy that rewrites the tokens it keeps (`merge`) returns instead of bare indices: the
    kept indices [B, keep] and the buffer after the rewrite, k, v [B, H, T, D] and mass [B, T]
    (`update_layer` gathers the kept slots from these)."""

    idx: Array
    k: Array
    v: Array
    mass: Array


def masked_top(scores: Array, valid: Array, count: int) -> Array:
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


def xstream_scores(ctx: PruneContext) -> Array:
    """float32 [B, T]: XStreamVGGT's token score, mean over pooled queries of head-mean q . head-mean k."""
    q = head_mean(pool_queries(ctx.q_new, ctx.num_special, ctx.pool))  # [B, R, D]
    k = head_mean(ctx.k)                                                # [B, T, D]
    return jnp.einsum("brd,btd->brt", q, k, precision=_HIGHEST).mean(1)


# -------------------------------------------------------------------------------------- protection
def ranked_top(scores: Array, tier: Array, count: int) -> Array:
    """Indices [B, count] of the best slots, sorted ascending: a higher tier always wins (tier 0 =
    invalid, never chosen while `count` valid slots exist), a higher score within a tier, the older
    slot on ties. One lexicographic sort. scores float [B, T]; tier int32 [B, T]."""
    return jnp.sort(ranked_order(scores, tier)[:, :count], axis=-1)


def ranked_order(scores: Array, tier: Array) -> Array:
    """int32 [B, T]: every slot, best first, by `ranked_top`'s order (tier, then score, then age)."""
    slot = jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.int32), scores.shape)
    _, _, order = jax.lax.sort((-tier, -jnp.where(tier > 0, scores, -jnp.inf), slot), dimension=-1, num_keys=2)
    return order


def _frame_quota_mask(scores: Array, start: Array, extent: Array, n: int, special: int, quota: int) -> Array:
    """bool [B, T]: the `special` tokens at `start` and the `quota - special` best-scored tokens among
    the frame's other candidates [start + special, start + extent) (extent <= n, >= quota)."""
    b, t = scores.shape
    pos = jnp.arange(t)
    mask = jnp.broadcast_to((pos >= start) & (pos < start + special), (b, t))
    if quota > special:
        rest = jax.lax.dynamic_slice_in_dim(scores, start + special, n - special, axis=1)   # [B, n - special]
        rest = jnp.where(jnp.arange(n - special) < extent - special, rest, -jnp.inf)
        _, top = jax.lax.top_k(rest, quota - special)                                         # [B, q]
        mask = mask | jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], top + start + special].set(True)
    return mask


def frames_fit(ctx: PruneContext) -> bool:
    """Static: the first and the current frame are both kept whole (protect="full", or they fit)."""
    return ctx.protect == "full" or 2 * ctx.n_new <= ctx.keep


def budget_quota(ctx: PruneContext) -> int:
    """Static, protect="budget" when the two frames do not fit: tokens protected in each of them."""
    special = min(ctx.num_special, ctx.n_new)
    return min(ctx.n_new, max(special, int(ctx.protect_share * ctx.keep / 2)))


def first_frame_extent(ctx: PruneContext) -> Array:
    """int32 []: the first frame occupies the buffer's slots [0, extent): all n of them until the
    first pruning call; under protect="budget" with frames that do not fit, its protected quota after."""
    if frames_fit(ctx):
        return jnp.int32(ctx.n_new)
    return jnp.where(ctx.length - ctx.n_new < ctx.keep, ctx.n_new, budget_quota(ctx)).astype(jnp.int32)


def protected_top(ctx: PruneContext, scores: Array) -> Array:
    """[B, keep] kept indices for per-token scores [B, T] (higher = more useful) under `ctx.protect`.

    "full", or "budget" when the first + current frame fit (2n <= keep): both frames whole, then the
    best valid middle tokens (XStreamVGGT's rule). "budget" otherwise, with a quota of
    q = floor(protect_share * keep / 2) tokens a frame (at least its special tokens, at most n):
    * the current frame [length - n, length) keeps its special tokens and its q best-scored tokens;
    * the first frame keeps its special tokens and its q best-scored tokens at the first pruning call
      (when it is still whole at [0, n)); they are returned first, so they sit at [0, q) and are kept
      on every later call. Its other tokens are only a filler when too few others are valid (they
      then follow in time order, as history). (Corner case keep == n: the first call cannot be told
      from later ones, so the first frame keeps its q oldest tokens.)
    * the remaining slots take the best-scored valid tokens anywhere (history, current frame).
    Indices are in time order except that, under "budget", the first frame's protected tokens lead.
    """
    tier, first = protection_tiers(ctx, scores)
    return kept_in_order(ranked_order(scores, tier), first, ctx.keep)


def kept_in_order(order: Array, first: Optional[Array], keep: int) -> Array:
    """[B, keep]: the `keep` best slots of a `ranked_order`, in time order, except that the first
    frame's protected tokens `first` (bool [B, T], or None) lead: they sit at [0, q) after the take,
    where the next call finds them."""
    idx = jnp.sort(order[:, :keep], axis=-1)
    if first is None:
        return idx
    t = order.shape[1]
    lead = jnp.take_along_axis(first, idx, axis=1)
    return jnp.sort(jnp.where(lead, idx, idx + t), axis=-1) % t


def protection_tiers(ctx: PruneContext, scores: Array) -> tuple[Array, Optional[Array]]:
    """(tier int32 [B, T], first): `protected_top`'s tiers (3 protected, 2 candidate, 1 first-frame
    filler, 0 invalid) and, under "budget" when the two frames do not fit, the first frame's
    protected tokens (bool [B, T]; None otherwise)."""
    b, t = scores.shape
    n, keep = ctx.n_new, ctx.keep
    pos = jnp.arange(t)
    valid = jnp.broadcast_to(pos < ctx.length, (b, t))
    cur_start = ctx.length - n
    if frames_fit(ctx):
        protected = jnp.broadcast_to((pos < n) | (pos >= cur_start), (b, t))
        return jnp.where(valid, jnp.where(protected, 3, 2), 0).astype(jnp.int32), None
    special = min(ctx.num_special, n)
    if 2 * special > keep:
        raise PolicyError(f"protect='budget' needs a budget of at least the special tokens of two frames "
                          f"({2 * special}), got {keep}")
    quota = budget_quota(ctx)
    first_extent = first_frame_extent(ctx)   # never pruned before: the first frame is [0, n)
    first = _frame_quota_mask(scores, jnp.int32(0), first_extent, n, special, quota)
    protected = first | _frame_quota_mask(scores, cur_start, jnp.int32(n), n, special, quota)
    filler = jnp.broadcast_to(pos < first_extent, (b, t)) & ~protected
    return jnp.where(valid, jnp.where(protected, 3, jnp.where(filler, 1, 2)), 0).astype(jnp.int32), first
