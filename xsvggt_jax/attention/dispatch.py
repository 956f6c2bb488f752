"""The one attention entry point, `attend`, and the choice of implementation behind it.

Implementations (`ATTENTION_IMPLS`), named by a run option (`StreamVGGT(cfg, attention=...)`):
  xla, blocked, cudnn  one device (`attention.kernels`);
  ring, gather         sequence parallel inside `jax.shard_map` (`attention.ring`);
  packed               a streaming layer with a quantized cache attends to its packed codes without
                       materialising float K/V (`attend_packed`: `attention.packed`, the Pallas kernel
                       `attention.pallas_packed` on a GPU); every other attention call runs as `auto`;
  auto                 `resolve_attention` picks one by backend and mask (never `packed`: not yet timed
                       on an accelerator).
cudnn falls back to `blocked` (structured masks) or `xla` where the backend, dtype, head dim or mask do
not fit, with the reason logged once.

`attend_split` attends queries to two disjoint key sets (a streaming layer's cache under a `KeyPrefix`,
and the current frame's own keys, unmasked) separately and merges the partial softmaxes by their
log-sum-exp: exactly the attention over [past; current], without building that concatenation. On a GPU
both halves run cuDNN flash attention (the prefix as `key_value_seq_lengths`).

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

from xsvggt_jax.attention.kernels import (KEY_BLOCK, QUERY_BLOCK, attend_blocked, attend_blocked_lse,
                                          attend_cudnn, attend_cudnn_lse, attend_xla, attend_xla_lse, current_options,
                                          merge_lse)
from xsvggt_jax.attention.masks import NEG_INF, Additive, Full, FrameCausal, KeyPrefix, Mask, as_mask
from xsvggt_jax.attention.packed import PackedKV, packed_lse
from xsvggt_jax.attention.ring import attend_sequence_parallel
from xsvggt_jax.errors import ConfigError

Array = jax.Array
Precision = jax.lax.Precision
log = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "ring", "gather", "packed")
PACKED_KERNELS = ("jax", "pallas")   # `options(packed_kernel=...)`
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
                      dtype: Any = jnp.float32, keys: int = 0, head_dim: Optional[int] = None) -> str:
    """The implementation that runs for `impl` on `backend` (default: jax's) for attention under `mask`
    (None: unmasked) over `keys` keys with inputs of `dtype` and heads of `head_dim` (None: unchecked):
    what goes in `report.json`. The offline global layers ask with `FrameCausal(tokens_per_frame)` or
    `Full()` and S*P keys."""
    check_impl(impl)
    if impl in SEQUENCE_PARALLEL_IMPLS:
        return impl
    if impl == "packed":   # reads packed codes (`attend_packed`); float keys and values as auto
        impl = "auto"
    backend = backend or jax.default_backend()
    mask = as_mask(mask)
    structured = isinstance(mask, (FrameCausal, KeyPrefix)) or keys > AUTO_DENSE_KEYS
    if impl == "auto":
        impl = "cudnn" if backend == "gpu" else "blocked" if structured else "xla"
    if impl == "cudnn":
        reason = _cudnn_unfit(backend, mask, dtype, head_dim)
        if reason:
            impl = "blocked" if structured else "xla"
            _log_once(f"cudnn attention not used ({reason}); running {impl}")
    return impl


CUDNN_MAX_HEAD_DIM = 128   # cuDNN flash attention: head dims up to 128, multiples of 8


def _cudnn_unfit(backend: str, mask: Mask, dtype: Any, head_dim: Optional[int] = None) -> Optional[str]:
    """Why cuDNN's fused attention cannot take this call, or None if it can."""
    if backend != "gpu":
        return f"backend {backend!r} is not a GPU"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention needs float16/bfloat16 inputs, got {jnp.dtype(dtype).name}"
    if isinstance(mask, FrameCausal) and mask.tokens_per_frame != 1:
        return "a frame-causal mask with several tokens per frame is not a cuDNN mask"
    if head_dim is not None and (head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM):
        return f"head dim {head_dim} is not a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}"
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
    impl = resolve_attention(spec.impl, None, mask, q.dtype, k.shape[2], q.shape[-1])
    if impl == "xla":
        return attend_xla(q, k, v, mask, precision)
    if impl == "cudnn":
        return attend_cudnn(q, k, v, mask)
    key_block, query_block = _block_sizes(spec, mask, q.shape[2])
    if impl == "blocked":
        return attend_blocked(q, k, v, mask, precision, query_block=query_block, key_block=key_block)
    return attend_sequence_parallel(q, k, v, mask, precision, spec.axis, ring=impl == "ring",
                                    query_block=query_block, key_block=key_block)


def _block_sizes(spec: AttentionSpec, mask: Mask, queries: int) -> tuple[int, int]:
    """(key block, query block) of the blocked kernels: a key prefix is the same keys for every query,
    so one query block and the prefix's chunk."""
    if isinstance(mask, KeyPrefix):
        return mask.chunk or spec.key_block, queries
    return spec.key_block, spec.query_block


def _single_device(spec: AttentionSpec) -> AttentionSpec:
    if spec.impl in SEQUENCE_PARALLEL_IMPLS:
        raise AttentionConfigError(f"attention {spec.impl!r} has no partial-softmax form (one device only)")
    return spec


def attend_lse(q: Array, k: Array, v: Array, *, mask: MaskArg = None,
               precision: Precision = Precision.HIGHEST) -> tuple[Array, Array]:
    """`attend`'s partial softmax: (out float32 [B, H, Nq, D], lse float32 [B, H, Nq]), lse the
    log-sum-exp of the row's scaled, masked logits (-inf, out 0, for a row with no key). Implementations
    as `attend` (xla, blocked, cudnn; not the sequence-parallel ones)."""
    spec = _single_device(mask if isinstance(mask, AttentionSpec) else AttentionSpec(mask))
    mask = as_mask(spec.mask)
    impl = resolve_attention(spec.impl, None, mask, q.dtype, k.shape[2], q.shape[-1])
    if impl == "xla":
        return attend_xla_lse(q, k, v, mask, precision)
    if impl == "cudnn":
        return attend_cudnn_lse(q, k, v, mask)
    key_block, query_block = _block_sizes(spec, mask, q.shape[2])
    return attend_blocked_lse(q, k, v, mask, precision, query_block=query_block, key_block=key_block)


def split_selected(impl: str, dtype: Any, head_dim: Optional[int] = None) -> bool:
    """Whether a streaming layer attends to its cache and its current frame separately
    (`attend_split`): the `options(cache_split=...)` choice, by default only where cuDNN runs (it reads
    the cache in place); elsewhere the single pass over [past; current] (the CPU default, unchanged)."""
    forced = current_options().cache_split
    if forced is not None:
        return forced
    return impl not in SEQUENCE_PARALLEL_IMPLS and resolve_attention(impl, None, KeyPrefix(0), dtype, 0,
                                                                     head_dim) == "cudnn"


def attend_split(q: Array, past_k: Array, past_v: Array, past_mask: Any, k: Array, v: Array, *,
                 impl: str = "auto", precision: Precision = Precision.HIGHEST) -> Array:
    """Attention of q [B, H, Nq, D] over the union of the keys past_k/past_v [B, H, T, D] (under
    `past_mask`, e.g. a cache's `KeyPrefix(length, chunk)`) and k/v [B, H, N, D] (all seen), computed
    as two partial softmaxes merged by log-sum-exp. Returns [B, H, Nq, D] in q's dtype."""
    a = attend_lse(q, past_k, past_v, mask=AttentionSpec(past_mask, impl), precision=precision)
    b = attend_lse(q, k, v, mask=AttentionSpec(Full(), impl), precision=precision)
    return merge_lse([a, b], q.dtype)


def packed_selected(impl: str) -> bool:
    """Whether a streaming layer with a quantized cache attends to its packed codes (`attend_packed`)."""
    return impl == "packed"


def packed_kernel(k: PackedKV, v: PackedKV, backend: Optional[str] = None) -> str:
    """What `attend_packed` runs: `options(packed_kernel=...)`, else the Pallas kernel on a GPU where it
    fits (`pallas_packed.unfit`), else the JAX function (the reason logged once)."""
    forced = current_options().packed_kernel
    if forced is not None and forced not in PACKED_KERNELS:
        raise AttentionConfigError(f"unknown packed attention kernel {forced!r}; choose from {PACKED_KERNELS}")
    kernel = forced or ("pallas" if (backend or jax.default_backend()) == "gpu" else "jax")
    if kernel != "pallas":
        return kernel
    from xsvggt_jax.attention.pallas_packed import unfit   # Pallas is imported where it runs

    reason = unfit(k, v)
    if reason:
        _log_once(f"packed attention kernel not used ({reason}); running the JAX function")
        return "jax"
    return kernel


def attend_packed(q: Array, k: PackedKV, v: PackedKV, length: Array, rest_k: Array, rest_v: Array,
                  rest_valid: Array, *, whole_groups: bool = False,
                  precision: Precision = Precision.HIGHEST) -> Array:
    """Attention of q [B, H, Nq, D] over a cache's packed keys [0, length) (`packed.PackedKV` K and V)
    and float keys rest_k / rest_v [B, H, W, D] where rest_valid [W] (bool): the current frame, a
    quantize-once window. The packed part never builds float K/V (`packed_kernel` picks the code),
    the float part is dense; merged by log-sum-exp. Returns [B, H, Nq, D] in q's dtype.
    whole_groups: `length` is a multiple of a per-channel group (`packed.blocked`)."""
    backend = jax.default_backend()
    if packed_kernel(k, v, backend) == "pallas":
        from xsvggt_jax.attention.pallas_packed import packed_lse_pallas

        a = packed_lse_pallas(q, k, v, length, whole_groups=whole_groups, interpret=backend != "gpu")
    else:
        a = packed_lse(q, k, v, length, whole_groups=whole_groups, precision=precision)
    bias = jnp.where(rest_valid, 0.0, NEG_INF).astype(jnp.float32)
    b = attend_xla_lse(q, rest_k, rest_v, Additive(bias), precision)
    return merge_lse([a, b], q.dtype)
