"""A quantized layer's streaming attention read from its packed codes (`--attention packed`).

The dequantizing path (`core.update_layer`) decodes the whole stored cache to float K/V every call and
attends over [past; current]. Here the stored codes are handed to `attention.attend_packed` as they
are (`attention.packed.PackedKV`), and only the keys a cache keeps beside them are float:

* upstream's order: the past is the stored codes, all `length` of them (its per-channel groups are
  contiguous only without pruning: pruning moves single tokens between groups, which the fold cannot
  read, so a pruned per-channel layout in upstream's order is `unsupported`); float: the current frame;
* quantize once (`kivi`): the past's whole groups are codes; float: the window's tokens (fewer than
  `group`: K or V of a per-channel codec from the float window, a per-token codec's few codes decoded)
  and the current frame.

Same keys, same values (decoded from the same codes) as the dequantizing path, so the two agree to
float32 rounding (`tests/test_packed_attention.py`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from xsvggt_jax.attention.dispatch import attend_packed
from xsvggt_jax.attention.packed import PackedKV, unsupported as pair_unsupported
from xsvggt_jax.cache import kivi
from xsvggt_jax.cache.codec import Packed, PerChannel, take_rows

Array = jax.Array
Precision = jax.lax.Precision

__all__ = ["operand", "unsupported", "config_unsupported", "attend"]


def operand(p: Packed) -> PackedKV:
    """The attention kernels' view of stored codes (per-channel rows: slot // group)."""
    return PackedKV(p.codes, p.scale, p.zero, isinstance(p.codec, PerChannel), p.codec.bits, p.codec.group, p.dim)


def unsupported(kv: Any, cache_cfg: Any) -> Optional[str]:
    """Why this layer cannot attend to its packed codes (it then dequantizes), or None."""
    if not isinstance(kv.k, Packed):
        return "the layer's cache is not quantized"
    channel = isinstance(kv.k.codec, PerChannel) or isinstance(kv.v.codec, PerChannel)
    if channel and cache_cfg.pruned and not cache_cfg.quant_once:
        return ("upstream's order with pruning moves single tokens between per-channel groups; "
                "quantize once (quant_once) keeps whole groups")
    return pair_unsupported(operand(kv.k), operand(kv.v))


def config_unsupported(cache_cfg: Any) -> Optional[str]:
    """Why no layer of this configuration could attend to packed codes (a run option to refuse), or None."""
    layouts = [q for q in (cache_cfg.quant, cache_cfg.camera_quant) if q not in (None, "none")]
    if not layouts:
        return "it reads a quantized cache's codes: set --quant (or --camera-quant)"
    if cache_cfg.prune in ("merge", "keyframes"):  # they rewrite kept K/V / need the frame feature
        return f"the {cache_cfg.prune} policy is not supported with packed attention (use --attention auto)"
    if cache_cfg.pruned and not cache_cfg.quant_once and all(kivi.grouped(q) for q in layouts):
        return ("with a per-channel layout and pruning it needs --quant-once (upstream's order moves single "
                "tokens between per-channel groups)")
    return None


def _window(p: Packed, win: Optional[Array], start: Array, w: int, dtype) -> Array:
    """[B, H, w, D]: the window's tokens [start, start + w): the float window, or decoded codes."""
    if win is not None:
        return win.astype(dtype)
    b = p.codes.shape[0]
    idx = jnp.broadcast_to(jnp.minimum(start + jnp.arange(w, dtype=jnp.int32), p.slots - 1), (b, w))
    few = p.replace(codes=take_rows(p.codes, idx), scale=take_rows(p.scale, idx), zero=take_rows(p.zero, idx))
    return few.decode().astype(dtype)


def attend(kv: Any, length: Array, q: Array, k: Array, v: Array, cache_cfg: Any,
           precision: Precision = Precision.HIGHEST) -> Array:
    """Attention of this call's queries q [B, H, N, D] over the layer's stored tokens (packed) and
    this call's k, v [B, H, N, D] (float): [B, H, N, D] in q's dtype. kv: the layer's `LayerKV`
    before this call; length: its filled slots."""
    rest_k, rest_v, valid = k, v, jnp.ones((k.shape[2],), bool)
    packed_len = length
    window = max(kivi.window_slots(kv.k.codec), kivi.window_slots(kv.v.codec)) if cache_cfg.quant_once else 0
    if window:
        packed_len = length - length % kv.k.codec.group
        rest_k = jnp.concatenate([_window(kv.k, kv.k_win, packed_len, window, k.dtype), k], 2)
        rest_v = jnp.concatenate([_window(kv.v, kv.v_win, packed_len, window, v.dtype), v], 2)
        valid = jnp.concatenate([jnp.arange(window) < length - packed_len, valid])
    return attend_packed(q, operand(kv.k), operand(kv.v), packed_len, rest_k, rest_v, valid,
                         whole_groups=bool(window), precision=precision)
