"""The torch -> Flax key map, as a table.

A torch key such as ``aggregator.frame_blocks.3.attn.qkv.weight`` is mapped in two steps:

1. PATH_RULES rewrite the module path (regex substitutions, applied in order);
2. LEAF_RULES pick the Flax leaf name and the tensor transform (first match wins).

Flax modules are named after the upstream ones, so most keys only need list indices folded into the
module name (``frame_blocks.3`` -> ``frame_blocks_3``) and the leaf renamed.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import numpy as np

# ------------------------------------------------------------------------------------ transforms
# Each transform maps a torch-layout array to the Flax layout; they only permute axes, so they work
# on anything with `.transpose` (numpy arrays, jax arrays, ShapeDtypeStruct via jax.eval_shape).


def identity(x):
    return x


def linear(x):
    """nn.Linear weight [out, in] -> Dense kernel [in, out]."""
    return x.transpose(1, 0)


def conv(x):
    """nn.Conv2d weight [out, in, kh, kw] (OIHW) -> [kh, kw, in, out] (HWIO)."""
    return x.transpose(2, 3, 1, 0)


def conv_transpose(x):
    """nn.ConvTranspose2d weight [in, out, kh, kw] -> [kh, kw, in, out] (stride == kernel, no flip)."""
    return x.transpose(2, 3, 0, 1)


class LeafRule(NamedTuple):
    pattern: str            # regex on the rewritten torch key
    leaf: str | None        # Flax leaf name replacing the last key component (None: keep)
    transform: Callable
    rank: int | None = None  # only when the tensor has this rank


# ------------------------------------------------------------------------------------ the table
PATH_RULES: tuple[tuple[str, str], ...] = (
    # DINOv2's patch conv lives directly in our PatchEmbed module (no `.proj` level)
    (r"\.patch_embed\.proj\.", ".patch_embed."),
    # DPT: the final convs sit outside our `scratch` module (they run after the last resize)
    (r"\.scratch\.output_conv2\.(\d+)\.", r".output_conv2_\1."),
    # ModuleList / Sequential indices fold into the module name: blocks.3.x -> blocks_3.x
    (r"\.(\d+)(?=\.)", r"_\1"),
)

LEAF_RULES: tuple[LeafRule, ...] = (
    LeafRule(r"norm\w*\.weight$", "scale", identity),              # LayerNorm / GroupNorm(1, C)
    LeafRule(r"\.in_proj_weight$", "in_proj_kernel", linear),      # nn.MultiheadAttention packed qkv
    LeafRule(r"resize_layers_[01]\.weight$", "kernel", conv_transpose),
    LeafRule(r"\.weight$", "kernel", conv, rank=4),                 # nn.Conv2d
    LeafRule(r"\.weight$", "kernel", linear, rank=2),               # nn.Linear
    LeafRule(r".", None, identity),                                 # biases, gammas, tokens, embeddings
)


def map_key(torch_key: str, rank: int) -> tuple[str, Callable]:
    """Torch state_dict key (and tensor rank) -> (dotted Flax param path, transform)."""
    key = torch_key
    for pattern, repl in PATH_RULES:
        key = re.sub(pattern, repl, key)
    for rule in LEAF_RULES:
        if re.search(rule.pattern, key) and (rule.rank is None or rule.rank == rank):
            if rule.leaf is not None:
                key = key.rsplit(".", 1)[0] + "." + rule.leaf
            return key, rule.transform
    raise AssertionError("the last LEAF_RULE matches every key")  # pragma: no cover


def transformed_shape(shape: tuple[int, ...], transform: Callable) -> tuple[int, ...]:
    """Shape a tensor of `shape` has after `transform` (no data needed)."""
    return transform(np.broadcast_to(np.zeros((), np.bool_), shape)).shape
