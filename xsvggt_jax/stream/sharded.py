"""Sequence parallelism for the offline forward: frames sharded over the mesh's `seq` axis.

Patch embedding, frame attention and the DPT heads work frame by frame: no communication. The global
attention of the aggregator and of the camera trunk crosses frames: as **ring attention** every device
keeps its queries while the K/V blocks travel the ring (`lax.ppermute`, one hop per step); each visiting
block is folded into the online softmax of `attention.blocked_states`, and blocks the frame-causal mask
empties are skipped (a zero trip count). The simpler `gather` variant all-gathers K/V first. A `data`
axis shards the batch of sequences alongside.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from xsvggt_jax.attention.kernels import (SEQUENCE_PARALLEL_IMPLS, AttentionConfigError, AttentionSpec, FrameCausal, Full,
                        KEY_BLOCK, QUERY_BLOCK, Mask, blocked_states, unblock)
from xsvggt_jax.nn.model import StreamVGGT
from xsvggt_jax.stream.mesh import DATA, SEQ, make_mesh
from xsvggt_jax.errors import InputError

Array = jax.Array
Precision = jax.lax.Precision


class SequenceShardError(InputError):
    """Frames or batch not divisible over the mesh, or an input the sharded forward does not support."""


def make_seq_mesh(seq: Optional[int] = None, data: int = 1) -> Mesh:
    """`parallel.make_mesh` over the first data * seq devices (seq: default all devices / data)."""
    n = jax.device_count()
    seq = n // data if seq is None else seq
    if seq < 1 or data < 1 or seq * data > n:
        raise SequenceShardError(f"a {data} x {seq} (data x seq) mesh needs {data * seq} devices; {n} available")
    return make_mesh(data, seq, jax.devices()[:data * seq])


def attend_sequence_parallel(q: Array, k: Array, v: Array, mask: Mask, precision: Precision, axis: str, *,
                             ring: bool = True, query_block: int = QUERY_BLOCK,
                             key_block: int = KEY_BLOCK) -> Array:
    """Attention over a sequence sharded contiguously over mesh `axis` (call inside `jax.shard_map`).

    q, k, v: this device's slice [B, H, N, D] of the global [B, H, n * N, D] sequence; mask: global
    indices. ring: pass K/V around the ring (memory of one K/V slice); else all-gather them.
    Returns this device's [B, H, N, D] of the output.
    """
    n = jax.lax.axis_size(axis)
    idx = jax.lax.axis_index(axis)
    nq, nk = q.shape[2], k.shape[2]
    fold = functools.partial(blocked_states, q, mask=mask, precision=precision, query_block=query_block,
                             key_block=key_block, q_offset=idx * nq)
    if not ring:
        k_all = jax.lax.all_gather(k, axis, axis=2, tiled=True)
        v_all = jax.lax.all_gather(v, axis, axis=2, tiled=True)
        return unblock(fold(k=k_all, v=v_all, states=None, k_offset=0), nq, v.dtype)
    states = None
    perm = [(j, (j + 1) % n) for j in range(n)]
    for step in range(n):                      # step r holds the K/V slice of device (idx - r) mod n
        states = fold(k=k, v=v, states=states, k_offset=((idx - step) % n) * nk)
        if step + 1 < n:
            k, v = jax.lax.ppermute((k, v), axis, perm)
    return unblock(states, nq, v.dtype)


def _local_offline(model: StreamVGGT, images: Array, causal: bool, spec: dict) -> dict:
    """The offline forward on this device's frames [B, S/n, H, W, 3] (a `StreamVGGT` method)."""
    b, s, h, w, _ = images.shape
    first = jax.lax.axis_index(SEQ) * s
    slot = jnp.minimum(first + jnp.arange(s), 1)          # special-token slot of the global frame index
    p = model.cfg.tokens_per_frame(h, w)
    mask = (lambda t: FrameCausal(t)) if causal else (lambda t: Full())
    aggregated, _ = model.aggregator(images, slot, global_bias=AttentionSpec(mask(p), axis=SEQ, **spec))
    pose = model.camera_head(aggregated[-1], bias=AttentionSpec(mask(1), axis=SEQ, **spec))[0][-1]
    return model._heads(aggregated, pose, h, w, None)


def offline_sharded(params: Any, images: Array, mesh: Mesh, causal: bool = True, *, model: StreamVGGT,
                    impl: str = "ring", query_block: int = QUERY_BLOCK, key_block: int = KEY_BLOCK) -> dict:
    """`StreamVGGT.offline` with the frames sharded over mesh axis "seq" (and the batch over "data").

    images: [B, S, H, W, 3] with S divisible by the seq axis size and B by the data axis size.
    impl: "ring" or "gather". Returns the offline outputs (no tracks), sharded the same way.
    Jit it with `model`, `causal`, `impl`, `mesh` static (e.g. via functools.partial).
    """
    if impl not in SEQUENCE_PARALLEL_IMPLS:
        raise AttentionConfigError(f"sequence-parallel attention is one of {SEQUENCE_PARALLEL_IMPLS}, got {impl!r}")
    b, s = images.shape[:2]
    n_seq, n_data = mesh.shape[SEQ], mesh.shape[DATA]
    if s % n_seq or b % n_data:
        raise SequenceShardError(f"{b} sequences x {s} frames do not split over a {n_data} x {n_seq} "
                                 f"(data x seq) mesh")
    model.cfg.tokens_per_frame(*images.shape[2:4])          # frame size checked before tracing
    spec = dict(impl=impl, query_block=query_block, key_block=key_block)
    local = lambda p, x: model.apply({"params": p}, x, causal, spec, method=_local_offline)
    frames = P(DATA, SEQ)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), frames), out_specs=frames,
                         check_vma=False)(params, images)
