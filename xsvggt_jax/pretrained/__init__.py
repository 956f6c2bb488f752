"""Weights shipped with the package: small models trained here (see each model's card).

    params, cfg = xsvggt_jax.pretrained.load("demo")

Each model is `<name>.safetensors` (leaves keyed by their "/"-joined pytree path, stored in the
card's `storage_dtype`) plus `<name>.json` (its ModelConfig, training settings and held-out metrics,
written by `xsvggt_jax.pretrained.build`) and a human-readable `<name>.md` model card.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.model import param_shapes
from xsvggt_jax.errors import InputError

#: Shipped models; one entry per `<name>.safetensors` / `<name>.json` pair in this package.
MODELS: tuple[str, ...] = ("demo", "stream8")


class PretrainedError(InputError):
    """An unknown model name, or a shipped file that does not match its card."""


def _file(name: str, suffix: str):
    if name not in MODELS:
        raise PretrainedError(f"unknown pretrained model {name!r}; shipped: {', '.join(MODELS)}")
    return resources.files(__name__).joinpath(f"{name}{suffix}")


def card(name: str = "demo") -> dict[str, Any]:
    """The model's card: {"config", "frame_size" [H, W], "training", "heldout", "storage_dtype", ...}."""
    return json.loads(_file(name, ".json").read_text())


def load(name: str = "demo", dtype: Optional[str] = None) -> tuple[dict, ModelConfig]:
    """(params, cfg) of a shipped model: float32 device arrays (whatever the storage dtype), and its
    ModelConfig (compute dtype `dtype` if given, else the card's)."""
    import safetensors.numpy

    info = card(name)
    cfg = ModelConfig.from_dict(info["config"])
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    flat = safetensors.numpy.load(_file(name, ".safetensors").read_bytes())
    params = unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
    if shapes(params) != shapes(param_shapes(cfg)):
        raise PretrainedError(f"{name}.safetensors does not match the configuration in {name}.json")
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float32)), params), cfg
