"""Weight-only quantization: int8 / int4 codes with float32 scales, converted once, kept packed (in a
params directory and in device memory) and dequantized where the jitted step uses them.

* `WeightFormat`: what to store: "float", "int8" or "int4", the group size along a kernel's input
  (None: one scale per output channel) and the parameters that stay float (`KEEP_FLOAT`).
  `WeightFormat.from_text("int4:64")` reads the `--weights` flag (FORMAT[:GROUP|:channel]).
* `quantize_params(params, fmt)`: the float tree with every eligible kernel replaced by a *code node*,
  a dict ``{"int8": codes, "scale": s}`` or ``{"int4": packed, "scale": s}`` (self-describing: the key
  names the code width, the scale's shape the group; nothing else is needed to decode it).
* `dequantize_params(tree)`: the float tree back (inside `jax.jit`: the packed arrays are the
  arguments, the float kernels only temporaries of the step). A tree without code nodes is returned
  as is, so float weights run exactly as before.
* `stored_shapes(shapes, fmt)`: the tree `quantize_params` makes, as ShapeDtypeStructs (what a
  params directory is checked against before its arrays are read); `describe(tree)`: the record
  report.json and results.json keep (format, groups, arrays, bytes).

Layout of a code node for a kernel of shape [..., N] (Dense [K, N], conv [kh, kw, cin, N]): the
leading axes are the reduction, flattened to K rows; one float32 scale per (group of `group` rows,
output column): scale [K / group, N], qwix's subchannel ("tiled") layout. Codes are symmetric (no
zero point), absmax-calibrated as qwix calibrates them (scale = absmax / (qmax + 1/2)): int8 in
[-128, 127], int4 in [-8, 7]. In the step a node is decoded as a qwix `QArray` by `qwix.dequantize`;
the codes are made on the host in numpy (tests/test_weight_quant.py holds them equal to
`qwix.quantize`'s), because qwix's quantize runs eagerly op by op on device arrays: it compiled for
every kernel shape and took 30 s to quantize the tiny reference model here (numpy: well under 1 s).
int8 codes keep the kernel's shape. int4 codes are packed two to a byte
along the output axis (column 2j in the low nibble, 2j+1 in the high one) into int8 [..., N / 2],
because XLA stores an int4 array one byte per element on the CPU (measured: a 1024x512 int4 array
takes 524288 bytes on device), which would save nothing there. A kernel is quantized when its name is
"kernel" or "in_proj_kernel", it has >= 2 dims, no `keep` pattern matches its "/"-joined path, and,
for int4, N is even; a group that does not divide K falls back to one scale per column for that
kernel. Biases, norms, embeddings and tokens stay float.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.errors import ConfigError

__all__ = ["WEIGHT_FORMATS", "DEFAULT_GROUP", "KEEP_FLOAT", "WeightFormat", "quantize_params", "dequantize_params",
           "stored_shapes", "is_quantized", "describe", "tree_bytes", "device_bytes"]

WEIGHT_FORMATS = ("float", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP: Mapping[str, Optional[int]] = {"int8": None, "int4": 64}
KERNEL_NAMES = ("kernel", "in_proj_kernel")
# parameters that stay float by default (fnmatch patterns on "/"-joined paths): the heads' last layers
# (a few output channels each: depth, point map, pose, track flow / vis / conf; 0.2% of the demo model's
# bytes). Measured on the shipped demo model (8 streamed frames, vs float): int8 everywhere moves depth
# by 6.8e-3, with these float 1.5e-3; keeping the DINOv2 patch embedding float as well changes nothing
# (6.8e-3 with it alone), so it is quantized. benchmarks/README.md, "Weights in int8 / int4".
KEEP_FLOAT: tuple[str, ...] = (
    "depth_head/output_conv2_2/*", "point_head/output_conv2_2/*", "camera_head/pose_branch/fc2/*",
    "track_head/tracker/updateformer/flow_head/*", "track_head/tracker/vis_predictor_0/*",
    "track_head/tracker/conf_predictor_0/*",
)
SCALE = "scale"


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """format: "float" | "int8" | "int4"; group: input rows per scale (None: one scale per output
    channel); keep: fnmatch patterns of "/"-joined parameter paths that stay float."""

    format: str = "float"
    group: Optional[int] = None
    keep: tuple[str, ...] = KEEP_FLOAT

    def __post_init__(self):
        if self.format not in WEIGHT_FORMATS:
            raise ConfigError("weights", f"must be one of {', '.join(WEIGHT_FORMATS)}, got {self.format!r}")
        if self.group is not None and (isinstance(self.group, bool) or not isinstance(self.group, int)
                                       or self.group < 1):
            raise ConfigError("weights group", f"must be a positive integer, got {self.group!r}")
        if self.format == "float" and self.group is not None:
            raise ConfigError("weights", "float weights take no group size")
        object.__setattr__(self, "keep", tuple(self.keep))

    @property
    def quantized(self) -> bool:
        return self.format != "float"

    @classmethod
    def from_text(cls, text: str) -> "WeightFormat":
        """FORMAT[:GROUP]: float, int8 (one scale per output channel), int4 (groups of
        DEFAULT_GROUP["int4"] input rows), int8:128, int4:channel, ..."""
        name, _, group = text.strip().partition(":")
        if name not in WEIGHT_FORMATS:
            raise ConfigError("--weights", f"must be float, int8 or int4, optionally :GROUP or :channel "
                                           f"(e.g. int4:64), got {text!r}")
        if not group:
            return cls(name, DEFAULT_GROUP.get(name))
        if name == "float":
            raise ConfigError("--weights", f"float takes no group size, got {text!r}")
        if group == "channel":
            return cls(name, None)
        if not group.isdigit() or int(group) < 1:
            raise ConfigError("--weights", f"group must be a positive integer or 'channel', got {text!r}")
        return cls(name, int(group))

    def to_text(self) -> str:
        if not self.quantized:
            return "float"
        return f"{self.format}:{self.group or 'channel'}"

    def to_dict(self) -> dict:
        return {"format": self.format, "group": self.group, "keep": list(self.keep)}

    @classmethod
    def from_dict(cls, data: Any) -> "WeightFormat":
        if not isinstance(data, Mapping) or set(data) - {"format", "group", "keep"} or "format" not in data:
            raise ConfigError("weights", f"must be an object with format, group and keep, got {data!r}")
        keep = data.get("keep", KEEP_FLOAT)
        if not isinstance(keep, (list, tuple)) or not all(isinstance(k, str) for k in keep):
            raise ConfigError("weights.keep", f"must be a list of path patterns, got {keep!r}")
        return cls(data["format"], data.get("group"), tuple(keep))


# ---------------------------------------------------------------------------------------- one kernel
def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1])


def _group_rows(shape: tuple[int, ...], group: Optional[int]) -> int:
    """Rows per scale for a kernel of `shape`: `group` where it divides K (and is smaller), else K."""
    k = _rows(shape)
    return group if group and group < k and k % group == 0 else k


def _eligible(path: str, shape: tuple[int, ...], fmt: WeightFormat) -> bool:
    return (fmt.quantized and path.rsplit("/", 1)[-1] in KERNEL_NAMES and len(shape) >= 2
            and not any(fnmatch.fnmatchcase(path, p) for p in fmt.keep)
            and (fmt.format != "int4" or shape[-1] % 2 == 0))


def _code_shape(shape: tuple[int, ...], fmt: str) -> tuple[int, ...]:
    return shape if fmt == "int8" else (*shape[:-1], shape[-1] // 2)


def _quantize_kernel(x, fmt: WeightFormat) -> dict:
    """A float kernel -> its code node (numpy, on the host: conversion compiles nothing)."""
    shape = tuple(x.shape)
    k, n = _rows(shape), shape[-1]
    g = _group_rows(shape, fmt.group)
    x3 = np.asarray(x, np.float32).reshape(k // g, g, n)
    qmax = 2 ** (BITS[fmt.format] - 1) - 1
    # symmetric absmax over each group, the bound qmax + 1/2 so the top bucket is used fully (as qwix's
    # `quantize` calibrates); an all-zero group gets scale 1 (its codes are 0 either way)
    scale = np.abs(x3).max(axis=1) / np.float32(qmax + 0.5)
    scale = np.where(scale < np.sqrt(np.finfo(np.float32).tiny), np.float32(1), scale).astype(np.float32)
    codes = np.clip(np.round(x3 / scale[:, None, :]), -qmax - 1, qmax).astype(np.int8).reshape(shape)
    if fmt.format == "int4":
        lo, hi = codes[..., 0::2].view(np.uint8), codes[..., 1::2].view(np.uint8)
        codes = ((lo & 0x0F) | (hi << 4)).astype(np.uint8).view(np.int8)
    return {fmt.format: codes, SCALE: scale}


def _unpack_int4(packed: jax.Array) -> jax.Array:
    """int8 [..., N/2] of two signed nibbles -> int8 codes [..., N] (sign-extending shifts)."""
    lo = jnp.right_shift(jnp.left_shift(packed, 4), 4)
    hi = jnp.right_shift(packed, 4)
    return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _dequantize_kernel(node: Mapping) -> jax.Array:
    import qwix

    (fmt,) = set(node) - {SCALE}
    codes = _unpack_int4(node[fmt]) if fmt == "int4" else node[fmt]
    shape = tuple(codes.shape)
    q = qwix.QArray(codes.reshape(_rows(shape), shape[-1]), node[SCALE], qtype=jnp.int8)
    return qwix.dequantize(q).reshape(shape)


def _is_node(x: Any) -> bool:
    return isinstance(x, Mapping) and len(x) == 2 and SCALE in x and (set(x) - {SCALE}) <= set(BITS)


# ------------------------------------------------------------------------------------------ trees
def _map_kernels(tree: Any, fn, path: str = "") -> Any:
    """`tree` with fn(path, leaf) applied to each leaf (dicts walked by key; code nodes are leaves)."""
    if isinstance(tree, Mapping) and not _is_node(tree):
        return {k: _map_kernels(v, fn, f"{path}/{k}" if path else str(k)) for k, v in tree.items()}
    return fn(path, tree)


def is_quantized(tree: Any) -> bool:
    """Whether the tree holds code nodes."""
    found = []
    _map_kernels(tree, lambda p, x: found.append(_is_node(x)))
    return any(found)


def quantize_params(params: Any, fmt: WeightFormat | str) -> Any:
    """The float params with every eligible kernel as a code node (numpy arrays; `jax.device_put`
    them). "float" returns `params` unchanged. Raises ConfigError for a tree already quantized."""
    fmt = WeightFormat.from_text(fmt) if isinstance(fmt, str) else fmt
    if not fmt.quantized:
        return params
    if is_quantized(params):
        raise ConfigError("the parameters are already quantized: quantize float parameters")
    return _map_kernels(params, lambda p, x: _quantize_kernel(x, fmt) if _eligible(p, tuple(x.shape), fmt) else x)


def dequantize_params(tree: Any) -> Any:
    """The float parameters of a tree with code nodes (float32 kernels; jit-friendly); a tree without
    any is returned itself."""
    if not is_quantized(tree):
        return tree
    return _map_kernels(tree, lambda p, x: _dequantize_kernel(x) if _is_node(x) else x)


def stored_shapes(shapes: Any, fmt: WeightFormat) -> Any:
    """The float parameter tree `shapes` (arrays or ShapeDtypeStructs) as `quantize_params(., fmt)`
    stores it, as ShapeDtypeStructs."""
    def one(path, x):
        shape = tuple(x.shape)
        if not _eligible(path, shape, fmt):
            return jax.ShapeDtypeStruct(shape, x.dtype)
        g = _group_rows(shape, fmt.group)
        return {fmt.format: jax.ShapeDtypeStruct(_code_shape(shape, fmt.format), jnp.int8),
                SCALE: jax.ShapeDtypeStruct((_rows(shape) // g, shape[-1]), jnp.float32)}
    return _map_kernels(shapes, one)


def tree_bytes(tree: Any) -> int:
    """Bytes of the tree's arrays as stored (itemsize x size; packed int4 counts half a byte a code)."""
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(tree)))


