"""StreamVGGT streaming 4D reconstruction in JAX/Flax with XStreamVGGT KV-cache compression.

The public names below load lazily: ``import xsvggt_jax`` stays cheap (no JAX import) until one is
used, e.g.::

    import xsvggt_jax as xs
    params, cfg = xs.load_params("params/")
    step = xs.make_step(cfg, xs.CacheConfig(prune="xstream", budget=2048))
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

try:
    __version__ = metadata.version("xsvggt-jax")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# public name -> submodule that defines it
_EXPORTS = {
    "ModelConfig": "config", "ConfigError": "config", "PRESETS": "config", "DTYPES": "config",
    "CacheConfig": "cache.core", "init_cache": "cache.core",
    "make_step": "stream.step", "run_stream": "stream.step", "StreamSession": "stream.session",
    "load_state": "io.state", "save_state": "io.state",
    "StreamVGGT": "nn.model", "init_params": "nn.model", "param_shapes": "nn.model",
    "load_params": "weights.params", "save_params": "weights.params", "load_config": "weights.params", "ParamsError": "weights.params",
    "params_from_checkpoint": "weights.cached",
    "read_state_dict": "weights.torch_reader", "CheckpointError": "weights.torch_reader",
    "convert_state_dict": "weights.convert", "ConversionError": "weights.convert",
    "load_dataset": "data", "DATASETS": "data", "make_demo_scene": "data.procedural", "evaluate": "eval.runner", "write_report": "eval.report",
}
# public submodules (the README imports them by name): pruning policies, pools of streams, meshes,
# shipped weights
_SUBMODULES = {"prune": "cache.prune", "batch": "stream.pool", "parallel": "stream.mesh", "pretrained": "pretrained"}

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
