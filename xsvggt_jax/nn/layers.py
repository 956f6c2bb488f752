"""Transformer building blocks shared by the backbone and the heads (Flax Linen).

Parameter names follow the upstream module names so the checkpoint key map stays a readable table
(`convert/keymap.py`). All matmuls take an explicit `precision`; parity needs float32 + HIGHEST.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from xsvggt_jax.attention.dispatch import (AttentionSpec, MaskArg, attend, attend_split, packed_selected,
                                           split_selected)
from xsvggt_jax.attention.masks import KeyPrefix, Mask

Array = jax.Array
Precision = jax.lax.Precision
log = logging.getLogger(__name__)


class Dense(nn.Module):
    """y = x @ kernel + bias; kernel [in, out] (torch Linear weight transposed)."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype),
                       precision=self.precision)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32 (torch eps default 1e-5)."""

    eps: float = 1e-5
    use_affine: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_affine:
            d = x.shape[-1]
            y = y * self.param("scale", nn.initializers.ones, (d,)) + self.param("bias", nn.initializers.zeros, (d,))
        return y.astype(dtype)


class LayerScale(nn.Module):
    init_value: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, as torch.nn.GELU()."""
    return jax.nn.gelu(x, approximate=False)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    hidden: int
    out: Optional[int] = None
    dtype: Any = jnp.float32
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = gelu(Dense(self.hidden, dtype=self.dtype, precision=self.precision, name="fc1")(x))
        return Dense(self.out or x.shape[-1], dtype=self.dtype, precision=self.precision, name="fc2")(h)


class KVCache(Protocol):
    """A layer's streaming cache as attention uses it (`xsvggt_jax.cache.core.LayerCache`): pure, it returns
    its next state instead of mutating itself. A quantized one (`quantized`) may also attend to its packed
    codes: `packed_unsupported()` (None, or why not) and `attend_packed(q, k, v, precision=...)` ->
    (out [B, H, N, D], the cache after this call), used under the `packed` attention implementation."""

    records_residual: bool  # static: the cache scores tokens by their FFN residual (`record_residual`)

    def update(self, q: Array, k: Array, v: Array) -> tuple[Array, Array, Mask | Array, "KVCache"]:
        """q, k, v [B, H, N, D] after norm + RoPE -> (keys, values to attend over [B, H, W, D], their mask
        (an additive bias or a `KeyPrefix`), the cache after this call)."""
        ...

    def record_residual(self, residual: Array) -> "KVCache":
        """After `update`, when `records_residual`: this call's FFN residual [B, N, C] -> the cache."""
        ...


