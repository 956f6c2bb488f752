"""Transformer building blocks shared by the backbone and the heads (Flax Linen).

Parameter names follow the upstream module names so the checkpoint key map stays a readable table
(`convert/keymap.py`). All matmuls take an explicit `precision`; parity needs float32 + HIGHEST.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Precision = jax.lax.Precision

NEG_INF = -jnp.inf


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


@dataclasses.dataclass(frozen=True)
class Prefix:
    """Attention mask "only the first `length` keys exist", evaluated chunk by chunk.

    A cache with a static capacity (the uncompressed stream cache) holds `length` filled slots and
    garbage after them. Instead of masking the whole capacity, `attend` then loops over the
    ceil(length / chunk) filled chunks only (a `lax.fori_loop` with a dynamic trip count, online
    softmax), so a step costs what the stream so far costs, not what the whole stream will.
    length: int32 [] (traced); chunk: static, divides the key capacity.
    """

    length: Array
    chunk: int


Mask = Union[Array, Prefix]


# On CPU one fused attention over all queries materialises the whole [B, H, Nq, Nk] logits (208 MB
# for a published global layer: 1041 queries x 3123 keys x 16 heads) and runs memory-bound. Walking the
# queries in (even) blocks of at most this many keeps each block's logits in cache: 344 -> 155 ms for
# that layer, 67 -> 56 ms for 1041 keys, bit-identical (benchmarks/README.md). GPUs/TPUs keep the
# single fusion.
CPU_QUERY_BLOCK = 128


def attend(q: Array, k: Array, v: Array, *, bias: Optional[Mask] = None,
           precision: Precision = Precision.HIGHEST) -> Array:
    """Scaled dot-product attention.

    q: [B, H, Nq, D]; k, v: [B, H, Nk, D]; bias: an additive array broadcastable to [B, H, Nq, Nk]
    (-inf masks), or a `Prefix`. Returns [B, H, Nq, D]. Softmax is taken in float32.
    """
    if isinstance(bias, Prefix):  # its key loop already bounds the logits to one chunk
        return _attend_prefix(q, k, v, bias, precision)
    if q.shape[2] > 2 * CPU_QUERY_BLOCK and jax.default_backend() == "cpu":
        one = lambda qb, bb: _attend_dense(qb, k, v, bb, precision)
        return _query_blocks(one, q, _rows_of(bias, q, k), bias, CPU_QUERY_BLOCK)
    return _attend_dense(q, k, v, bias, precision)


def _attend_dense(q: Array, k: Array, v: Array, bias: Optional[Array], precision: Precision) -> Array:
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision).astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v, precision=precision)


def _rows_of(bias: Optional[Array], q: Array, k: Array) -> Optional[Array]:
    """A bias with a row per query, broadcast to [..., Nq, Nk]; None if it has no query axis."""
    if bias is None or jnp.ndim(bias) < 2 or jnp.shape(bias)[-2] == 1:
        return None
    bias = jnp.asarray(bias)
    return jnp.broadcast_to(bias, bias.shape[:-2] + (q.shape[2], k.shape[2]))


def _query_blocks(one: Callable, q: Array, rows: Optional[Array], bias: Optional[Array], block: int) -> Array:
    """one(q_block, bias) over blocks of at most `block` queries (`lax.map`), concatenated: the same
    values as one(q, bias). `rows`: a [..., Nq, Nk] bias blocked along with the queries, or None to
    pass `bias` to every block as is."""
    b, h, nq, d = q.shape
    nb = -(-nq // block)
    block = -(-nq // nb)                      # even blocks of at most `block`: little padding
    pad = nb * block - nq                     # zero queries: finite, and sliced off below

    def blocks(x):                            # [..., Nq, X] -> [nb, ..., block, X]
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)])
        x = x.reshape(*x.shape[:-2], nb, block, x.shape[-1])
        return jnp.moveaxis(x, -3, 0)

    if rows is not None:
        out = jax.lax.map(lambda a: one(a[0], a[1]), (blocks(q), blocks(rows)))
    else:
        out = jax.lax.map(lambda qb: one(qb, bias), blocks(q))         # [nb, B, H, block, D]
    out = jnp.moveaxis(out, 0, -3).reshape(b, h, nb * block, d)          # [B, H, nb*block, D]
    return out[:, :, :nq]


def _attend_prefix(q: Array, k: Array, v: Array, prefix: Prefix, precision: Precision) -> Array:
    """`attend` over keys [0, prefix.length) only, one chunk of keys per loop iteration."""
    b, h, nq, d = q.shape
    c = prefix.chunk
    if k.shape[2] % c:
        raise ValueError(f"key capacity {k.shape[2]} is not a multiple of the chunk {c}")
    scale = d ** -0.5

    def body(i, carry):
        m, l, acc = carry                                   # [B,H,Nq], [B,H,Nq], [B,H,Nq,D] (float32)
        kc = jax.lax.dynamic_slice_in_dim(k, i * c, c, axis=2)       # [B, H, c, D]
        vc = jax.lax.dynamic_slice_in_dim(v, i * c, c, axis=2)
        s = jnp.einsum("bhqd,bhkd->bhqk", q, kc, precision=precision).astype(jnp.float32) * scale
        s = jnp.where(i * c + jnp.arange(c) < prefix.length, s, NEG_INF)  # [B, H, Nq, c]
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vc, precision=precision).astype(jnp.float32)
        return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    init = (jnp.full((b, h, nq), NEG_INF, jnp.float32), jnp.zeros((b, h, nq), jnp.float32),
            jnp.zeros((b, h, nq, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, (prefix.length + c - 1) // c, body, init)
    return (acc / l[..., None]).astype(v.dtype)


class KVCache(Protocol):
    """A layer's streaming cache as attention uses it (`xsvggt_jax.cache.LayerCache`): pure, it returns
    its next state instead of mutating itself."""

    def update(self, q: Array, k: Array, v: Array) -> tuple[Array, Array, Optional[Mask], "KVCache"]:
        """q, k, v [B, H, N, D] after norm + RoPE -> (keys, values to attend over [B, H, W, D], their mask
        (an additive bias or a `Prefix`), the cache after this call)."""
        ...


class Attention(nn.Module):
    """Multi-head self-attention with optional q/k LayerNorm and 2D RoPE.

    `rope` is a callable (x [B,H,N,D]) -> x applying rotary embedding with positions bound in.
    `cache` (streaming) supplies the attended keys/values and mask; its next state is returned.
    """

    num_heads: int
    qk_norm: bool = False
    dtype: Any = jnp.float32
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array, *, rope: Optional[Callable[[Array], Array]] = None,
                 bias: Optional[Mask] = None, cache: Optional[KVCache] = None) -> tuple[Array, Optional[KVCache]]:
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
            k, v, bias, cache = cache.update(q, k, v)
        o = attend(q, k, v, bias=bias, precision=self.precision)  # [B, H, N, D]
        o = o.transpose(0, 2, 1, 3).reshape(b, n, c)
        o = Dense(c, dtype=self.dtype, precision=self.precision, name="proj")(o)
        return o, cache


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
    def __call__(self, x: Array, *, rope=None, bias: Optional[Mask] = None,
                 cache: Optional[KVCache] = None) -> tuple[Array, Optional[KVCache]]:
        """x [B, N, C] -> (x' [B, N, C], the attention cache after this block, or None)."""
        c = x.shape[-1]
        h, cache = Attention(self.num_heads, qk_norm=self.qk_norm, dtype=self.dtype, precision=self.precision,
                             name="attn")(LayerNorm(self.layer_norm_eps, name="norm1")(x), rope=rope, bias=bias,
                                          cache=cache)
        if self.layer_scale:
            h = LayerScale(name="ls1")(h)
        x = x + h
        h = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, precision=self.precision, name="mlp")(
            LayerNorm(self.layer_norm_eps, name="norm2")(x))
        if self.layer_scale:
            h = LayerScale(name="ls2")(h)
        return x + h, cache


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention (batch_first): packed `in_proj` and `out_proj`."""

    num_heads: int
    dtype: Any = jnp.float32
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        c = x.shape[-1]
        hd = c // self.num_heads
        w = self.param("in_proj_kernel", nn.initializers.lecun_normal(), (c, 3 * c))
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * c,))
        wq, wk, wv = jnp.split(w, 3, axis=-1)
        bq, bk, bv = jnp.split(bias, 3)

        def heads(t, wt, bt):  # [B, N, C] -> [B, H, N, hd]
            y = jnp.einsum("bnc,co->bno", t, wt, precision=self.precision) + bt
            return y.reshape(*y.shape[:2], self.num_heads, hd).transpose(0, 2, 1, 3)

        o = attend(heads(x, wq, bq), heads(context, wk, bk), heads(context, wv, bv), precision=self.precision)
        o = o.transpose(0, 2, 1, 3).reshape(x.shape)
        return Dense(c, dtype=self.dtype, precision=self.precision, name="out_proj")(o)
