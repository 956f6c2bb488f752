"""Attention kernels (scaled dot-product, softmax in float32) under a `masks.Mask` with global indices.

  xla      dense logits per call (on CPU in query blocks of `CPU_QUERY_BLOCK`, scoped by `options`);
  blocked  keys walked in blocks with an online softmax; per query block the loop runs only over the key
           blocks the mask leaves non-empty (a dynamic trip count), so memory is O(Nq * block) and a
           frame-causal forward costs about half a full one. Its pieces (`blocked_states`, `unblock`)
           also fold the K/V blocks of the sequence-parallel kernels (`attention.ring`);
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")` (the dispatcher checks that it fits).

Each also comes as `*_lse`: the unnormalised pieces of a partial softmax, (out float32, lse float32
[B, H, Nq]) with lse = logsumexp of the row's scaled, masked logits (-inf and out 0 for a row with no
key), so that attention over disjoint key sets merges exactly (`merge_lse`): the streaming step attends
to its cache and to the current frame separately instead of over their concatenation.

Shapes: q [B, H, Nq, D]; k, v [B, H, Nk, D]; outputs [B, H, Nq, D]. Which one runs: `attention.dispatch`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.attention.masks import NEG_INF, Additive, FrameCausal, KeyPrefix, Mask, as_mask

Array = jax.Array
Precision = jax.lax.Precision

# On CPU one fused attention over all queries materialises the whole [B, H, Nq, Nk] logits (208 MB for a
# published global layer: 1041 queries x 3123 keys x 16 heads) and runs memory-bound. Walking the queries
# in (even) blocks of at most this many keeps each block's logits in cache: 344 -> 155 ms for that layer,
# 67 -> 56 ms for 1041 keys, bit-identical (benchmarks/README.md). GPUs/TPUs keep the single fusion.
CPU_QUERY_BLOCK = 128
QUERY_BLOCK = 256           # `blocked`: queries per block
KEY_BLOCK = 512             # `blocked`: keys per online-softmax step


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Trace-time options of the kernels, scoped by `options(...)` (a context variable, not a module
    global). cpu_query_block: `xla`'s query block on CPU; None attends in one fusion (what XLA's cost
    analysis needs to count every block: it counts a loop body once). cache_split: whether a streaming
    layer attends to its cache and its current frame separately and merges them by log-sum-exp
    (`dispatch.attend_split`); None: where cuDNN runs. packed_kernel: what runs attention over packed
    codes (`dispatch.attend_packed`): "jax" (`packed.packed_lse`), "pallas" (`pallas_packed`, interpret
    mode off a GPU); None: the Pallas kernel on a GPU where it fits, else "jax"."""

    cpu_query_block: Optional[int] = CPU_QUERY_BLOCK
    cache_split: Optional[bool] = None
    packed_kernel: Optional[str] = None


_OPTIONS: contextvars.ContextVar[AttentionOptions] = contextvars.ContextVar("attention_options",
                                                                            default=AttentionOptions())


def current_options() -> AttentionOptions:
    """The `AttentionOptions` in force (while tracing)."""
    return _OPTIONS.get()


@contextlib.contextmanager
def options(**changes) -> Iterator[AttentionOptions]:
    """Within the block (while tracing), attention uses `AttentionOptions` with `changes` applied."""
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), **changes))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


# --------------------------------------------------------------------------------------------------- xla
def _attend_dense(q: Array, k: Array, v: Array, bias: Optional[Array], precision: Precision) -> Array:
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision).astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v, precision=precision)


def attend_xla(q: Array, k: Array, v: Array, mask: Mask, precision: Precision,
               query_block: Optional[int] = None) -> Array:
    """Dense attention, the mask's bias evaluated per query block. query_block: None picks the
    `options()` CPU query block on CPU for more than two blocks of queries, one block elsewhere."""
    nq, nk = q.shape[2], k.shape[2]
    if query_block is None:
        cpu_block = _OPTIONS.get().cpu_query_block
        on_cpu = cpu_block is not None and jax.default_backend() == "cpu" and nq > 2 * cpu_block
        query_block = cpu_block if on_cpu else nq
    ki = jnp.arange(nk)
    one = lambda qb, start: _attend_dense(qb, k, v, mask.bias(start + jnp.arange(qb.shape[2]), ki), precision)
    return _query_blocks(one, q, query_block)


