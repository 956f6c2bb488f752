"""KV-cache pruning policies: which cached tokens survive once a layer is over budget.

A policy is a pure function with one signature::

    policy(ctx: PruneContext) -> keep_idx  # int32 [B, keep], sorted (time order; see protected_top)

It is called after attention, on a layer buffer holding `length` valid tokens (the current frame's
`n_new` tokens last), and only takes effect when length > keep. Add a policy by writing such a function
and registering it in POLICIES; the model never needs to change. Every policy has fixed shapes and uses
`lax` only, so a stream traces once. n = `n_new` is a frame's tokens in the aggregator, 1 in the
camera trunk (each refinement iteration appends one token).

* `xstream` (XStreamVGGT): first + current frame, then the best pooled-query x head-mean key scores.
* `sliding`: the newest tokens; `random`: a random subset (baselines).
* `diversity` (InfiniteVGGT, Yuan et al. 2026, arXiv 2601.02281): the least redundant keys.
* `cumulative` (Evict3R; STAC): the tokens that received the most decayed attention so far.
* `frame` (FrameVGGT): whole frames by their mean xstream score.
* protection (`ctx.protect`, the scored token policies xstream, diversity, cumulative): "full" keeps
  the first and the current frame whole (XStreamVGGT's rule: a layer holds max(budget, 2n) tokens);
  "budget" keeps exactly `keep` tokens: when the two frames do not fit, only their special tokens plus
  a share of each frame (chosen by the policy's score) are protected, and the rest of the budget goes
  to the best-scored tokens anywhere, history included (`protected_top`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from xsvggt_jax.errors import ConfigError

Array = jax.Array

PROTECT = ("full", "budget")       # registry of protection modes (CacheConfig.protect)
MASS_POLICIES = ("cumulative",)    # policies whose layers carry a running attention mass [B, T]
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
    mass:     float32 [B, T] the decayed running attention mass of each slot, this call's included
              (`cumulative` only; None otherwise).
    protect:  static, a key of PROTECT: "full" | "budget" (see `protected_top`).
    protect_share: static, the budget share the first + current frame keep under protect="budget".
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


# -------------------------------------------------------------------------------------- protection
def ranked_top(scores: Array, tier: Array, count: int) -> Array:
    """Indices [B, count] of the best slots, sorted ascending: a higher tier always wins (tier 0 =
    invalid, never chosen while `count` valid slots exist), a higher score within a tier, the older
    slot on ties. One lexicographic sort. scores float [B, T]; tier int32 [B, T]."""
    slot = jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.int32), scores.shape)
    _, _, order = jax.lax.sort((-tier, -jnp.where(tier > 0, scores, -jnp.inf), slot), dimension=-1, num_keys=2)
    return jnp.sort(order[:, :count], axis=-1)


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
    b, t = scores.shape
    n, keep = ctx.n_new, ctx.keep
    pos = jnp.arange(t)
    valid = jnp.broadcast_to(pos < ctx.length, (b, t))
    cur_start = ctx.length - n
    if ctx.protect == "full" or 2 * n <= keep:
        protected = jnp.broadcast_to((pos < n) | (pos >= cur_start), (b, t))
        tier = jnp.where(valid, jnp.where(protected, 3, 2), 0).astype(jnp.int32)
        return ranked_top(scores, tier, keep)
    special = min(ctx.num_special, n)
    if 2 * special > keep:
        raise PolicyError(f"protect='budget' needs a budget of at least the special tokens of two frames "
                          f"({2 * special}), got {keep}")
    quota = min(n, max(special, int(ctx.protect_share * keep / 2)))
    first_extent = jnp.where(cur_start < keep, n, quota)   # never pruned before: the first frame is [0, n)
    first = _frame_quota_mask(scores, jnp.int32(0), first_extent, n, special, quota)
    protected = first | _frame_quota_mask(scores, cur_start, jnp.int32(n), n, special, quota)
    filler = jnp.broadcast_to(pos < first_extent, (b, t)) & ~protected
    tier = jnp.where(valid, jnp.where(protected, 3, jnp.where(filler, 1, 2)), 0).astype(jnp.int32)
    idx = ranked_top(scores, tier, keep)
    # the first frame's protected tokens lead the buffer ([0, q) on the next call), then time order
    lead = jnp.take_along_axis(first, idx, axis=1)
    return jnp.sort(jnp.where(lead, idx, idx + t), axis=-1) % t


# ------------------------------------------------------------------------------------------ scores
def xstream_scores(ctx: PruneContext) -> Array:
    """float32 [B, T]: XStreamVGGT's token score, mean over pooled queries of head-mean q . head-mean k."""
    q = head_mean(pool_queries(ctx.q_new, ctx.num_special, ctx.pool))  # [B, R, D]
    k = head_mean(ctx.k)                                                # [B, T, D]
    return jnp.einsum("brd,btd->brt", q, k, precision=_HIGHEST).mean(1)


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


Policy = Callable[[PruneContext], Array]
POLICIES: dict[str, Policy | None] = {"none": None, "xstream": xstream, "sliding": sliding, "random": random,
                                      "diversity": diversity, "cumulative": cumulative, "frame": frame}
