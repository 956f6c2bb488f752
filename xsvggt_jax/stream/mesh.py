"""Device mesh and shardings for running many streams at once.

A mesh has two named axes: `data` splits the batch of streams (each device holds B / D of them),
`seq` is reserved for splitting one stream's tokens (size 1 today). The placements used with it:

* parameters: replicated on every device (`replicated(mesh)`, `PartitionSpec()`);
* frames [B, H, W, 3], pool caches (every leaf has the slot axis first, see `xsvggt_jax.stream.pool`) and
  step outputs [B, ...]: split along their leading axis on `data` (`batch_sharding(mesh)`,
  `PartitionSpec("data")`). B must be a multiple of the `data` size.

    mesh = make_mesh()                                   # all devices on `data`
    params = jax.device_put(params, replicated(mesh))
    frames = jax.device_put(frames, batch_sharding(mesh))  # [B, H, W, 3], B % mesh.shape["data"] == 0
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from xsvggt_jax.errors import ConfigError

DATA, SEQ = "data", "seq"
AXES = (DATA, SEQ)

__all__ = ["DATA", "SEQ", "AXES", "MeshError", "make_mesh", "replicated", "batch_sharding", "check_batch",
           "per_device_bytes"]


class MeshError(ConfigError):
    """A mesh that does not fit the devices, or a batch that does not split over it."""


def make_mesh(data: Optional[int] = None, seq: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ("data", "seq") mesh of data x seq devices (default: every device of `jax.devices()`, all on
    `data`). data defaults to len(devices) // seq; data * seq must equal the number of devices.
    The axes are `AxisType.Auto`: jit's in/out shardings place (and reshard) the arrays, and the
    compiler propagates the shardings inside (the pool step itself runs under `shard_map`)."""
    devices = list(jax.devices() if devices is None else devices)
    if seq < 1 or len(devices) % seq:
        raise MeshError(f"seq={seq} does not divide the {len(devices)} devices")
    data = len(devices) // seq if data is None else data
    if data < 1 or data * seq != len(devices):
        raise MeshError(f"a {data} x {seq} (data x seq) mesh needs {max(data, 0) * seq} devices, "
                        f"got {len(devices)}")
    return jax.make_mesh((data, seq), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, a fresh single-stream cache)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (stream / slot) axis split over `data`, the rest whole: frames [B, H, W, 3], pool
    caches (slot axis first on every leaf), outputs [B, ...]."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def check_batch(mesh: Mesh, batch: int) -> None:
    """B streams split evenly over the `data` axis."""
    d = mesh.shape[DATA]
    if batch < 1 or batch % d:
        raise MeshError(f"{batch} streams do not split over {d} devices on '{DATA}': use a multiple of {d}")


def per_device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each device stores of the array leaves of `tree` (from their addressable shards)."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.size * shard.data.dtype.itemsize
    return out
