"""Sequence parallelism for the offline forward: frames sharded over the mesh's `seq` axis.

Patch embedding, frame attention and the DPT heads work frame by frame: no communication. The global
attention of the aggregator and of the camera trunk crosses frames: it runs sequence parallel
(`attention.ring`: ring attention, K/V blocks travelling the ring, or the all-gathered `gather`
variant). `offline_sharded` runs the model's own `StreamVGGT.offline` under `jax.shard_map`, told the
mesh axis and each device's first frame. A `data` axis shards the batch of sequences alongside.

What runs on a mesh must be placed on it: `place_on_mesh` replicates the parameters (loaded ones sit on
one device) and shards the frames; whoever builds the mesh calls it (`stream.offline.run_offline`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xsvggt_jax.attention.dispatch import SEQUENCE_PARALLEL_IMPLS, AttentionConfigError, AttentionSpec
from xsvggt_jax.attention.kernels import KEY_BLOCK, QUERY_BLOCK
from xsvggt_jax.nn.model import StreamVGGT
from xsvggt_jax.stream.mesh import DATA, SEQ, make_mesh
from xsvggt_jax.errors import InputError
from xsvggt_jax.weights.quant import dequantize_params

Array = jax.Array
FRAMES = P(DATA, SEQ)    # [B, S, ...]: the batch over "data", the frames over "seq"


class SequenceShardError(InputError):
    """Frames or batch not divisible over the mesh, or an input the sharded forward does not support."""


def make_seq_mesh(seq: Optional[int] = None, data: int = 1) -> Mesh:
    """`parallel.make_mesh` over the first data * seq devices (seq: default all devices / data)."""
    n = jax.device_count()
    seq = n // data if seq is None else seq
    if seq < 1 or data < 1 or seq * data > n:
        raise SequenceShardError(f"a {data} x {seq} (data x seq) mesh needs {data * seq} devices; {n} available")
    return make_mesh(data, seq, jax.devices()[:data * seq])


def place_on_mesh(params: Any, images: Array, mesh: Mesh) -> tuple[Any, Array]:
    """(params replicated over `mesh`, images [B, S, H, W, 3] sharded as `FRAMES`): the placement
    `offline_sharded` runs on. A jitted forward over the mesh refuses arguments committed elsewhere
    (e.g. `load_params`' parameters, on the first device)."""
    params = jax.device_put(params, NamedSharding(mesh, P()))
    return params, jax.device_put(images, NamedSharding(mesh, FRAMES))


def offline_sharded(params: Any, images: Array, mesh: Mesh, causal: bool = True, *, model: StreamVGGT,
                    impl: str = "ring", query_block: int = QUERY_BLOCK, key_block: int = KEY_BLOCK) -> dict:
    """`StreamVGGT.offline` with the frames sharded over mesh axis "seq" (and the batch over "data").

    images: [B, S, H, W, 3] with S divisible by the seq axis size and B by the data axis size; params
    and images on `mesh` (`place_on_mesh`). impl: "ring" or "gather". Returns the offline outputs (no
    tracks), sharded the same way. Jit it with `model`, `causal`, `impl`, `mesh` static (e.g. via
    functools.partial).
    """
    if impl not in SEQUENCE_PARALLEL_IMPLS:
        raise AttentionConfigError(f"sequence-parallel attention is one of {SEQUENCE_PARALLEL_IMPLS}, got {impl!r}")
    b, s = images.shape[:2]
    n_seq, n_data = mesh.shape[SEQ], mesh.shape[DATA]
    if s % n_seq or b % n_data:
        raise SequenceShardError(f"{b} sequences x {s} frames do not split over a {n_data} x {n_seq} "
                                 f"(data x seq) mesh")
    model.cfg.tokens_per_frame(*images.shape[2:4])          # frame size checked before tracing
    spec = AttentionSpec(impl=impl, axis=SEQ, query_block=query_block, key_block=key_block)

    def local(p, x):                                        # this device's frames [B/d, S/n, H, W, 3]
        first = jax.lax.axis_index(SEQ) * x.shape[1]
        return model.apply({"params": dequantize_params(p)}, x, None, causal, spec=spec, frame_offset=first,
                           method=StreamVGGT.offline)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), FRAMES), out_specs=FRAMES, check_vma=False)(params, images)
