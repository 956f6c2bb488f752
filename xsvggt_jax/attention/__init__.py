"""Attention: mask objects (`masks`), kernels (`kernels`: dense, blocked, cuDNN; `ring`: sequence
parallel) and the dispatcher `attend` (`dispatch`) that picks one. The names below are the package's
public API (`from xsvggt_jax.attention import attend, FrameCausal`)."""

from xsvggt_jax.attention.dispatch import (ATTENTION_IMPLS, AUTO_DENSE_KEYS, PACKED_KERNELS, SEQUENCE_PARALLEL_IMPLS,
                                           AttentionConfigError, AttentionSpec, MaskArg, attend, attend_lse,
                                           attend_packed, attend_split, check_impl, packed_selected,
                                           resolve_attention, split_selected)
from xsvggt_jax.attention.kernels import (CPU_QUERY_BLOCK, KEY_BLOCK, QUERY_BLOCK, AttentionOptions,
                                          attend_blocked, attend_cudnn, attend_xla, block_schedule, merge_lse,
                                          options)
from xsvggt_jax.attention.packed import PackedKV, packed_lse
from xsvggt_jax.attention.masks import NEG_INF, Additive, FrameCausal, Full, KeyPrefix, Mask, as_mask
from xsvggt_jax.attention.ring import attend_sequence_parallel

__all__ = ["ATTENTION_IMPLS", "AUTO_DENSE_KEYS", "PACKED_KERNELS", "SEQUENCE_PARALLEL_IMPLS", "PackedKV", "packed_lse",
           "attend_packed", "packed_selected", "AttentionConfigError", "AttentionSpec",
           "MaskArg", "attend", "attend_lse", "attend_split", "split_selected", "merge_lse", "check_impl",
           "resolve_attention", "CPU_QUERY_BLOCK", "KEY_BLOCK", "QUERY_BLOCK",
           "AttentionOptions", "attend_blocked", "attend_cudnn", "attend_xla", "block_schedule", "options",
           "NEG_INF", "Additive", "FrameCausal", "Full", "KeyPrefix", "Mask", "as_mask", "attend_sequence_parallel"]
