"""KV-cache quantization: upstream XStreamVGGT's group-wise asymmetric ("fake") quantizer, plus
bit packing of the integer codes.

Quantizer (ported exactly from the PyTorch reference). The quantized axis of length L is cut into
n_groups = ceil(L / group) groups of `group` consecutive elements; a short last group is
zero-padded to `group` and THE PADDED ZEROS COUNT in its min/max. Per group:

    maxq  = 2**bits - 1
    scale = max((xmax - xmin) / maxq, eps)       eps = 1e-12 (1e-6 for float16/bfloat16 inputs)
    zero  = clip(nan_to_num(round(-xmin / scale), nan=0, posinf=maxq, neginf=0), 0, maxq)
    q     = clip(nan_to_num(round(x / scale) + zero, nan=0, posinf=maxq, neginf=0), 0, maxq)
    x^    = scale * (q - zero)

`round` is round-half-to-even (torch.round == jnp.round). All arithmetic is float32: float16 /
bfloat16 inputs are upcast first (upstream computes in the input dtype, so there parity is only
approximate; float32 inputs match bit for bit). On a [.., T, D] cache, "per token" is axis=-1
(groups along D) and "per channel" is axis=-2 (groups along T; upstream transposes to [.., D, T]
and quantizes the last axis, which is the same thing).

Packing: `bits` in {2, 4, 8}; 8 // bits codes per byte along the last axis, LITTLE-END FIRST:
code j of a byte sits in bits [j*bits, (j+1)*bits), i.e. the first code in the low bits. E.g. at
4 bits codes [1, 2] -> 0x21; at 2 bits codes [1, 2, 3, 0] -> 0b00_11_10_01.

Every function is pure jnp; `bits`, `group`, `axis` and `n` must be static (Python ints), so
under jax.jit pass them via static_argnames / functools.partial. All work under jax.vmap.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

PACK_BITS = (2, 4, 8)


def _check_pack_bits(bits: int) -> int:
    if bits not in PACK_BITS:
        raise ValueError(f"pack/unpack support bits in {PACK_BITS}, got {bits}")
    return 8 // bits  # codes per byte


def pack(codes: Array, bits: int) -> Array:
    """Pack integer codes into bytes along the last axis.

    codes: [..., n] integer, values in [0, 2**bits - 1] (higher bits are masked off).
    returns: uint8 [..., ceil(n / (8 // bits))]; the tail is padded with zero codes.
    """
    per = _check_pack_bits(bits)
    codes = jnp.asarray(codes)
    n = codes.shape[-1]
    m = -(-n // per)
    c = codes.astype(jnp.uint32) & jnp.uint32(2**bits - 1)                 # [..., n]
    if m * per != n:
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, m * per - n)])       # [..., m*per]
    c = c.reshape(*c.shape[:-1], m, per)                                   # [..., m, per]
    shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)          # [per]
    # the fields are disjoint, so the sum is a bitwise OR
    return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint32).astype(jnp.uint8)  # [..., m]


def unpack(packed: Array, bits: int, n: int) -> Array:
    """Inverse of `pack`: packed uint8 [..., m] -> codes uint8 [..., n] (n <= m * (8 // bits))."""
    per = _check_pack_bits(bits)
    packed = jnp.asarray(packed, jnp.uint8)
    m = packed.shape[-1]
    if not 0 <= n <= m * per:
        raise ValueError(f"n={n} codes do not fit in {m} bytes at {bits} bits")
    shifts = jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(bits)            # [per]
    c = (packed[..., None] >> shifts) & jnp.uint8(2**bits - 1)             # [..., m, per]
    return c.reshape(*packed.shape[:-1], m * per)[..., :n]                 # [..., n]


def packed_bytes(shape: Sequence[int], bits: int) -> int:
    """Bytes taken by `pack(zeros(shape), bits)`: prod(shape[:-1]) * ceil(shape[-1] / (8 // bits))."""
    per = _check_pack_bits(bits)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("packed_bytes needs at least one axis")
    return math.prod(shape[:-1]) * (-(-shape[-1] // per))


def _eps(dtype) -> float:
    """Scale floor of upstream: 1e-6 for half-precision inputs, 1e-12 otherwise."""
    return 1e-6 if jnp.dtype(dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)) else 1e-12


def _check_q(bits: int, group: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8] (codes are uint8), got {bits}")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")


def _grouped(x: Array, group: int, axis: int) -> tuple[Array, int]:
    """x [..., L, *rest] (L at `axis`) -> float32 [..., G, group, *rest], zero-padded to G * group
    along L; also returns L. The axis stays in place (no transpose: per-channel groups run along
    tokens, the second-last axis of a [.., T, D] cache, and reduce there directly)."""
    axis = axis % x.ndim
    L = x.shape[axis]
    G = -(-L // group)
    if G * group != L:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, G * group - L)
        x = jnp.pad(x, pad)                                                # [..., G*group, *rest]
    return x.reshape(*x.shape[:axis], G, group, *x.shape[axis + 1:]), L    # [..., G, group, *rest]


def _div(a: Array, b) -> Array:
    """IEEE a / b with b broadcast to a's shape.

    XLA's algebraic simplifier rewrites `a / broadcast(b)` into `a * broadcast(1 / b)`, which is
    off by an ulp often enough to flip round() and break bit parity with upstream's true division.
    Materializing b behind an optimization barrier keeps a real elementwise divide. The select on
    isnan(a) (a no-op for the quotient: nan / anything is nan) makes b depend on a, so under vmap
    the batch broadcast of b also happens before the barrier.
    """
    b = jnp.where(jnp.isnan(a), jnp.ones((), a.dtype), jnp.asarray(b, a.dtype))  # a.shape
    return a / jax.lax.optimization_barrier(b)


def quantize(x: Array, bits: int, group: int, axis: int = -1) -> tuple[Array, Array, Array]:
    """Group-wise asymmetric quantization of `x` along `axis` (see module docstring).

    x: [..., L, ...] float (L at `axis`).
    returns codes uint8 [same shape as x], values in [0, 2**bits - 1];
            scale, zero float32 [x.shape with `axis` -> G = ceil(L / group)]
            (zero holds integer values in [0, 2**bits - 1]).
    """
    _check_q(bits, group)
    x = jnp.asarray(x)
    axis = axis % x.ndim
    eps = _eps(x.dtype)
    maxq = 2**bits - 1
    g, L = _grouped(x.astype(jnp.float32), group, axis)                    # [..., G, group, *rest]
    red = axis + 1                                                         # the within-group axis
    xmax = jnp.max(g, axis=red, keepdims=True)                             # [..., G, 1, *rest]
    xmin = jnp.min(g, axis=red, keepdims=True)
    scale = jnp.maximum(_div(xmax - xmin, maxq), eps)                       # [..., G, 1, *rest]
    zero = jnp.round(-xmin / scale)                                        # same shapes: exact
    zero = jnp.clip(jnp.nan_to_num(zero, nan=0.0, posinf=maxq, neginf=0.0), 0, maxq)
    q = jnp.round(_div(g, scale)) + zero                                   # [..., G, group, *rest]
    q = jnp.clip(jnp.nan_to_num(q, nan=0.0, posinf=maxq, neginf=0.0), 0, maxq)
    q = q.reshape(*q.shape[:axis], -1, *q.shape[red + 1:])                 # [..., G*group, *rest]
    codes = jax.lax.slice_in_dim(q, 0, L, axis=axis).astype(jnp.uint8)     # x.shape
    scale = jnp.squeeze(scale, red)                                        # x.shape, L -> G
    zero = jnp.squeeze(zero, red)
    return codes, scale, zero


def dequantize(codes: Array, scale: Array, zero: Array, group: int, axis: int = -1) -> Array:
    """scale * (codes - zero), each group's scale/zero broadcast over its `group` elements.

    codes: [..., L, ...] integer (L at `axis`); scale, zero: [..., G, ...] with G = ceil(L / group).
    returns float32 [same shape as codes].
    """
    _check_q(1, group)
    codes = jnp.asarray(codes)
    axis = axis % codes.ndim
    L = codes.shape[axis]
    G = scale.shape[axis]
    if G != -(-L // group):
        raise ValueError(f"{G} groups do not match length {L} with group {group}")

    def expand(p):  # [..., G, ...] -> [..., L, ...]
        p = jnp.repeat(jnp.asarray(p, jnp.float32), group, axis=axis, total_repeat_length=G * group)
        return jax.lax.slice_in_dim(p, 0, L, axis=axis)

    return expand(scale) * (codes.astype(jnp.float32) - expand(zero))


def fake_quant(x: Array, bits: int, group: int, axis: int = -1) -> Array:
    """dequantize(quantize(x)): the float32 values upstream's simulated quantization produces."""
    codes, scale, zero = quantize(x, bits, group, axis)
    return dequantize(codes, scale, zero, group, axis)


__all__ = ["PACK_BITS", "pack", "unpack", "packed_bytes", "quantize", "dequantize", "fake_quant"]
