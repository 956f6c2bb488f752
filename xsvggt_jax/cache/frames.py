"""`keyframes`: a cache of K whole frames, after eStreamVGGT (UniverseXing/eStreamVGGT, policy
"anchor_recent_dino_diverse"), the camera-trunk cache pruned with it.

What it keeps, in every attention layer, K = max(2, floor(budget / n)) whole frames (n tokens a frame):
* the anchor: the stream's first frame;
* the recent frames: the R = max(1, floor(K / 2)) newest, the current frame included;
* diverse history: the other K - 1 - R frames, between the anchor and the recent frames. Every step
  appends one frame and drops one: the history frame whose feature is the most similar to a recent
  frame's (largest cosine similarity to any of the R recent frames; of two tied, the newer goes).

A frame's feature is its mean DINO patch token, L2-normalised (`frame_descriptor`), computed once a
step by the aggregator and handed to every layer's cache; each layer keeps the features of its
frames (`LayerKV.feat` [B, K + 1, C]). All layers, global and camera trunk, run the same selection
on the same features, so they keep the same frames: the camera trunk (one token a refinement
iteration) keeps those frames' `iterations` tokens each and prunes once a frame, after the frame's
last iteration, as eStreamVGGT trims the camera cache with the frame indices it chose for the
aggregator. The camera budget follows (K frames x iterations tokens); `camera_budget` is refused.

Layout: a layer's buffer holds F = K + 1 whole frames of f tokens each (f = n in the aggregator,
`iterations` in the camera trunk), frame i at [i f, (i + 1) f), kept in time order. It prunes when
the buffer is full of whole frames (length == F f) and keeps K f tokens; a call adding n < f tokens
(the camera trunk) fills the last frame first. Differences from eStreamVGGT: K comes from the
token budget here; eStreamVGGT keeps all frames before the cache first fills and trims after the
step, which is the same selection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xsvggt_jax.cache.ranking import PolicyError, PruneContext, ranked_top

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def frame_descriptor(patch_tokens: Array) -> Array:
    """float32 [B, C]: the feature of the newest frame of patch tokens [B, S, P, C], its mean patch
    token L2-normalised (eStreamVGGT's DINO frame feature)."""
    mean = patch_tokens[:, -1].astype(jnp.float32).mean(1)
    return mean * jax.lax.rsqrt(jnp.maximum(jnp.sum(mean * mean, -1, keepdims=True), 1e-12))


def recent_frames(kept: int) -> int:
    """Recent frames kept (the current one included) out of `kept` frames: max(1, kept // 2)."""
    return max(1, kept // 2)


def keyframes(ctx: PruneContext) -> Array:
    """[B, keep] kept indices: the anchor, the recent frames and the least redundant history frames,
    whole (see the module docstring). Called on a buffer of F whole frames of `ctx.frame_tokens`
    tokens with their features `ctx.frame_feat` [B, F, C]; keeps K = keep / frame_tokens of them."""
    if ctx.frame_feat is None or not ctx.frame_tokens:
        raise PolicyError("the keyframes policy needs the frames' features (PruneContext.frame_feat)")
    b, slots, _ = ctx.frame_feat.shape
    ft, kept = ctx.frame_tokens, ctx.keep // ctx.frame_tokens
    if kept < 2 or kept * ft != ctx.keep or kept >= slots:
        raise PolicyError(f"the keyframes policy keeps 2 to {slots - 1} whole frames of {ft} tokens, "
                          f"got keep={ctx.keep}")
    recent = jnp.arange(slots) >= slots - recent_frames(kept)                       # [F]
    sim = jnp.einsum("bfc,bgc->bfg", ctx.frame_feat, ctx.frame_feat, precision=_HIGHEST)
    redundancy = jnp.max(jnp.where(recent[None, None, :], sim, -jnp.inf), axis=-1)  # [B, F]
    f = jnp.arange(slots)
    tier = jnp.where((f == 0) | recent, 2, 1).astype(jnp.int32)
    frames = ranked_top(-redundancy, jnp.broadcast_to(tier, (b, slots)), kept)      # [B, K], time order
    return (frames[:, :, None] * ft + jnp.arange(ft, dtype=jnp.int32)).reshape(b, kept * ft)


def frame_layout(feat: Array, work: int, n_new: int) -> tuple[int, int, int]:
    """Static (frame_tokens, keep, hold) of a keyframes layer whose buffer attends over `work` slots
    and keeps `feat` [B, F, C]: frames of f = work / F tokens, K f tokens kept, pruned once the
    buffer holds `keep + hold + n_new` = F f tokens."""
    slots = feat.shape[1]
    ft = work // slots
    if ft * slots != work or ft < n_new:
        raise PolicyError(f"a keyframes layer of {work} slots cannot hold {slots} whole frames of >= {n_new} tokens")
    return ft, (slots - 1) * ft, ft - n_new


def write_feature(feat: Array, feature: Array | None, length: Array, frame_tokens: int) -> Array:
    """feat [B, F, C] with the current frame's `feature` [B, C] at its frame slot, length //
    frame_tokens (length: the tokens held before this call)."""
    if feature is None:
        raise PolicyError("the keyframes policy needs the current frame's feature from the model "
                          "(LayerCache.frame_feature)")
    return jax.lax.dynamic_update_slice_in_dim(feat, feature[:, None].astype(feat.dtype), length // frame_tokens, 1)


def keep_features(feat: Array, idx: Array, frame_tokens: int, pruned: Array) -> Array:
    """feat [B, F, C] after a prune that kept token indices idx [B, K f] (whole frames): the kept
    frames' features first, in order, then an empty slot; unchanged when `pruned` is False."""
    frames = idx[:, ::frame_tokens] // frame_tokens                                 # [B, K]
    kept = jnp.take_along_axis(feat, frames[:, :, None], axis=1)
    kept = jnp.pad(kept, ((0, 0), (0, feat.shape[1] - kept.shape[1]), (0, 0)))
    return jnp.where(pruned, kept, feat)
