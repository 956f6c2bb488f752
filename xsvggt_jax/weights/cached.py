"""Where the parameters come from: an orbax params directory, or an upstream checkpoint converted on
the fly (and cached as orbax, keyed by the file's content hash and the configuration)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import jax

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.weights.params import ParamsError, load_params, save_params

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/xsvggt-jax (or ~/.cache/xsvggt-jax): converted checkpoints live here."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xsvggt-jax"


def _digest(path: Path, cfg: ModelConfig) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    h.update(json.dumps(cfg.architecture(), sort_keys=True).encode())  # every field but dtype/precision
    return h.hexdigest()[:24]


def params_from_checkpoint(checkpoint: str | Path, cfg: ModelConfig, cache_dir: Optional[Path] = None):
    """(params, cfg) for an upstream `.pth` / `.safetensors`, converted once and then read from the
    orbax cache (keyed by the file's content and `cfg.architecture()`, so the runtime fields dtype and
    precision share one conversion; the returned `cfg` is the one asked for). Params are jax.Arrays.
    Errors from reading or converting propagate (CheckpointError / ConversionError)."""
    from xsvggt_jax.weights.convert import convert_state_dict
    from xsvggt_jax.weights.torch_reader import read_state_dict

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ParamsError(f"{checkpoint}: checkpoint file not found")
    target = (cache_dir or default_cache_dir()) / _digest(checkpoint, cfg)
    if target.exists():
        try:
            log.info("using converted parameters cached in %s", target)
            params, cached = load_params(target)
            if cached.architecture() != cfg.architecture():
                raise ParamsError(f"{target}: holds another configuration")
            return params, cfg
        except ParamsError as e:
            log.warning("ignoring a broken conversion cache (%s); converting again", e)
    params = convert_state_dict(read_state_dict(checkpoint), cfg, source=str(checkpoint))
    try:
        save_params(params, target, cfg, overwrite=True)
    except OSError as e:  # a read-only cache is not fatal
        log.warning("could not cache the converted parameters in %s: %s", target, e)
    return jax.device_put(params), cfg
