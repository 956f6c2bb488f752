"""Storage codecs of a quantized KV cache: how a [B, H, T, D] key or value tensor is kept as packed
low-bit codes with group scales and zero points.

A codec is a small static object (hashable, so it can sit in a pytree's static fields) with four
operations on `Packed` data:

    empty(b, h, t, d, rows) -> Packed      all-zero storage for t tokens
    encode(x [B, H, T, D]) -> Packed       group-quantize (upstream's fake quantizer) and pack
    decode(p) -> float32 [B, H, T, D]      scale * (code - zero)
    take(p, idx [B, K]) -> Packed          keep tokens idx (pruning)

Two layouts exist (upstream KV_QUANT_MODE letters): `PerToken` groups `group` consecutive head dims of
one token; `PerChannel` groups `group` consecutive tokens of one head dim. `LAYOUTS` maps a cache
layout name (K codec letter, V codec letter) to the codec classes of K and V.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from xsvggt_jax.cache import quant
Array = jax.Array

SCALE_DTYPES = {"float32": jnp.float32, "float16": jnp.float16}  # registry: dtype of stored group scales


def take_rows(x: Array, idx: Array) -> Array:
    """x [B, H, R, ...], idx int32 [B, T] -> [B, H, T, ...]: rows (tokens, or scale rows) per batch.

    A per-batch `jnp.take` gathers whole [H, 1, ...] slabs; `take_along_axis` with an index broadcast
    over H and D lowers to an element-wise gather that is several times slower on CPU.
    """
    return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=1, mode="clip"))(x, idx)


@flax.struct.dataclass
class Packed:
    """A group-quantized [B, H, T, D] tensor (what `codec` encoded).

    codes: uint8 [B, H, T, ceil(D * bits / 8)] codes packed along D (first code in the low bits).
    scale: float32 or float16 (codec.scale_dtype): per token [B, H, T, ceil(D / group)]; per channel
           [B, H, G, D] with G groups of `group` consecutive tokens of the step that quantized them.
    zero:  uint8, same shape as scale: integer zero points in [0, 2**bits - 1].
    group_of: per channel int32 [B, T], the row of scale/zero each token uses (pruning moves tokens
           between groups); per token None (no zero-size leaf: orbax refuses those).
    """

    codes: Array
    scale: Array
    zero: Array
    group_of: Optional[Array]
    codec: "Codec" = flax.struct.field(pytree_node=False)
    dim: int = flax.struct.field(pytree_node=False)

    @property
    def slots(self) -> int:
        return self.codes.shape[2]

    def decode(self) -> Array:
        return self.codec.decode(self)

    def take(self, idx: Array) -> "Packed":
        return self.codec.take(self, idx)


@dataclasses.dataclass(frozen=True)
class Codec:
    """Shared parameters of both layouts: code width, group size, stored scale dtype."""

    bits: int
    group: int
    scale_dtype: str = "float32"

    axis = -1           # the quantized axis of [B, H, T, D]: -1 (along D) or -2 (along T)

    def __post_init__(self):
        if self.bits not in quant.PACK_BITS:
            raise ValueError(f"bits must be one of {quant.PACK_BITS}, got {self.bits}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.group < 1:
            raise ValueError(f"group must be positive, got {self.group}")

    @property
    def jnp_scale_dtype(self):
        return SCALE_DTYPES[self.scale_dtype]

    def _params_shape(self, b: int, h: int, t: int, d: int, rows: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _group_of(self, b: int, t: int) -> Optional[Array]:
        """int32 [B, T] scale row of each freshly encoded token, or None when rows are tokens."""
        raise NotImplementedError

    def empty(self, b: int, h: int, t: int, d: int, rows: int) -> Packed:
        """Zero codes for t tokens; `rows`: scale rows of a per-channel codec (ignored per token)."""
        codes = jnp.zeros((b, h, t, quant.packed_bytes((d,), self.bits)), jnp.uint8)
        pshape = self._params_shape(b, h, t, d, rows)
        group_of = self._group_of(b, t)
        group_of = None if group_of is None else jnp.zeros_like(group_of)
        return Packed(codes, jnp.ones(pshape, self.jnp_scale_dtype), jnp.zeros(pshape, jnp.uint8), group_of, self, d)

    def encode(self, x: Array) -> Packed:
        """Quantize x [B, H, T, D] with upstream's group-wise asymmetric quantizer and pack the codes."""
        codes, scale, zero = quant.quantize(x, self.bits, self.group, axis=self.axis)
        b, _, t, d = x.shape
        return Packed(quant.pack(codes, self.bits), scale.astype(self.jnp_scale_dtype), zero.astype(jnp.uint8),
                      self._group_of(b, t), self, d)

    def decode(self, p: Packed) -> Array:
        """float32 [B, H, T, D]: scale * (code - zero)."""
        codes = quant.unpack(p.codes, self.bits, p.dim).astype(jnp.float32)
        scale, zero = self._expand(p, p.scale.astype(jnp.float32)), self._expand(p, p.zero.astype(jnp.float32))
        return scale * (codes - zero)

    def _expand(self, p: Packed, param: Array) -> Array:
        raise NotImplementedError

    def take(self, p: Packed, idx: Array) -> Packed:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class PerToken(Codec):
    """Groups of `group` head dims of one token: scale/zero [B, H, T, ceil(D / group)]."""

    axis = -1

    def _params_shape(self, b, h, t, d, rows):
        return (b, h, t, -(-d // self.group))

    def _group_of(self, b, t):
        return None

    def _expand(self, p, param):          # [B, H, T, Gd] -> [B, H, T, D]
        return jnp.repeat(param, self.group, axis=-1)[..., :p.dim]

    def take(self, p, idx):
        return p.replace(codes=take_rows(p.codes, idx), scale=take_rows(p.scale, idx), zero=take_rows(p.zero, idx))


@dataclasses.dataclass(frozen=True)
class PerChannel(Codec):
    """Groups of `group` consecutive tokens of one head dim: scale/zero [B, H, rows, D], and a per-token
    row index (tokens keep their group's parameters when pruning reorders them)."""

    axis = -2

    def _params_shape(self, b, h, t, d, rows):
        return (b, h, rows, d)

    def _group_of(self, b, t):
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) // self.group, (b, t))

    def _expand(self, p, param):          # [B, H, G, D] -> the row of each token: [B, H, T, D]
        return take_rows(param, p.group_of)

    def take(self, p, idx):
        return p.replace(codes=take_rows(p.codes, idx), group_of=jnp.take_along_axis(p.group_of, idx, axis=1))


# registry: cache quantization layout -> (K codec class, V codec class); "c" per channel, "t" per token
LAYOUTS: dict[str, tuple[type[Codec], type[Codec]]] = {
    "kcvt": (PerChannel, PerToken),
    "ktvt": (PerToken, PerToken),
    "kcvc": (PerChannel, PerChannel),
    "ktvc": (PerToken, PerChannel),
}
