"""`merge`: merge-instead-of-evict, after StreamCacheVGGT's hybrid cache compression (Liu et al. 2026,
arXiv 2604.15237: tokens triaged into kept / merged into their nearest kept key / evicted).

Which tokens, per attention call that prunes (a layer over budget):
* kept: exactly xstream's selection (`protected_top` on the XStreamVGGT score, under `protect`);
* merged: the next m = floor(merge_share x n_new) tokens of the same ranking (the best-scored of the
  tokens this call evicts; fewer when fewer are evicted, at the first prune). With one token a call
  (the camera trunk) and merge_share < 1, m = 0: plain xstream there;
* evicted: the rest, dropped.

Into what: each merged token goes to the kept token whose key is the nearest, by cosine similarity of
head-mean keys (the keys the scores use), among the kept tokens outside the first frame (the anchor
stays exact: [0, first_frame_extent)). Ties go to the older kept token.

How: every slot carries a count c (`LayerKV.mass`), the number of original tokens it stands for (1
when a token enters). A kept token i receiving the merged tokens J becomes the count-weighted mean
k_i <- (c_i k_i + sum_J c_j k_j) / (c_i + sum_J c_j), the same for v, in every head, and
c_i <- c_i + sum_J c_j: a slot's key and value are the plain means of the original tokens merged into
it, whatever the order of the merges. Kept tokens that receive nothing are left bit-exact. Attention
reads a merged slot as one token (no log-count bias).

Quantized layers: the policy scores and merges the values as this call attends them (the dequantized
past and the float current frame), and `update_layer` quantizes the merged buffer once (upstream's
order re-quantizes the whole cache every step anyway), so a merged slot's codes are those of its mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xsvggt_jax.cache.ranking import (PolicyError, PruneContext, Rewrite, first_frame_extent, head_mean, kept_in_order,
                                      protection_tiers, ranked_order, xstream_scores)

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def merged_count(ctx: PruneContext) -> int:
    """Static: tokens a pruning call merges, floor(merge_share x n_new), at most the buffer's spare slots."""
    return max(0, min(int(ctx.merge_share * ctx.n_new), ctx.k.shape[2] - ctx.keep))


def nearest_kept(k: Array, cand: Array, kept: Array, target: Array) -> Array:
    """int32 [B, m]: for each candidate slot cand [B, m], the position in kept [B, keep] of the kept
    slot with the most similar key (cosine of head-mean keys of k [B, H, T, D]), among the kept
    positions where target [B, keep] is True (ties: the first, i.e. the older, position)."""
    km = head_mean(k.astype(jnp.float32))
    unit = km * jax.lax.rsqrt(jnp.maximum(jnp.sum(km * km, -1, keepdims=True), 1e-12))
    cu = jnp.take_along_axis(unit, cand[:, :, None], axis=1)                   # [B, m, D]
    ku = jnp.take_along_axis(unit, kept[:, :, None], axis=1)                   # [B, keep, D]
    sim = jnp.einsum("bmd,bkd->bmk", cu, ku, precision=_HIGHEST)
    return jnp.argmax(jnp.where(target[:, None, :], sim, -jnp.inf), axis=-1).astype(jnp.int32)


def _merge_row(k: Array, v: Array, count: Array, kept: Array, cand: Array, weight: Array, into: Array):
    """One batch row: k, v [H, T, D], count [T]; kept [keep], cand [m] slots; weight [m] (0: not
    merged); into [m] positions in `kept`. Returns k, v, count with the merges written at `kept`."""
    ck = count[kept]                                                           # [keep]
    got = jnp.zeros_like(ck).at[into].add(weight)                              # merged counts received
    total = ck + got

    def mean(x):
        x32 = x.astype(jnp.float32)
        num = (x32[:, kept] * ck[None, :, None]).at[:, into].add(x32[:, cand] * weight[None, :, None])
        new = jnp.where((got > 0)[None, :, None], num / jnp.maximum(total, 1e-30)[None, :, None], x32[:, kept])
        return x.at[:, kept].set(new.astype(x.dtype))

    return mean(k), mean(v), count.at[kept].set(total)


def merge(ctx: PruneContext) -> Rewrite:
    """xstream's kept tokens, with the next floor(merge_share x n) ranked tokens merged into their
    nearest kept key (see the module docstring). Returns a `Rewrite`: the kept indices [B, keep] and
    the buffer's K, V and counts after the merge."""
    if ctx.v is None or ctx.mass is None:
        raise PolicyError("the merge policy needs the values and the slots' counts (PruneContext.v, .mass)")
    scores = xstream_scores(ctx)
    tier, first = protection_tiers(ctx, scores)
    order = ranked_order(scores, tier)
    idx = kept_in_order(order, first, ctx.keep)                                # [B, keep]
    m = merged_count(ctx)
    if m == 0:
        return Rewrite(idx, ctx.k, ctx.v, ctx.mass)
    cand = order[:, ctx.keep:ctx.keep + m]                                     # [B, m]: the best evicted
    weight = jnp.where(jnp.take_along_axis(tier, cand, axis=1) > 0,
                       jnp.take_along_axis(ctx.mass, cand, axis=1), 0.0)      # invalid slots: no merge
    target = idx >= first_frame_extent(ctx)                                    # the anchor stays exact
    into = nearest_kept(ctx.k, cand, idx, target)
    k, v, count = jax.vmap(_merge_row)(ctx.k, ctx.v, ctx.mass, idx, cand, weight, into)
    return Rewrite(idx, k, v, count)