def _query_blocks(one, q: Array, block: int) -> Array:
    """one(q_block [B, H, b, D], first query index) over even blocks of at most `block` queries,
    concatenated (`lax.map`): the same values as one(q, 0)."""
    b, h, nq, d = q.shape
    nb = -(-nq // block)
    if nb == 1:
        return one(q, 0)
    block = -(-nq // nb)                      # even blocks of at most `block`: little padding
    qs = _blocks(q, nb, block)                                               # [nb, B, H, block, D]
    out = jax.lax.map(lambda a: one(a[0], a[1]), (qs, jnp.arange(nb) * block))
    return jnp.moveaxis(out, 0, 2).reshape(b, h, nb * block, d)[:, :, :nq]


def _blocks(x: Array, nb: int, block: int) -> Array:
    """[B, H, N, D] -> [nb, B, H, block, D], zero padded (padded rows are finite and sliced off)."""
    x = jnp.pad(x, [(0, 0), (0, 0), (0, nb * block - x.shape[2]), (0, 0)])
    return jnp.moveaxis(x.reshape(*x.shape[:2], nb, block, x.shape[-1]), 2, 0)


# ----------------------------------------------------------------------------------------------- blocked
def block_schedule(mask: Any, nq: int, nk: int, query_block: int, key_block: int,
                   q_offset: Any = 0, k_offset: Any = 0) -> Any:
    """Key blocks each query block visits: [ceil(nq / query_block)] int32, numpy when everything is static.

    Query block i covers global queries q_offset + [i*qb, (i+1)*qb) (qb: even blocks of at most
    query_block); the keys are global [k_offset, k_offset + nk) in blocks of key_block. A block count
    stops at the last key the block's last query may see (`mask.key_end`): emptied blocks are skipped.
    """
    mask = as_mask(mask)
    nqb = -(-nq // query_block)
    qb = -(-nq // nqb)
    nkb = -(-nk // key_block)
    static = all(isinstance(x, (int, np.integer)) for x in (q_offset, k_offset))
    xp = np if static and not isinstance(mask, KeyPrefix) else jnp
    q_last = q_offset + np.minimum(np.arange(1, nqb + 1) * qb, nq) - 1                # [nqb]
    end = mask.key_end(q_last)
    if end is None:
        return xp.full((nqb,), nkb, xp.int32)
    trips = xp.clip(-(-(end - k_offset) // key_block), 0, nkb).astype(xp.int32)
    return xp.broadcast_to(trips, (nqb,))


def init_state(q: Array) -> tuple[Array, Array, Array]:
    """Online-softmax state of queries q [B, H, Nq, D]: running max m, sum l [B, H, Nq], acc [B, H, Nq, D]."""
    b, h, nq, d = q.shape
    return (jnp.full((b, h, nq), NEG_INF, jnp.float32), jnp.zeros((b, h, nq), jnp.float32),
            jnp.zeros((b, h, nq, d), jnp.float32))


def finish(state: tuple[Array, Array, Array], dtype: Any) -> Array:
    m, l, acc = state
    return (acc / l[..., None]).astype(dtype)


def fold_keys(q: Array, k: Array, v: Array, mask: Mask, precision: Precision, state, *, key_block: int,
              trips: Any, q_start: Any, k_start: Any, nk: Any):
    """Fold key blocks [0, trips) of k, v [B, H, nkb*key_block, D] into the online-softmax state of
    queries q [B, H, bq, D]. Global indices: queries q_start + i, keys k_start + j; keys j >= nk are
    padding. Returns the new state."""
    scale = q.shape[-1] ** -0.5
    qi = q_start + jnp.arange(q.shape[2])

    def body(i, carry):
        m, l, acc = carry
        kc = jax.lax.dynamic_slice_in_dim(k, i * key_block, key_block, axis=2)    # [B, H, kb, D]
        vc = jax.lax.dynamic_slice_in_dim(v, i * key_block, key_block, axis=2)
        local = i * key_block + jnp.arange(key_block)
        s = jnp.einsum("bhqd,bhkd->bhqk", q, kc, precision=precision).astype(jnp.float32) * scale
        bias = mask.bias(qi, k_start + local)
        if bias is not None:
            s = s + bias
        s = jnp.where(local < nk, s, NEG_INF)                                      # [B, H, bq, kb]
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)     # rows with no key yet: exp(-inf) = 0
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vc, precision=precision).astype(jnp.float32)
        return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    return jax.lax.fori_loop(0, trips, body, state)


def blocked_states(q: Array, k: Array, v: Array, mask: Mask, precision: Precision, states, *,
                   query_block: int, key_block: int, q_offset: Any = 0, k_offset: Any = 0):
    """Fold keys k, v [B, H, Nk, D] (global offset k_offset) into per-query-block states of
    q [B, H, Nq, D] (global offset q_offset), skipping key blocks the mask empties.

    states: stacked `init_state` of the query blocks ([nqb, ...] leaves) or None for fresh ones.
    Returns the new stacked states.
    """
    nq, nk = q.shape[2], k.shape[2]
    nqb = -(-nq // query_block)
    qb = -(-nq // nqb)
    nkb = -(-nk // key_block)
    pad = [(0, 0), (0, 0), (0, nkb * key_block - nk), (0, 0)]
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    trips = jnp.asarray(block_schedule(mask, nq, nk, query_block, key_block, q_offset, k_offset))
    qs = _blocks(q, nqb, qb)                                                    # [nqb, B, H, qb, D]
    if states is None:
        states = jax.vmap(init_state)(qs)
    starts = q_offset + jnp.arange(nqb) * qb

    def one(args):
        qblk, trip, start, state = args
        return fold_keys(qblk, k, v, mask, precision, state, key_block=key_block, trips=trip,
                         q_start=start, k_start=k_offset, nk=nk)

    if nqb == 1:                                # no loop over a single query block
        return jax.tree.map(lambda x: x[None], one(jax.tree.map(lambda x: x[0], (qs, trips, starts, states))))
    return jax.lax.map(one, (qs, trips, starts, states))


def unblock(states, nq: int, dtype: Any) -> Array:
    """Normalise stacked query-block states into the output [B, H, Nq, D]."""
    out = jax.vmap(lambda s: finish(s, dtype))(states)                          # [nqb, B, H, qb, D]
    nqb, b, h, qb, d = out.shape
    return jnp.moveaxis(out, 0, 2).reshape(b, h, nqb * qb, d)[:, :, :nq]


def attend_blocked(q: Array, k: Array, v: Array, mask: Any, precision: Precision = Precision.HIGHEST, *,
                   query_block: int = QUERY_BLOCK, key_block: int = KEY_BLOCK) -> Array:
    """Blockwise attention (online softmax over key blocks, emptied blocks skipped). Shapes as `attend`."""
    mask = as_mask(mask)
    states = blocked_states(q, k, v, mask, precision, None, query_block=query_block, key_block=key_block)
    return unblock(states, q.shape[2], v.dtype)


def attend_blocked_lse(q: Array, k: Array, v: Array, mask: Any, precision: Precision = Precision.HIGHEST, *,
                       query_block: int = QUERY_BLOCK, key_block: int = KEY_BLOCK) -> tuple[Array, Array]:
    """`attend_blocked`'s partial softmax: (out float32 [B, H, Nq, D], lse float32 [B, H, Nq])."""
    mask = as_mask(mask)
    states = blocked_states(q, k, v, mask, precision, None, query_block=query_block, key_block=key_block)
    m, l, acc = states
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), NEG_INF)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    nq = q.shape[2]
    nqb, b, h, qb, d = out.shape
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, nqb * qb, d)[:, :, :nq]
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, nqb * qb)[:, :, :nq]
    return out, lse


# ----------------------------------------------------------------------------------------- partial softmax
def attend_xla_lse(q: Array, k: Array, v: Array, mask: Mask, precision: Precision) -> tuple[Array, Array]:
    """Dense attention's partial softmax: (out float32 [B, H, Nq, D], lse float32 [B, H, Nq]); a row
    whose keys are all masked gets lse -inf and out 0."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=precision).astype(jnp.float32) * scale
    bias = as_mask(mask).bias(jnp.arange(q.shape[2]), jnp.arange(k.shape[2]))
    if bias is not None:
        logits = logits + bias
    m = logits.max(-1, initial=NEG_INF)
    m_safe = jnp.where(m == NEG_INF, 0.0, m)             # a row with no key: exp(-inf) = 0
    p = jnp.exp(logits - m_safe[..., None])
    l = p.sum(-1)
    acc = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, precision=precision).astype(jnp.float32)
    # normalised as the online softmax's `finish` (m + log l, acc / l): the same rounding as `blocked`
    lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), NEG_INF)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out, lse


def merge_lse(parts, dtype: Any) -> Array:
    """Exact softmax attention over the union of disjoint key sets from their partial results
    [(out_i float32 [B, H, Nq, D], lse_i float32 [B, H, Nq])]: sum_i exp(lse_i - lse) out_i with
    lse = logaddexp_i lse_i. A part with lse -inf (no key) weighs 0."""
    lse = functools.reduce(jnp.logaddexp, [p[1] for p in parts])
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    out = sum(jnp.exp(l - safe)[..., None] * o for o, l in parts)
    return out.astype(dtype)


# ------------------------------------------------------------------------------------------------- cudnn
def _cudnn_kwargs(q: Array, k: Array, mask: Mask) -> dict:
    kw: dict = {}
    if isinstance(mask, FrameCausal):
        kw["is_causal"] = True                               # one token per frame (checked)
    elif isinstance(mask, KeyPrefix):
        kw["key_value_seq_lengths"] = jnp.broadcast_to(jnp.asarray(mask.length, jnp.int32), (q.shape[0],))
    elif isinstance(mask, Additive):
        kw["bias"] = jnp.broadcast_to(mask.array, (q.shape[0], q.shape[1], q.shape[2], k.shape[2])).astype(q.dtype)
    return kw


def _t(x: Array) -> Array:
    return x.transpose(0, 2, 1, 3)                           # [B, H, N, D] <-> [B, N, H, D]


def attend_cudnn(q: Array, k: Array, v: Array, mask: Mask) -> Array:
    """`jax.nn.dot_product_attention(implementation="cudnn")` (the caller checked that it fits)."""
    return _t(jax.nn.dot_product_attention(_t(q), _t(k), _t(v), implementation="cudnn",
                                           **_cudnn_kwargs(q, k, mask)))


def attend_cudnn_lse(q: Array, k: Array, v: Array, mask: Mask) -> tuple[Array, Array]:
    """cuDNN flash attention's partial softmax (`return_residual=True`: the softmax's logsumexp).
    jax's wrapper hands the residual back in the inputs' dtype (bfloat16 would blur the merge
    weights); cuDNN's own float32 statistic is taken from the lower-level call where jax has it.
    A `KeyPrefix` of length 0 (an empty cache) gives lse -inf, out 0, whatever cuDNN leaves there."""
    kw = _cudnn_kwargs(q, k, mask)
    out, lse = None, None
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa   # float32 residual, [B, H, T]
        seqlens = kw.get("key_value_seq_lengths")
        mask_type = fa.MaskType.PADDING if seqlens is not None else fa.MaskType.NO_MASK
        if kw.get("is_causal"):
            mask_type = fa.MaskType.CAUSAL
        q_len = None if seqlens is None else jnp.full((q.shape[0],), q.shape[2], jnp.int32)
        out, lse = fa.dot_product_attention(_t(q), _t(k), _t(v), kw.get("bias"), None, q_len, seqlens,
                                            scale=q.shape[-1] ** -0.5, mask_type=mask_type,
                                            qkv_layout="BTNH", return_residual=True)
        out, lse = _t(out), lse.astype(jnp.float32)
    except Exception as e:  # noqa: BLE001 - a private API: fall back to the public one
        _log_once(f"cuDNN float32 softmax statistic unavailable ({type(e).__name__}: {e}); "
                  "using jax.nn.dot_product_attention's residual")
        out, res = jax.nn.dot_product_attention(_t(q), _t(k), _t(v), implementation="cudnn",
                                                return_residual=True, **kw)
        out, lse = _t(out), res.transpose(0, 2, 1).astype(jnp.float32)       # [B, T, N] -> [B, N, T]
    out = out.astype(jnp.float32)
    if isinstance(mask, KeyPrefix):
        empty = jnp.asarray(mask.length) <= 0
        lse = jnp.where(empty, NEG_INF, lse)
        out = jnp.where(empty, 0.0, out)
    return out, lse


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logging.getLogger(__name__).info(message)
