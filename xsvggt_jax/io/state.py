"""Stream checkpoints: the cache pytree (KV caches, counters, tracker state, RNG) saved with orbax.

A state directory holds `meta.json` (frames done, configurations, input) and `cache/` (an orbax
checkpoint of the flattened cache). It is replaced atomically on every save, so an interruption at
any moment leaves the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
META = "meta.json"


class StateError(ValueError):
    """A state directory that is missing, incomplete or from another configuration."""


def _flat(cache) -> dict[str, np.ndarray]:
    """Leaves by key path; empty arrays (e.g. no track queries) are left out: orbax refuses them and
    their shape is all there is to restore."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(cache)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves if np.size(leaf)}


def save_state(directory: str | Path, cache, meta: dict[str, Any]) -> None:
    """Write `cache` and `meta` to `directory`, replacing a previous checkpoint atomically."""
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp / "cache", _flat(cache))
        ckpt.wait_until_finished()
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved stream state (%s frames) to %s", meta.get("frames_done"), directory)


def read_meta(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    try:
        return json.loads((directory / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StateError(f"{directory} is not a stream state directory ({META}: {e})") from e


def load_state(directory: str | Path, like):
    """Restore a cache saved by `save_state` into the structure (and shapes) of `like`."""
    directory = Path(directory)
    meta = read_meta(directory)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    target = {jax.tree_util.keystr(p): jax.ShapeDtypeStruct(np.shape(x), x.dtype) for p, x in leaves if np.size(x)}
    try:
        flat = ocp.StandardCheckpointer().restore(directory.absolute() / "cache", target)
    except Exception as e:  # orbax raises assorted errors for missing / mismatched trees
        raise StateError(f"cannot restore the cache from {directory}: {e}") from e
    restored = [flat[jax.tree_util.keystr(p)] if np.size(x) else x for p, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in restored]), meta
