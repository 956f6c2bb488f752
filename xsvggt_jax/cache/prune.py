"""KV-cache pruning policies: which cached tokens survive once a layer is over budget.

A policy is a pure function with one signature::

    policy(ctx: PruneContext) -> keep_idx  # int32 [B, keep], sorted (time order; see protected_top)

(a policy that rewrites the tokens it keeps, `merge`, returns a `Rewrite`: the indices and the
rewritten buffer). It is called after attention, on a layer buffer holding `length` valid tokens (the
current frame's `n_new` tokens last), and only takes effect when length > keep. Add a policy by
writing such a function and registering it in POLICIES; the model never needs to change. Every policy
has fixed shapes and uses `lax` only, so a stream traces once. n = `n_new` is a frame's tokens in the
aggregator, 1 in the camera trunk (each refinement iteration appends one token). The context and the
ranking helpers are in `ranking.py`; `frames.py` and `merge.py` hold the larger policies.

* `xstream` (XStreamVGGT): first + current frame, then the best pooled-query x head-mean key scores.
* `sliding`: the newest tokens; `random`: a random subset (baselines).
* `diversity` (InfiniteVGGT, Yuan et al. 2026, arXiv 2601.02281): the least redundant keys.
* `cumulative` (Evict3R; STAC): the tokens that received the most decayed attention so far.
* `frame` (FrameVGGT): whole frames by their mean xstream score.
* `ffn` (OVGGT, VAISR/OVGGT, arXiv 2603.05959): first + current frame, then the tokens whose FFN
  residual ls2(mlp(norm2(x))) at this layer had the largest L2 norm when they entered (no attention
  matrix needed). OVGGT scores past tokens by key diversity and smooths the score over the patch
  grid; neither is done here: every token keeps its own residual norm.
* `keyframes` (eStreamVGGT, UniverseXing/eStreamVGGT): K whole frames, the anchor (first), the
  newest max(1, K // 2) and the history frames least similar (DINO feature) to the newest; the
  camera trunk keeps the same frames (`frames.py`).
* `merge` (StreamCacheVGGT, arXiv 2604.15237): xstream's kept tokens; the best-ranked
  floor(merge_share x n) evicted tokens are merged into their nearest kept key (count-weighted mean
  of K and V) instead of dropped (`merge.py`).
* protection (`ctx.protect`, the scored token policies xstream, diversity, cumulative, ffn, merge):
  "full" keeps the first and the current frame whole (XStreamVGGT's rule: a layer holds
  max(budget, 2n) tokens); "budget" keeps exactly `keep` tokens: when the two frames do not fit, only
  their special tokens plus a share of each frame (chosen by the policy's score) are protected, and
  the rest of the budget goes to the best-scored tokens anywhere, history included (`protected_top`;
  not for ffn, whose current frame is scored only after its FFN).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from xsvggt_jax.cache.frames import keyframes
from xsvggt_jax.cache.merge import merge
from xsvggt_jax.cache.ranking import (PROTECT, PolicyError, PruneContext, Rewrite, first_frame_extent, head_mean,
                                      masked_top, pool_queries, protected_top, ranked_top, xstream_scores)

__all__ = ["POLICIES", "PROTECT", "MASS_POLICIES", "RESIDUAL_POLICIES", "MERGE_POLICIES", "FEATURE_POLICIES",
           "CARRY_POLICIES", "Policy", "PolicyError", "PruneContext", "Rewrite", "protected_top", "ranked_top",
           "head_mean", "pool_queries", "xstream_scores", "first_frame_extent", "diversity_scores", "attention_mass",
           "xstream", "sliding", "random", "diversity", "cumulative", "frame", "ffn", "keyframes", "merge"]

Array = jax.Array

MASS_POLICIES = ("cumulative",)      # layers carry a running attention mass [B, T] (`LayerKV.mass`)
RESIDUAL_POLICIES = ("ffn",)         # layers carry each token's FFN residual norm there, written by the block
MERGE_POLICIES = ("merge",)          # layers carry each slot's merge count there; the policy rewrites K/V
FEATURE_POLICIES = ("keyframes",)    # layers carry one feature per whole frame (`LayerKV.feat`)
CARRY_POLICIES = MASS_POLICIES + RESIDUAL_POLICIES + MERGE_POLICIES   # layers with `LayerKV.mass`
_HIGHEST = jax.lax.Precision.HIGHEST


def xstream(ctx: PruneContext) -> Array:
    """Query-guided top-k (XStreamVGGT): keep the first `n_new` tokens (first frame) and the current
    frame, and the `keep - 2 n_new` middle tokens with the highest mean (head-averaged) q.k score.
    protect="budget": the same score under `protected_top`'s budget-aware protection."""
    if ctx.protect == "budget":
        return protected_top(ctx, xstream_scores(ctx))
    b, _, t, _ = ctx.k.shape
    n = ctx.n_new
    scores = xstream_scores(ctx)                                        # [B, T]
    pos = jnp.arange(t)
    middle = (pos >= n) & (pos < ctx.length - n)
    top = masked_top(scores, jnp.broadcast_to(middle, scores.shape), ctx.keep - 2 * n)
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
    return jnp.broadcast_to(masked_top(scores[None], (jnp.arange(t) < ctx.length)[None], ctx.keep), (b, ctx.keep))


