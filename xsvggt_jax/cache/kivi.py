"""Quantize once (KIVI, Liu et al. 2024, arXiv 2402.02750): each token's K/V is quantized when it enters
the cache and its codes never change (`CacheConfig.quant_once`).

Upstream's order (`cache.core`, the default) re-quantizes the whole cache [past; current] every step, so
a token's codes drift as its group's range changes; here a token is encoded exactly once:

* a per-token codec (`codec.PerToken`, groups of head dims of one token) encodes the token when it
  enters;
* a per-channel codec (`codec.PerChannel`, groups of `group` consecutive tokens of one channel) needs
  `group` tokens before it can encode them: the newest r = length % group tokens wait, in float, in a
  residual window (`LayerKV.k_win` / `v_win`, [B, H, group - 1, D] in the cache dtype), and a group is
  encoded the step it fills.

Layout (fixed shapes): a layer's tokens sit at slots [0, length) in arrival order. With a per-channel
codec the first nq = length - r slots are whole groups, group j at slots [j * group, (j + 1) * group)
with its scale/zero row j (so `Packed.group_of` is constant, slot // group), and the window's tokens
are slots [nq, length) (their per-token codes, e.g. V under KCVT, are already in place).

A step appends the current frame's n tokens: per-token codes are written at [length, length + n);
per-channel, the buffer [window; new] (r + n tokens) is quantized in groups of `group` from slot nq,
its full groups' codes and rows written, and the rest (fewer than `group` tokens) becomes the new
window. The current frame attends in float to itself (as upstream: the dequantizing path attends to
[decoded past; window; current]), and is stored as codes for the next step.

Pruning keeps or drops whole codes. Per token (KTVT) that is any token. With per-channel groups the
unit is the whole group: a group's `group` tokens share one scale and zero point per channel, so a
kept token either keeps its group's row or would need re-encoding (its codes change: not quantize-once).
Keeping tokens of partly dropped groups would need a row per surviving group (up to one per token:
the scale bytes would exceed the codes'), and scattered rows break the contiguous key groups that let
packed attention fold K's scales into the queries (`attention.packed`). So the layer runs the policy
as usual (it picks `keep` tokens), gives every whole group the number of tokens the policy kept from
it (its votes), and keeps the best-voted groups (ties: the newer), as many as fit beside the window:
kept groups x group + r <= keep, never over budget. The window (the newest tokens) is always kept.
A protected frame is thereby kept whole up to its boundary groups, which compete by their votes; the
`frame` policy (whole frames, which need not align with groups) is refused with per-channel layouts.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from xsvggt_jax.cache import quant
from xsvggt_jax.cache.codec import LAYOUTS, Codec, Packed, PerChannel, take_rows
from xsvggt_jax.errors import ConfigError

Array = jax.Array

__all__ = ["grouped", "check_config", "window_slots", "empty_layer", "view", "stage", "survivors",
           "stored", "quantized_slots"]


def grouped(layout: str) -> bool:
    """A quantization layout with a per-channel codec (K or V): tokens are encoded a group at a time."""
    return layout != "none" and any(c is PerChannel for c in LAYOUTS[layout])


def check_config(cache_cfg: Any) -> None:
    """ConfigError for a `CacheConfig` whose quant_once cannot apply."""
    layouts = [q for q in (cache_cfg.quant, cache_cfg.camera_quant) if q not in (None, "none")]
    if not layouts:
        raise ConfigError("quant_once", "applies to a quantized cache: set quant (or camera_quant)")
    if cache_cfg.prune == "frame" and any(grouped(q) for q in layouts):
        raise ConfigError("quant_once with prune='frame': whole frames and whole per-channel groups of "
                          f"{cache_cfg.group} tokens do not align (use a per-token layout, ktvt, or another policy)")
    if cache_cfg.prune in ("merge", "keyframes"):
        raise ConfigError(f"quant_once with prune={cache_cfg.prune!r}: "
                          + ("merge rewrites kept tokens' K/V, so their codes would change"
                             if cache_cfg.prune == "merge" else
                             "keyframes grows a layer past its budget within a frame and keeps whole frames, "
                             "which whole per-channel groups do not follow")
                          + " (use upstream's order, or another policy)")
    if cache_cfg.prune == "none":
        return
    # a pruned layer keeps at least its budget (`CacheConfig.keep`; frame is refused above)
    budgets = [("budget", cache_cfg.budget, cache_cfg.quant),
               ("camera_budget" if cache_cfg.camera_budget else "budget", cache_cfg.camera_budget or cache_cfg.budget,
                cache_cfg.camera_quant or cache_cfg.quant)]
    for name, budget, layout in budgets:
        if grouped(layout) and budget < cache_cfg.group:
            raise ConfigError(f"quant_once keeps whole groups of {cache_cfg.group} tokens beside a float window of "
                              f"fewer than {cache_cfg.group}: {name} {budget} cannot hold one group (raise it or "
                              "lower group)")


def window_slots(codec: Codec) -> int:
    """Float window slots of a codec: group - 1 per channel, none per token."""
    return codec.group - 1 if isinstance(codec, PerChannel) else 0


def _rows(codec: Codec, slots: int) -> int:
    return -(-slots // codec.group)


def _empty(codec: Codec, b: int, h: int, t: int, d: int) -> Packed:
    p = codec.empty(b, h, t, d, _rows(codec, t))
    if isinstance(codec, PerChannel):  # constant: slot s uses row s // group
        p = p.replace(group_of=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) // codec.group, (b, t)))
    return p


def _window(codec: Codec, b: int, h: int, d: int, dtype) -> Optional[Array]:
    w = window_slots(codec)
    return jnp.zeros((b, h, w, d), dtype) if w else None  # no zero-size leaf: orbax refuses those


def empty_layer(codecs: tuple[Codec, Codec], b: int, h: int, t: int, d: int, dtype) -> dict:
    """The fields of an empty quantize-once `LayerKV` of t slots: k, v (Packed), k_win, v_win."""
    kc, vc = codecs
    return {"k": _empty(kc, b, h, t, d), "v": _empty(vc, b, h, t, d),
            "k_win": _window(kc, b, h, d, dtype), "v_win": _window(vc, b, h, d, dtype)}


def quantized_slots(codec: Codec, length: Array) -> Array:
    """Slots [0, this) hold encoded tokens: all `length` per token, whole groups per channel."""
    return length - length % codec.group if isinstance(codec, PerChannel) else length


def _pad(x: Array, size: int, axis: int) -> Array:
    if x.shape[axis] >= size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _write(x: Array, new: Array, start: Array, axis: int) -> Array:
    """x with `new` written at `start` along `axis`, cut to x's length (what does not fit is dropped;
    `dynamic_update_slice` alone would move the start back to make it fit)."""
    size = x.shape[axis]
    y = jax.lax.dynamic_update_slice_in_dim(_pad(x, size + new.shape[axis], axis), new.astype(x.dtype), start, axis)
    return jax.lax.slice_in_dim(y, 0, size, axis=axis)


def _decoded(p: Packed, valid: Array, work: int, dtype) -> Array:
    """[B, H, work, D]: the stored tokens decoded where slot < valid, zeros elsewhere."""
    x = jnp.where((jnp.arange(p.slots) < valid)[:, None], p.decode(), 0.0).astype(dtype)
    return _pad(x, work, 2)


def _append_tokens(p: Packed, new: Array, length: Array, work: int) -> Packed:
    """Per token: the new tokens encoded once and written at [length, length + n) of `work` slots."""
    enc = p.codec.encode(new)
    put = lambda old, fresh: _write(_pad(old, work, 2), fresh, length, 2)
    return p.replace(codes=put(p.codes, enc.codes), scale=put(p.scale, enc.scale), zero=put(p.zero, enc.zero))


def _append_groups(p: Packed, win: Optional[Array], new: Array, length: Array,
                   work: int) -> tuple[Packed, Optional[Array]]:
    """Per channel: [window; new] quantized in groups of `group` from slot nq = length - r; its full
    groups' codes written at slots [nq, ...) and their rows at nq / group; the rest is the new window."""
    codec = p.codec
    g, w = codec.group, window_slots(codec)
    b, h, n, d = new.shape
    r = length % g
    nq = length - r
    buf = jnp.zeros((b, h, w + n, d), jnp.float32)
    if w:
        buf = buf.at[:, :, :w].set(jnp.where((jnp.arange(w) < r)[:, None], win, 0).astype(jnp.float32))
    buf = jax.lax.dynamic_update_slice_in_dim(buf, new.astype(jnp.float32), r, 2)   # [window (r); new (n); 0]
    codes, scale, zero = quant.quantize(buf, codec.bits, g, axis=-2)                # groups from slot nq
    # slots past the full groups get the codes of partial groups: not tokens' codes yet (window / free),
    # overwritten when their group fills; encoded slots [0, nq) are never written
    codes = _write(_pad(p.codes, work, 2), quant.pack(codes, codec.bits), nq, 2)
    rows = _rows(codec, work)
    put = lambda old, fresh: _write(_pad(old, rows, 2), fresh.astype(old.dtype), nq // g, 2)
    out = p.replace(codes=codes, scale=put(p.scale, scale), zero=put(p.zero, zero),
                    group_of=jnp.broadcast_to(jnp.arange(work, dtype=jnp.int32) // g, (b, work)))
    if not w:
        return out, None
    full = (r + n) // g * g
    rest = jax.lax.dynamic_slice_in_dim(_pad(buf, w + n + w, 2), full, w, 2)        # [B, H, w, D]
    rest = jnp.where((jnp.arange(w) < r + n - full)[:, None], rest, 0.0)
    return out, rest.astype(win.dtype)


def _append(p: Packed, win: Optional[Array], new: Array, length: Array, work: int):
    if isinstance(p.codec, PerChannel):
        return _append_groups(p, win, new, length, work)
    return _append_tokens(p, new, length, work), None


def view(p: Packed, win: Optional[Array], new: Array, length: Array, work: int) -> Array:
    """[B, H, work, D] what the dequantizing path attends to: encoded tokens decoded, the window's
    floats, the current tokens at [length, length + n), zeros after."""
    nq = quantized_slots(p.codec, length)
    x = _decoded(p, nq, work, new.dtype)
    if win is not None:
        x = _write(x, win, nq, 2)   # its slots past the window are zeros, then overwritten by `new`
    return _write(x, new, length, 2)


def stage(kv: Any, length: Array, k: Array, v: Array, work: int) -> tuple[Array, Array, dict]:
    """One call's append. kv: the layer's `LayerKV` (k, v Packed; k_win, v_win windows); k, v
    [B, H, n, D] the current tokens. Returns (k_att, v_att [B, H, work, D] float views to attend over,
    the staged fields k, v (Packed over `work` slots), k_win, v_win holding length + n tokens)."""
    k_att, v_att = view(kv.k, kv.k_win, k, length, work), view(kv.v, kv.v_win, v, length, work)
    sk, k_win = _append(kv.k, kv.k_win, k, length, work)
    sv, v_win = _append(kv.v, kv.v_win, v, length, work)
    return k_att, v_att, {"k": sk, "v": sv, "k_win": k_win, "v_win": v_win}


def survivors(staged: dict, idx: Array, end: Array, keep: int, slots: int) -> tuple[Array, Array]:
    """The `slots` stored slots after pruning: (source slot of each, int32 [B, slots]; new length).

    idx [B, keep]: the tokens the policy keeps of the `end` staged ones (only applied when end > keep).
    Per-token layouts keep them (then the free slots); per-channel layouts keep whole groups by the
    policy's votes and the window (module docstring)."""
    b = idx.shape[0]
    ident = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, slots))
    codecs = (staged["k"].codec, staged["v"].codec)
    if not any(isinstance(c, PerChannel) for c in codecs):
        tail = jnp.broadcast_to(jnp.arange(keep, slots, dtype=jnp.int32), (b, slots - keep))
        return jnp.where(end > keep, jnp.concatenate([idx, tail], -1), ident), jnp.minimum(end, keep)
    g = codecs[0].group
    work = staged["k"].slots
    groups = -(-work // g)
    ng, r = end // g, end % g
    votes = jax.vmap(lambda i: jnp.zeros(groups, jnp.int32).at[i // g].add((i < ng * g).astype(jnp.int32)))(idx)
    gid = jnp.broadcast_to(jnp.arange(groups, dtype=jnp.int32), (b, groups))
    # preference: formed groups first, then more votes, then the newer
    _, _, _, order = jax.lax.sort(((gid >= ng).astype(jnp.int32), -votes, -gid, gid), dimension=-1, num_keys=3)
    rank = jnp.argsort(order, axis=-1)
    count = jnp.minimum(ng, (keep - r) // g)                                     # groups kept
    kept = jnp.sort(jnp.where(rank < count, gid, groups), axis=-1)               # [B, groups] ascending
    s = jnp.arange(slots, dtype=jnp.int32)
    from_group = jnp.take_along_axis(kept, jnp.minimum(s // g, groups - 1)[None].repeat(b, 0), -1) * g + s % g
    from_window = ng * g + s - count * g
    pruned = jnp.where(s < count * g, from_group, jnp.where(s < count * g + r, from_window, s))
    pruned = jnp.clip(pruned, 0, work - 1).astype(jnp.int32)
    return jnp.where(end > keep, pruned, ident), jnp.where(end > keep, count * g + r, end)


def _take(p: Packed, idx: Array, slots: int) -> Packed:
    if not isinstance(p.codec, PerChannel):
        return p.codec.take(p, idx)
    g = p.codec.group
    rows = take_rows(p.scale, idx[:, ::g] // g), take_rows(p.zero, idx[:, ::g] // g)  # a kept group's row
    return p.replace(codes=take_rows(p.codes, idx), scale=rows[0], zero=rows[1], group_of=p.group_of[:, :slots])


def stored(staged: dict, idx: Optional[Array], slots: int) -> dict:
    """The fields of the next `LayerKV`: the staged tokens idx [B, slots] (None: all, no pruning)."""
    if idx is None:
        return staged
    return {**staged, "k": _take(staged["k"], idx, slots), "v": _take(staged["v"], idx, slots)}
