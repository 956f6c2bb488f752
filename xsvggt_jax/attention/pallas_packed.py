"""`attention.packed`'s attention over packed K/V codes as one Pallas kernel (GPU; interpret mode on CPU).

One program per (batch x head, block of queries) walks the filled key blocks with an online softmax,
reading only codes (uint8), scales and zero points: a block's codes are unpacked in registers by shift
and mask, one code phase at a time, so no interleave is needed. Phase j of a byte holds the head dims
d = byte * (8 // bits) + j; the queries and the per-channel scales are split into those phases outside
the kernel (small arrays), and the output comes back phase by phase and is interleaved outside.

* K per channel: one block is one group of `group` keys; per phase (q_j * s_j) . c_j, minus the bias
  (q_j * s_j) . z_j of the (query, group);
* K per token (one dim group: group >= head dim): s_t (q . c_t) - s_t z_t sum(q);
* V per token: the probabilities times s_t, then (p s) . c_j - (p s) . z;
* V per channel: s_j (p . c_j - z_j sum(p)) per group.

Written for the Triton back end (2-D dots, block sides >= 16 and powers of two: head dims 16 x bits / 4
and more, groups of 16, 32, 64 or 128 keys, per-token codecs with group >= head dim; `unfit` says why
not), never reading past the slots (the last key block moves back, as in `packed.block_start`). TPU
runs `packed.packed_lse`. Tested in interpret mode against dequantize-then-attend; not yet timed on a
GPU (benchmarks/device_run.sh).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from xsvggt_jax.attention.packed import PackedKV, block_start, blocked, key_block

Array = jax.Array

QUERY_BLOCK = 64
_NEG = -1e30      # finite "minus infinity" inside the kernel (no inf - inf)


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def unfit(k: PackedKV, v: PackedKV) -> Optional[str]:
    """Why the kernel cannot take this pair (then `packed.packed_lse` runs), or None."""
    if k.bits != v.bits:
        return f"K and V code widths differ ({k.bits} vs {v.bits})"
    for name, x in (("K", k), ("V", v)):
        if not x.per_channel and x.group < x.dim:
            return f"{name} per token in {-(-x.dim // x.group)} dim groups (the kernel takes one: group >= head dim)"
    kb = key_block(k, v)
    if not _pow2(kb):
        return f"key blocks of {kb} (the kernel takes 16, 32, 64, 128 ...: per-channel groups of those)"
    if not _pow2(-(-k.dim * k.bits // 8)):
        return f"{-(-k.dim * k.bits // 8)} code bytes a token (the kernel takes 16, 32, 64 ...)"
    return None


def _phase(x: Array, per: int) -> Array:
    """[..., D] -> [..., per, D / per]: head dim d = byte * per + j goes to phase j (D padded to whole bytes)."""
    d = x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -(-d // per) * per - d)])
    x = x.reshape(*x.shape[:-1], -1, per)
    return jnp.moveaxis(x, -1, -2)


def _kernel(len_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, o_ref, lse_ref, *, per: int,
            bits: int, kb: int, slots: int, k_channel: bool, v_channel: bool):
    length = len_ref[()]
    mask = jnp.uint8(2**bits - 1)
    q = [q_ref[j] for j in range(per)]                                   # per x [BQ, Dp]
    bq = q[0].shape[0]
    dot = functools.partial(jax.lax.dot_general, precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
    nt = (((1,), (1,)), ((), ()))     # a [M, K] x b [N, K] -> [M, N]
    nn = (((1,), (0,)), ((), ()))     # a [M, K] x b [K, N] -> [M, N]

    def codes(ref, start, j):
        return ((ref[pl.ds(start, kb), :] >> jnp.uint8(j * bits)) & mask).astype(jnp.float32)  # [kb, Dp]

    def body(i, carry):
        m, l, acc = carry
        start = block_start(i, kb, slots)
        row = start // kb
        if k_channel:   # scales folded into the queries, zero points into one bias per (query, group)
            logits, bias = jnp.zeros((bq, kb), jnp.float32), jnp.zeros((bq,), jnp.float32)
            for j in range(per):
                qs = q[j] * ks_ref[j, pl.ds(row, 1), :]                           # [BQ, Dp]
                logits += dot(qs, codes(kc_ref, start, j), nt)
                bias += jnp.sum(qs * kz_ref[j, pl.ds(row, 1), :], axis=1)
            logits -= bias[:, None]
        else:           # per token: s_t (q . c_t) - s_t z_t sum(q)
            s, z = ks_ref[pl.ds(start, kb)], kz_ref[pl.ds(start, kb)]            # [kb]
            raw = sum(dot(q[j], codes(kc_ref, start, j), nt) for j in range(per))
            qsum = sum(jnp.sum(q[j], axis=1) for j in range(per))
            logits = raw * s[None, :] - qsum[:, None] * (s * z)[None, :]
        key = start + jax.lax.broadcasted_iota(jnp.int32, (bq, kb), 1)
        logits = jnp.where((key >= i * kb) & (key < length), logits, _NEG)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        p = jnp.exp(logits - m_new[:, None])
        corr = jnp.exp(m - m_new)
        if v_channel:   # per group: s (p . c - z sum(p))
            psum = jnp.sum(p, axis=1)
            new = [vs_ref[j, pl.ds(row, 1), :] * (dot(p, codes(vc_ref, start, j), nn)
                                                  - vz_ref[j, pl.ds(row, 1), :] * psum[:, None]) for j in range(per)]
        else:           # per token: scales folded into the probabilities
            ps = p * vs_ref[pl.ds(start, kb)][None, :]
            pz = jnp.sum(ps * vz_ref[pl.ds(start, kb)][None, :], axis=1)
            new = [dot(ps, codes(vc_ref, start, j), nn) - pz[:, None] for j in range(per)]
        return m_new, corr * l + jnp.sum(p, axis=1), tuple(corr[:, None] * a + n for a, n in zip(acc, new))

    blocks = jnp.minimum((length + kb - 1) // kb, -(-slots // kb))
    init = (jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
            tuple(jnp.zeros_like(x) for x in q))
    m, l, acc = jax.lax.fori_loop(0, blocks, body, init)
    inv = 1.0 / jnp.where(l > 0, l, 1.0)
    for j in range(per):
        o_ref[j] = acc[j] * inv[:, None]
    lse_ref[...] = m + jnp.log(jnp.where(l > 0, l, 1.0))


def _params(x: PackedKV, per: int, bh: int) -> tuple[Array, Array]:
    """Group parameters as the kernel reads them: per channel [BH, per, rows, Dp]; per token [BH, T]."""
    if x.per_channel:
        f = lambda a: _phase(a.astype(jnp.float32), per).transpose(0, 1, 3, 2, 4).reshape(bh, per, a.shape[2], -1)
    else:
        f = lambda a: a.astype(jnp.float32).reshape(bh, a.shape[2])
    return f(x.scale), f(x.zero)


def packed_lse_pallas(q: Array, k: PackedKV, v: PackedKV, length: Array, *, whole_groups: bool = False,
                      interpret: bool = False, query_block: int = QUERY_BLOCK) -> tuple[Array, Array]:
    """`packed.packed_lse` as a Pallas kernel: (out float32 [B, H, Nq, D], lse float32 [B, H, Nq]).
    The pair must fit (`unfit` is None). interpret: Pallas interpret mode (CPU)."""
    reason = unfit(k, v)
    if reason:
        raise ValueError(f"packed attention kernel: {reason}")
    k, v, kb = blocked(k, v, whole_groups)
    b, h, nq, d = q.shape
    bh, per, slots = b * h, 8 // k.bits, k.slots
    dp = k.codes.shape[-1]
    bq = min(query_block, max(16, pl.next_power_of_2(nq)))
    nq_pad = -(-nq // bq) * bq
    qf = q.astype(jnp.float32) * d ** -0.5
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, nq_pad - nq), (0, 0)))
    qp = _phase(qf, per).transpose(0, 1, 3, 2, 4).reshape(bh, per, nq_pad, dp)    # [BH, per, Nq, Dp]
    ks, kz = _params(k, per, bh)
    vs, vz = _params(v, per, bh)
    length = jnp.asarray(length, jnp.int32)

    def spec(x):
        nd = x.ndim
        return pl.BlockSpec((None, *x.shape[1:]), lambda i, j: (i,) + (0,) * (nd - 1))

    args = (qp, k.codes.reshape(bh, slots, dp), ks, kz, v.codes.reshape(bh, slots, dp), vs, vz)
    kernel = functools.partial(_kernel, per=per, bits=k.bits, kb=kb, slots=slots, k_channel=k.per_channel,
                               v_channel=v.per_channel)
    o, lse = pl.pallas_call(
        kernel, grid=(bh, nq_pad // bq),
        in_specs=[pl.BlockSpec((), lambda i, j: ()),
                  pl.BlockSpec((None, per, bq, dp), lambda i, j: (i, 0, j, 0)),
                  *(spec(x) for x in args[1:])],
        out_specs=[pl.BlockSpec((None, per, bq, dp), lambda i, j: (i, 0, j, 0)),
                   pl.BlockSpec((None, bq), lambda i, j: (i, j))],
        out_shape=[jax.ShapeDtypeStruct((bh, per, nq_pad, dp), jnp.float32),
                   jax.ShapeDtypeStruct((bh, nq_pad), jnp.float32)],
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="packed_attention",
    )(length, *args)
    o = o.reshape(b, h, per, nq_pad, dp)[:, :, :, :nq].transpose(0, 1, 3, 4, 2).reshape(b, h, nq, -1)[..., :d]
    lse = lse.reshape(b, h, nq_pad)[:, :, :nq]
    some = length > 0
    return jnp.where(some, o, 0.0), jnp.where(some, lse, -jnp.inf)


__all__ = ["QUERY_BLOCK", "unfit", "packed_lse_pallas"]