def device_bytes(tree: Any) -> int:
    """Bytes the tree's device arrays occupy on their devices (`on_device_size_in_bytes`, per shard)."""
    return int(sum(x.on_device_size_in_bytes() for x in jax.tree.leaves(tree)))


def describe(tree: Any) -> dict:
    """What report.json records of the weights that ran: format ("float", "int8", "int4"), group
    sizes used (ints, "channel" for one scale per output column), quantized and float arrays, bytes
    as stored and as float32."""
    nodes, floats, groups, float32 = {}, 0, set(), 0

    def visit(path, x):
        nonlocal floats, float32
        if _is_node(x):
            (fmt,) = set(x) - {SCALE}
            shape = _code_shape_inverse(tuple(x[fmt].shape), fmt)
            nodes[fmt] = nodes.get(fmt, 0) + 1
            rows = _rows(shape) // x[SCALE].shape[0]
            groups.add("channel" if rows == _rows(shape) else rows)
            float32 += 4 * math.prod(shape)
        else:
            floats += 1
            float32 += 4 * math.prod(x.shape)
        return x

    _map_kernels(tree, visit)
    fmt = "int4" if "int4" in nodes else "int8" if "int8" in nodes else "float"
    return {"format": fmt, "groups": sorted(groups, key=str), "quantized_arrays": sum(nodes.values()),
            "float_arrays": floats, "bytes": tree_bytes(tree), "float32_bytes": int(float32)}


def _code_shape_inverse(shape: tuple[int, ...], fmt: str) -> tuple[int, ...]:
    return shape if fmt == "int8" else (*shape[:-1], 2 * shape[-1])