class Attention(nn.Module):
    """Multi-head self-attention with optional q/k LayerNorm and 2D RoPE.

    `rope` is a callable (x [B,H,N,D]) -> x applying rotary embedding with positions bound in.
    `mask`: the attention's mask (`attention.attend`'s; e.g. an `AttentionSpec` naming the implementation).
    `cache` (streaming) supplies the attended keys/values and their mask; its next state is returned.
    An uncompressed cache (a `KeyPrefix` over stored float keys `cache.kv.k`, filled to `cache.length`)
    is attended in place where `attention.split_selected` says so (on a GPU with cuDNN): the stored
    prefix and the current frame separately, merged by log-sum-exp (`attention.attend_split`), the
    implementation named by an `AttentionSpec` passed as `mask` (default "auto"). Under "packed" a
    quantized cache is attended as stored codes (`KVCache.attend_packed`).
    """

    num_heads: int
    qk_norm: bool = False
    dtype: Any = jnp.float32
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array, *, rope: Optional[Callable[[Array], Array]] = None,
                 mask: MaskArg = None, cache: Optional[KVCache] = None) -> tuple[Array, Optional[KVCache]]:
        """x [B, N, C] -> (out [B, N, C], the cache after this call, or None without a cache)."""
        b, n, c = x.shape
        hd = c // self.num_heads
        qkv = Dense(3 * c, dtype=self.dtype, precision=self.precision, name="qkv")(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.qk_norm:
            q = LayerNorm(name="q_norm")(q)
            k = LayerNorm(name="k_norm")(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        if cache is not None:
            impl = mask.impl if isinstance(mask, AttentionSpec) else "auto"
            if packed_selected(impl) and _packed_ready(cache):  # attend to the stored codes
                o, cache = cache.attend_packed(q, k, v, precision=self.precision)
            else:
                o, cache = _attend_cached(q, k, v, cache, impl, self.precision)
        else:
            o = attend(q, k, v, mask=mask, precision=self.precision)  # [B, H, N, D]
        o = o.transpose(0, 2, 1, 3).reshape(b, n, c)
        o = Dense(c, dtype=self.dtype, precision=self.precision, name="proj")(o)
        return o, cache


def _attend_cached(q: Array, k: Array, v: Array, cache: KVCache, impl: str,
                   precision: Precision) -> tuple[Array, KVCache]:
    """Attention over the cache's dequantized / float keys [past; current] and the next cache. An
    uncompressed cache is attended in place where `split_selected` says so (see `Attention`)."""
    past = cache
    k_att, v_att, mask, cache = cache.update(q, k, v)
    stored_k = getattr(getattr(past, "kv", None), "k", None)
    if (isinstance(mask, KeyPrefix) and isinstance(stored_k, jax.Array)
            and stored_k.shape[2] == k_att.shape[2] and split_selected(impl, q.dtype, q.shape[-1])):
        # [past; current] = the stored prefix, then this call's keys (cast as the cache stores them)
        o = attend_split(q, stored_k, past.kv.v, KeyPrefix(past.length, mask.chunk),
                         k.astype(k_att.dtype), v.astype(v_att.dtype), impl=impl, precision=precision)
    else:
        o = attend(q, k_att, v_att, mask=AttentionSpec(mask, impl), precision=precision)
    return o, cache


def _packed_ready(cache: KVCache) -> bool:
    """A quantized cache that can attend to its packed codes (`LayerCache.attend_packed`); a quantized
    one that cannot logs why, once, and dequantizes (a float layer, e.g. the camera trunk at the
    published size, attends as usual)."""
    if not getattr(cache, "quantized", False):
        return False
    why = cache.packed_unsupported()
    if why:
        _log_once(f"packed attention not used for a layer ({why}); it dequantizes")
    return why is None


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x))."""

    num_heads: int
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    layer_norm_eps: float = 1e-5
    layer_scale: bool = True
    dtype: Any = jnp.float32
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array, *, rope=None, mask: MaskArg = None,
                 cache: Optional[KVCache] = None) -> tuple[Array, Optional[KVCache]]:
        """x [B, N, C] -> (x' [B, N, C], the attention cache after this block, or None)."""
        c = x.shape[-1]
        h, cache = Attention(self.num_heads, qk_norm=self.qk_norm, dtype=self.dtype, precision=self.precision,
                             name="attn")(LayerNorm(self.layer_norm_eps, name="norm1")(x), rope=rope, mask=mask,
                                          cache=cache)
        if self.layer_scale:
            h = LayerScale(name="ls1")(h)
        x = x + h
        h = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, precision=self.precision, name="mlp")(
            LayerNorm(self.layer_norm_eps, name="norm2")(x))
        if self.layer_scale:
            h = LayerScale(name="ls2")(h)
        if cache is not None and cache.records_residual:  # static: only a residual-scored cache (ffn)
            cache = cache.record_residual(h)
        return x + h, cache


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention (batch_first): packed `in_proj` and `out_proj`."""

    num_heads: int
    dtype: Any = jnp.float32
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array, context: Array, mask: MaskArg = None) -> Array:
        """x [B, Nq, C] attends to context [B, Nk, C]; mask: `attention.attend`'s (e.g. an `Additive`
        key mask [B, 1, 1, Nk]), None for none."""
        c = x.shape[-1]
        hd = c // self.num_heads
        w = self.param("in_proj_kernel", nn.initializers.lecun_normal(), (c, 3 * c))
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * c,))
        wq, wk, wv = jnp.split(w, 3, axis=-1)
        bq, bk, bv = jnp.split(bias, 3)

        def heads(t, wt, bt):  # [B, N, C] -> [B, H, N, hd]
            y = jnp.einsum("bnc,co->bno", t, wt, precision=self.precision) + bt
            return y.reshape(*y.shape[:2], self.num_heads, hd).transpose(0, 2, 1, 3)

        o = attend(heads(x, wq, bq), heads(context, wk, bk), heads(context, wv, bv), mask=mask,
                   precision=self.precision)
        o = o.transpose(0, 2, 1, 3).reshape(x.shape)
        return Dense(c, dtype=self.dtype, precision=self.precision, name="out_proj")(o)
