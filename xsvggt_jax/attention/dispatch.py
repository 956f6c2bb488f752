"""The one attention entry point, `attend`, and the choice of implementation behind it.

Implementations (`ATTENTION_IMPLS`), named by a run option (`StreamVGGT(cfg, attention=...)`):
  xla, blocked, cudnn  one device (`attention.kernels`);
  ring, gather         sequence parallel inside `jax.shard_map` (`attention.ring`);
  auto                 `resolve_attention` picks one by backend and mask.
cudnn falls back to `blocked` (structured masks) or `xla` where the backend, dtype or mask do not fit,
with the reason logged once.

A `mask=` argument (`attend`, the layers, the model's modules) takes a `masks.Mask`, an additive array,
None (no mask), or an `AttentionSpec`: a mask plus how to attend under it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from xsvggt_jax.attention.kernels import (KEY_BLOCK, QUERY_BLOCK, attend_blocked, attend_cudnn,
                                          attend_xla)
from xsvggt_jax.attention.masks import FrameCausal, KeyPrefix, Mask, as_mask
from xsvggt_jax.attention.ring import attend_sequence_parallel
from xsvggt_jax.errors import ConfigError

Array = jax.Array
Precision = jax.lax.Precision
log = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "ring", "gather")
SEQUENCE_PARALLEL_IMPLS = ("ring", "gather")
AUTO_DENSE_KEYS = 8192      # `auto` on CPU/TPU: unmasked attention over more keys than this is blocked


class AttentionConfigError(ConfigError):
    """An unknown attention implementation, or one that cannot run here (ring outside a mesh axis)."""


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise AttentionConfigError(f"unknown attention implementation {impl!r}; choose from {ATTENTION_IMPLS}")
    return impl


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """A mask plus how to attend under it: what a module passes as `mask` to pick the implementation.

    impl: one of `ATTENTION_IMPLS`. axis: the mesh axis the token sequence is sharded over (ring,
    gather: q/k/v are then this device's contiguous slice of the sequence, the mask's indices global).
    Blocks: see `kernels.attend_blocked`.
    """

    mask: Any = None
    impl: str = "auto"
    axis: Optional[str] = None
    query_block: int = QUERY_BLOCK
    key_block: int = KEY_BLOCK

    def __post_init__(self):
        check_impl(self.impl)
        if self.impl in SEQUENCE_PARALLEL_IMPLS and self.axis is None:
            raise AttentionConfigError(f"attention {self.impl!r} needs the mesh axis the sequence is sharded over")


MaskArg = Union[Mask, AttentionSpec, Array, None]   # what a `mask=` argument takes


def resolve_attention(impl: str, backend: Optional[str] = None, mask: Any = None,
                      dtype: Any = jnp.float32, keys: int = 0) -> str:
    """The implementation that runs for `impl` on `backend` (default: jax's) for attention under `mask`
    (None: unmasked) over `keys` keys with inputs of `dtype`: what goes in `report.json`. The offline
    global layers ask with `FrameCausal(tokens_per_frame)` or `Full()` and S*P keys."""
    check_impl(impl)
    if impl in SEQUENCE_PARALLEL_IMPLS:
        return impl
    backend = backend or jax.default_backend()
    mask = as_mask(mask)
    structured = isinstance(mask, (FrameCausal, KeyPrefix)) or keys > AUTO_DENSE_KEYS
    if impl == "auto":
        impl = "cudnn" if backend == "gpu" else "blocked" if structured else "xla"
    if impl == "cudnn":
        reason = _cudnn_unfit(backend, mask, dtype)
        if reason:
            impl = "blocked" if structured else "xla"
            _log_once(f"cudnn attention not used ({reason}); running {impl}")
    return impl


def _cudnn_unfit(backend: str, mask: Mask, dtype: Any) -> Optional[str]:
    """Why cuDNN's fused attention cannot take this call, or None if it can."""
    if backend != "gpu":
        return f"backend {backend!r} is not a GPU"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention needs float16/bfloat16 inputs, got {jnp.dtype(dtype).name}"
    if isinstance(mask, FrameCausal) and mask.tokens_per_frame != 1:
        return "a frame-causal mask with several tokens per frame is not a cuDNN mask"
    return None


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


def attend(q: Array, k: Array, v: Array, *, mask: MaskArg = None,
           precision: Precision = Precision.HIGHEST) -> Array:
    """Scaled dot-product attention, softmax in float32.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D]; mask: None, a `masks.Mask`, an additive array broadcastable
    to [B, H, Nq, Nk] (-inf masks), or an `AttentionSpec` naming mask and implementation.
    Returns [B, H, Nq, D].
    """
    spec = mask if isinstance(mask, AttentionSpec) else AttentionSpec(mask)
    mask = as_mask(spec.mask)
    if isinstance(mask, KeyPrefix) and mask.chunk is not None and k.shape[2] % mask.chunk:
        raise AttentionConfigError(f"key capacity {k.shape[2]} is not a multiple of the chunk {mask.chunk}")
    impl = resolve_attention(spec.impl, None, mask, q.dtype, k.shape[2])
    if impl == "xla":
        return attend_xla(q, k, v, mask, precision)
    if impl == "cudnn":
        return attend_cudnn(q, k, v, mask)
    key_block, query_block = spec.key_block, spec.query_block
    if isinstance(mask, KeyPrefix):           # the same keys for every query: one query block
        key_block, query_block = mask.chunk or key_block, q.shape[2]
    if impl == "blocked":
        return attend_blocked(q, k, v, mask, precision, query_block=query_block, key_block=key_block)
    return attend_sequence_parallel(q, k, v, mask, precision, spec.axis, ring=impl == "ring",
                                    query_block=query_block, key_block=key_block)
