"""Attention over packed low-bit K/V codes, without materialising float K or V.

A quantized cache stores x^ = scale * (code - zero) with scales and zero points per group: per channel
(`group` consecutive keys of one channel share them) or per token (`group` consecutive head dims of one
token share them). Attention needs q . k^ and p . v^, and both fold:

* K per channel, keys in contiguous groups (key t uses row t // group): for the keys of group r,
      q . k^_t = (q * s_r) . c_t - (q * s_r) . z_r,
  the scales fold into the queries (one [Nq, D] product per group) and the zero points into one bias
  per (query, key group);
* K per token (dims in groups j of `group`): q . k^_t = sum_j s_tj (q_j . c_tj - z_tj sum(q_j)): the
  scale multiplies the partial logits per key, the zero point is a bias per (query, key);
* V per token: sum_t p_t v^_t = sum_j [(p * s_.j) . c_.j - (p * s_.j) . z_.j]: the scales fold into the
  probabilities;
* V per channel (contiguous key groups r): sum_r s_r * (p_r . c_r - z_r sum(p_r)).

The codes are unpacked (shift and mask) inside the loop over key blocks, so only codes, scales and zero
points are read: K/V bytes per key fall from 2 x D x 4 (float32; 2 x D x 2 in bfloat16) to
2 x D x bits / 8 plus the group parameters.

`packed_lse` (pure JAX: an online softmax over key blocks, a `fori_loop` over the filled blocks only)
returns the partial softmax (out, lse) over the keys [0, length) of a `PackedKV` pair, to be merged by
log-sum-exp with the float keys a cache keeps beside its codes (the current frame, a quantize-once
window: `dispatch.attend_packed`). It equals dequantize-then-attend to float32 rounding on every layout
(kcvt, ktvt, kcvc, ktvc) and code width (2, 4, 8). `attention.pallas_packed` is the same computation as
a Pallas kernel. Per-channel codecs need contiguous key groups (`PackedKV` says so): a quantize-once
cache and upstream's order without pruning have them; upstream's order with pruning moves single tokens
between groups (a per-token group index), which this fold cannot read (`unsupported`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from xsvggt_jax.attention.masks import NEG_INF

Array = jax.Array
Precision = jax.lax.Precision

KEY_BLOCK = 128   # keys per block of a per-token layout (a per-channel layout walks whole groups)


class PackedKV(NamedTuple):
    """One packed operand (K or V) of [B, H, T, D] tokens.

    codes: uint8 [B, H, T, ceil(D * bits / 8)], 8 // bits codes a byte along D, the first in the low bits.
    scale, zero: float / integer-valued group parameters: per channel [B, H, ceil(T / group), D] (key t
        uses row t // group: contiguous groups); per token [B, H, T, ceil(D / group)].
    per_channel, bits, group, dim: static layout (dim = D).
    """

    codes: Array
    scale: Array
    zero: Array
    per_channel: bool
    bits: int
    group: int
    dim: int

    @property
    def slots(self) -> int:
        return self.codes.shape[2]


def unsupported(k: PackedKV, v: PackedKV) -> Optional[str]:
    """Why this pair cannot be attended packed, or None."""
    if k.bits not in (2, 4, 8) or v.bits not in (2, 4, 8):
        return f"code widths {k.bits}/{v.bits} are not 2, 4 or 8"
    if k.slots != v.slots or k.dim != v.dim:
        return "K and V hold different tokens"
    if k.per_channel and v.per_channel and k.group != v.group:
        return f"K and V per-channel groups differ ({k.group} vs {v.group})"
    return None


def key_block(k: PackedKV, v: PackedKV) -> int:
    """Keys per block: one per-channel group, else KEY_BLOCK or the largest power of two within the slots."""
    if k.per_channel or v.per_channel:
        return k.group if k.per_channel else v.group
    return min(KEY_BLOCK, 1 << max(0, k.slots.bit_length() - 1))


def unpack_codes(codes: Array, bits: int, dim: int) -> Array:
    """uint8 [..., ceil(dim * bits / 8)] -> float32 [..., dim] codes (shift and mask, no table)."""
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    c = (codes[..., None] >> shifts) & jnp.uint8(2**bits - 1)                  # [..., m, per]
    return c.reshape(*codes.shape[:-1], -1)[..., :dim].astype(jnp.float32)


def _dim_groups(x: Array, group: int, dim: int) -> Array:
    """[..., D] -> [..., Gd, group] (zero-padded to whole dim groups)."""
    gd = -(-dim // group)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, gd * group - dim)])
    return x.reshape(*x.shape[:-1], gd, group)


def _slice(x: Array, start: Array, size: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=2)


def _logits(q: Array, k: PackedKV, start: Array, kb: int, precision: Precision) -> Array:
    """float32 [B, H, Nq, kb]: (scaled) q . k^ for the keys [start, start + kb)."""
    c = unpack_codes(_slice(k.codes, start, kb), k.bits, k.dim)                 # [B, H, kb, D]
    b, h, nq, d = q.shape
    if k.per_channel:
        m, g = kb // k.group, k.group
        s = _slice(k.scale, start // g, m).astype(jnp.float32)                  # [B, H, m, D]
        z = _slice(k.zero, start // g, m).astype(jnp.float32)
        qs = q[:, :, :, None, :] * s[:, :, None]                                # [B, H, Nq, m, D]: scales folded
        dot = jnp.einsum("bhqmd,bhmjd->bhqmj", qs, c.reshape(b, h, m, g, d), precision=precision)
        bias = jnp.einsum("bhqmd,bhmd->bhqm", qs, z, precision=precision)     # one per (query, key group)
        return (dot - bias[..., None]).reshape(b, h, nq, kb)
    s = _slice(k.scale, start, kb).astype(jnp.float32)                          # [B, H, kb, Gd]
    z = _slice(k.zero, start, kb).astype(jnp.float32)
    qg = _dim_groups(q, k.group, d)                                             # [B, H, Nq, Gd, g]
    part = jnp.einsum("bhqjd,bhtjd->bhqtj", qg, _dim_groups(c, k.group, d), precision=precision)
    return (jnp.einsum("bhqtj,bhtj->bhqt", part, s, precision=precision)
            - jnp.einsum("bhqj,bhtj->bhqt", qg.sum(-1), s * z, precision=precision))


def _values(p: Array, v: PackedKV, start: Array, kb: int, precision: Precision) -> Array:
    """float32 [B, H, Nq, D]: p [B, H, Nq, kb] times v^ of the keys [start, start + kb)."""
    c = unpack_codes(_slice(v.codes, start, kb), v.bits, v.dim)                 # [B, H, kb, D]
    b, h, nq, _ = p.shape
    d = v.dim
    if v.per_channel:
        m, g = kb // v.group, v.group
        s = _slice(v.scale, start // g, m).astype(jnp.float32)                  # [B, H, m, D]
        z = _slice(v.zero, start // g, m).astype(jnp.float32)
        pm = p.reshape(b, h, nq, m, g)
        pc = jnp.einsum("bhqmj,bhmjd->bhqmd", pm, c.reshape(b, h, m, g, d), precision=precision)
        return (jnp.einsum("bhqmd,bhmd->bhqd", pc, s, precision=precision)
                - jnp.einsum("bhqm,bhmd->bhqd", pm.sum(-1), s * z, precision=precision))
    s = _slice(v.scale, start, kb).astype(jnp.float32)                          # [B, H, kb, Gd]
    z = _slice(v.zero, start, kb).astype(jnp.float32)
    ps = p[..., None] * s[:, :, None]                                           # [B, H, Nq, kb, Gd]: folded
    out = (jnp.einsum("bhqtj,bhtjd->bhqjd", ps, _dim_groups(c, v.group, d), precision=precision)
           - jnp.einsum("bhqtj,bhtj->bhqj", ps, z, precision=precision)[..., None])
    return out.reshape(b, h, nq, -1)[..., :d]


def padded(x: PackedKV, slots: int) -> PackedKV:
    """x with its tokens (and per-channel rows) zero-padded to `slots` (a multiple of a per-channel group)."""
    pad = lambda a, n: jnp.pad(a, ((0, 0), (0, 0), (0, n - a.shape[2]), (0, 0))) if a.shape[2] < n else a
    return x._replace(codes=pad(x.codes, slots), scale=pad(x.scale, -(-slots // x.group) if x.per_channel else slots),
                      zero=pad(x.zero, -(-slots // x.group) if x.per_channel else slots))


def blocked(k: PackedKV, v: PackedKV, whole_groups: bool = False) -> tuple[PackedKV, PackedKV, int]:
    """(k, v, kb): the key block and the operands, padded only where a block would not fit.

    Blocks start at i * kb, the last one moved back to end at the last slot (`block_start`): no
    out-of-bounds read, no padding. A per-channel block is one whole group and must not move: the
    operands are padded to whole groups unless `whole_groups` (the caller attends to whole groups
    only, `length` a multiple of the group: a quantize-once cache) or the slots are whole groups."""
    reason = unsupported(k, v)
    if reason:
        raise ValueError(f"packed attention: {reason}")
    kb = key_block(k, v)
    slots = max(kb, k.slots)
    if (k.per_channel or v.per_channel) and not whole_groups:
        slots = -(-slots // kb) * kb
    if slots != k.slots:
        k, v = padded(k, slots), padded(v, slots)
    return k, v, kb


def block_start(i: Array, kb: int, slots: int) -> Array:
    """Start of key block i: i * kb, the last block moved back to end at `slots` (its keys before
    i * kb were counted by the previous block and are masked)."""
    return jnp.minimum(i * kb, slots - kb)


def packed_lse(q: Array, k: PackedKV, v: PackedKV, length: Array, *, whole_groups: bool = False,
               precision: Precision = Precision.HIGHEST) -> tuple[Array, Array]:
    """Partial softmax of q [B, H, Nq, D] over the packed keys [0, length): (out float32 [B, H, Nq, D],
    lse float32 [B, H, Nq]), lse -inf and out 0 for no key. Equal to `kernels.attend_xla_lse` over the
    decoded K/V under `KeyPrefix(length)` to float32 rounding. whole_groups: see `blocked`."""
    k, v, kb = blocked(k, v, whole_groups)
    qf = q.astype(jnp.float32) * q.shape[-1] ** -0.5
    b, h, nq, d = q.shape
    blocks = jnp.minimum((length + kb - 1) // kb, -(-k.slots // kb))

    def body(i, carry):
        m, l, acc = carry
        start = block_start(i, kb, k.slots)
        logits = _logits(qf, k, start, kb, precision)
        key = start + jnp.arange(kb)
        logits = jnp.where((key >= i * kb) & (key < length), logits, NEG_INF)
        m_new = jnp.maximum(m, logits.max(-1))
        safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.exp(logits - safe[..., None])
        corr = jnp.exp(m - safe)
        return m_new, corr * l + p.sum(-1), corr[..., None] * acc + _values(p, v, start, kb, precision)

    init = (jnp.full((b, h, nq), NEG_INF, jnp.float32), jnp.zeros((b, h, nq), jnp.float32),
            jnp.zeros((b, h, nq, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, blocks, body, init)
    m_safe = jnp.where(m == NEG_INF, 0.0, m)
    lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), NEG_INF)
    return acc / jnp.where(l > 0, l, 1.0)[..., None], lse


def bytes_read(k: PackedKV, v: PackedKV, length: int) -> int:
    """Bytes of codes and group parameters the packed path reads for `length` keys (per call)."""
    total = 0
    for x in (k, v):
        per_key = x.codes.shape[0] * x.codes.shape[1] * x.codes.shape[3]
        rows = -(-length // x.group) if x.per_channel else length
        params = x.scale.shape[0] * x.scale.shape[1] * x.scale.shape[3] * (x.scale.dtype.itemsize
                                                                            + x.zero.dtype.itemsize)
        total += per_key * length + params * rows
    return total


__all__ = ["KEY_BLOCK", "PackedKV", "unsupported", "key_block", "unpack_codes", "padded", "blocked", "block_start",
           "packed_lse", "bytes_read"]
