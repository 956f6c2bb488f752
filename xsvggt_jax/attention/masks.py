"""Attention masks: small objects evaluated from iota inside each block, never dense [Nq, Nk] constants.

  `Full()`                   every query sees every key;
  `KeyPrefix(length, chunk)` keys [0, length) exist (a streaming cache's filled slots; length traced);
  `FrameCausal(tokens)`      query frame >= key frame, frames of `tokens` consecutive tokens (offline causal);
  `Additive(array)`          an additive bias array broadcastable to [B, H, Nq, Nk] (-inf masks).

`Mask` is their union, the one mask type of the package; `as_mask` turns what a `mask=` argument may
also hold (None, a bare additive array) into one. Indices are global: a kernel that sees a slice of
the sequence (a query block, a device's shard) passes the slice's global query / key indices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Full:
    """No mask: every query sees every key."""

    def bias(self, qi: Array, ki: Array) -> Optional[Array]:
        return None

    def key_end(self, q_last: Any) -> Optional[Any]:
        """Exclusive end of the keys any query <= q_last may see (None: all)."""
        return None


@dataclasses.dataclass(frozen=True)
class KeyPrefix:
    """Keys [0, length) exist. length: int32 [] (may be traced). chunk: the key block of the loop
    (static; must divide the key capacity), or None for the kernels' default key block with padding."""

    length: Any
    chunk: Optional[int] = None

    def bias(self, qi: Array, ki: Array) -> Array:
        return jnp.where(ki < self.length, 0.0, NEG_INF)[None, :]                    # [1, bk]

    def key_end(self, q_last: Any) -> Any:
        return self.length


@dataclasses.dataclass(frozen=True)
class FrameCausal:
    """Query token i sees key token j iff frame(i) >= frame(j), frame(t) = t // tokens_per_frame."""

    tokens_per_frame: int

    def bias(self, qi: Array, ki: Array) -> Array:
        t = self.tokens_per_frame
        return jnp.where(qi[:, None] // t >= ki[None, :] // t, 0.0, NEG_INF)        # [bq, bk]

    def key_end(self, q_last: Any) -> Any:
        return (q_last // self.tokens_per_frame + 1) * self.tokens_per_frame


@dataclasses.dataclass(frozen=True)
class Additive:
    """An additive bias array broadcastable to [B, H, Nq, Nk], read at the block's query/key indices."""

    array: Array

    def bias(self, qi: Array, ki: Array) -> Array:
        a = jnp.asarray(self.array, jnp.float32)
        if a.ndim >= 2 and a.shape[-2] > 1:
            a = jnp.take(a, jnp.minimum(qi, a.shape[-2] - 1), axis=-2)                # [..., bq, Nk]
        if a.ndim >= 1 and a.shape[-1] > 1:
            a = jnp.take(a, jnp.minimum(ki, a.shape[-1] - 1), axis=-1)                # [..., bk]
        return a

    def key_end(self, q_last: Any) -> None:
        return None


Mask = Union[Full, KeyPrefix, FrameCausal, Additive]
MASK_TYPES = (Full, KeyPrefix, FrameCausal, Additive)


def as_mask(mask: Any) -> Mask:
    """None -> Full(); an additive array -> Additive; a mask object as is."""
    if mask is None:
        return Full()
    if isinstance(mask, MASK_TYPES):
        return mask
    return Additive(mask)