# ------------------------------------------------------------------------------------------ scores
def diversity_scores(k: Array, length: Array) -> Array:
    """float32 [B, T]: minus each key's redundancy, its largest cosine similarity to a valid *newer*
    key (head-mean keys [B, T, D] from k [B, H, T, D]). One-shot: of a group of duplicated keys only
    the newest scores well (a symmetric max would evict every copy). Keys without a newer valid key
    score 1 (the maximum). Cost: one [B, T, T] Gram matrix."""
    km = head_mean(k)
    unit = km * jax.lax.rsqrt(jnp.maximum(jnp.sum(km * km, -1, keepdims=True), 1e-12))
    cos = jnp.einsum("bid,bjd->bij", unit, unit, precision=_HIGHEST)  # [B, T, T]
    t = k.shape[2]
    pos = jnp.arange(t)
    newer = (pos[None, :] > pos[:, None]) & (pos[None, :] < length)   # [T, T]: j newer than i, valid
    return -jnp.max(jnp.where(newer, cos, -1.0), axis=-1)


def attention_mass(q: Array, k: Array, length: Array, pool: int, num_special: int) -> Array:
    """float32 [B, T]: the attention mass each key receives from this call's queries, head-mean.

    Pooled-query softmax (cheap, not `attend`'s exact mass): the special queries as they are, the
    others mean-pooled in groups of `pool`; per head softmax(q k^T / sqrt(D)) over the `length` valid
    keys; each pooled row weighted by the queries it stands for; summed over rows, mean over heads.
    So a call with N queries hands out a total mass of N, as the exact sum over queries does.
    q [B, H, N, D]; k [B, H, T, D].
    """
    n, d = q.shape[2], q.shape[3]
    pooled = pool_queries(q, num_special, pool)                        # [B, H, R, D]
    special = min(num_special, n)
    rest = n - special
    sizes = [1] * special + ([pool] * (rest // pool) + ([rest % pool] if rest % pool else [])
                             if rest > 1 else [1] * rest)
    weight = jnp.asarray(sizes, jnp.float32)                           # [R]
    logits = jnp.einsum("bhrd,bhtd->bhrt", pooled.astype(jnp.float32), k.astype(jnp.float32),
                        precision=_HIGHEST) / jnp.sqrt(jnp.float32(d))
    logits = jnp.where(jnp.arange(k.shape[2]) < length, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)                            # [B, H, R, T]
    return jnp.einsum("bhrt,r->bt", probs, weight, precision=_HIGHEST) / q.shape[1]


# ---------------------------------------------------------------------------------------- policies
def diversity(ctx: PruneContext) -> Array:
    """InfiniteVGGT-style key diversity: the first frame (anchor) and the current frame protected, the
    rest of the budget to the least redundant keys (`diversity_scores`: one-shot, not greedy)."""
    return protected_top(ctx, diversity_scores(ctx.k, ctx.length))


def cumulative(ctx: PruneContext) -> Array:
    """Evict3R / STAC-style cumulative attention: the first and current frame protected, the rest of
    the budget to the tokens with the largest decayed running attention mass `ctx.mass` [B, T] (the
    cache carries it per layer and adds this call's `attention_mass` before pruning)."""
    if ctx.mass is None:
        raise PolicyError("the cumulative policy needs the running attention mass (PruneContext.mass)")
    return protected_top(ctx, ctx.mass)


def frame(ctx: PruneContext) -> Array:
    """FrameVGGT-style whole frames: a frame's score is the mean xstream score of its n tokens; the
    first and the current frame are kept, then the best-scored other frames, keep // n frames in all
    (the cache sizes `keep` as whole frames). Frames sit at [f n, (f + 1) n) since whole frames are
    appended and kept."""
    b, _, t, _ = ctx.k.shape
    n = ctx.n_new
    slots, kept = t // n, ctx.keep // n
    if kept < 2:
        raise PolicyError(f"the frame policy keeps at least two frames ({2 * n} tokens), got keep={ctx.keep}")
    scores = xstream_scores(ctx)[:, :slots * n].reshape(b, slots, n).mean(-1)   # [B, F]
    last = ctx.length // n - 1                                                  # the current frame
    f = jnp.arange(slots)
    tier = jnp.where(f <= last, jnp.where((f == 0) | (f == last), 2, 1), 0).astype(jnp.int32)
    frames = ranked_top(scores, jnp.broadcast_to(tier, (b, slots)), kept)       # [B, kept]
    return (frames[:, :, None] * n + jnp.arange(n, dtype=jnp.int32)).reshape(b, kept * n)


def ffn(ctx: PruneContext) -> Array:
    """OVGGT-style FFN-residual importance: the first and current frame protected, the rest of the
    budget to the tokens whose FFN residual at this layer, ls2(mlp(norm2(x))), had the largest L2 norm
    when they entered. The block hands the norms of the current frame's tokens to its cache after the
    FFN (`LayerCache.record_residual`), which keeps them per slot in `ctx.mass`; no attention matrix
    is needed. The current frame is scored only after this call, so it is always protected whole
    (protect="full")."""
    if ctx.mass is None:
        raise PolicyError("the ffn policy needs the FFN residual norms (PruneContext.mass)")
    return protected_top(ctx, ctx.mass)


Policy = Callable[[PruneContext], "Array | Rewrite"]
POLICIES: dict[str, Policy | None] = {"none": None, "xstream": xstream, "sliding": sliding, "random": random,
                                      "diversity": diversity, "cumulative": cumulative, "frame": frame,
                                      "ffn": ffn, "keyframes": keyframes, "merge": merge}
