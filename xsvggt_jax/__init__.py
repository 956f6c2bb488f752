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
    "CacheConfig": "cache", "init_cache": "cache",
    "make_step": "step", "run_stream": "step",
    "StreamVGGT": "model", "init_params": "model", "param_shapes": "model",
    "load_params": "io.params", "save_params": "io.params", "load_config": "io.params", "ParamsError": "io.params",
    "params_from_checkpoint": "weights",
    "read_state_dict": "io.checkpoint_reader", "CheckpointError": "io.checkpoint_reader",
    "convert_state_dict": "convert", "ConversionError": "convert",
    "load_dataset": "data", "DATASETS": "data", "evaluate": "eval.runner", "write_report": "eval.report",
}
# public submodules (the README imports them by name): pruning policies, pools of streams, meshes,
# shipped weights
_SUBMODULES = ("prune", "batch", "parallel", "pretrained")

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
