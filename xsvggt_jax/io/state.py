"""Stream checkpoints: the cache pytree (KV caches, counters, tracker state, RNG) saved with orbax.

A state directory belongs to xsvggt once it carries `STATE_MARKER`; it holds

    STATE_MARKER       ownership record (see `fsutil.write_owner`) + whether xsvggt created the directory
    checkpoint/        meta.json (frames done, configurations, fingerprints) + cache/ (orbax)
    outputs/           the per-frame prediction memory maps (see `pipeline.PredictionStore`)

`checkpoint/` is replaced atomically on every save, so an interruption at any moment leaves the
previous complete checkpoint. `claim_state_dir` accepts only a new, empty or already-marked directory;
`release_state_dir` removes only the entries above, never anything else the directory holds.

Fingerprints (`params_digest`, `FrameDigest`) let `--resume` refuse a different input or weights.
"""

from __future__ import annotations

import hashlib
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

from xsvggt_jax.io.fsutil import atomic_write_json, owner_record, owner_status
from xsvggt_jax.errors import InputError

log = logging.getLogger(__name__)
META = "meta.json"
STATE_MARKER = ".xsvggt-state.json"
CHECKPOINT, OUTPUTS = "checkpoint", "outputs"


class StateError(InputError):
    """A state directory that is missing, damaged, foreign or from another configuration."""


# ---------------------------------------------------------------------------------- ownership
def _marker(directory: Path) -> dict | None:
    try:
        record = json.loads((directory / STATE_MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_state_dir(directory: str | os.PathLike, resume: bool) -> dict | None:
    """Raise StateError unless `directory` may be used (see `claim_state_dir`); writes nothing.
    Returns its marker record (None for a new or empty directory)."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise StateError(f"state directory {directory} exists and is not a directory")
    record = _marker(directory) if directory.is_dir() else None
    if resume and record is None:
        raise StateError(f"{directory} is not an xsvggt state directory (no {STATE_MARKER}); nothing to resume")
    if record is None and directory.is_dir() and any(directory.iterdir()):
        raise StateError(f"state directory {directory} is not empty and was not made by xsvggt: "
                         "give a new or empty directory")
    status = "dead" if record is None or record.get("pid") == os.getpid() else owner_status(record)
    if status == "alive":
        raise StateError(f"state directory {directory} is in use by another xsvggt run (pid {record.get('pid')})")
    if status == "unknown":
        log.warning("state directory %s was last used on host %s; make sure that run has stopped",
                    directory, record.get("host"))
    return record


def claim_state_dir(directory: str | os.PathLike, resume: bool) -> Path:
    """Make `directory` ours for this run: for saving it must be new, empty or marked by xsvggt; for
    resuming it must be marked. A directory in use by a live run on this host is refused."""
    directory = Path(directory).absolute()
    record = check_state_dir(directory, resume)
    created = record["created_dir"] if record is not None and "created_dir" in record else not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / STATE_MARKER, {**owner_record("state"), "created_dir": bool(created)})
    return directory


def release_state_dir(directory: str | os.PathLike) -> None:
    """Remove what xsvggt put in a state directory it owns (checkpoint, outputs, their temporaries,
    the marker) and the directory itself if xsvggt created it and nothing else is left."""
    directory = Path(directory).absolute()
    record = _marker(directory)
    if record is None:
        raise StateError(f"{directory} is not an xsvggt state directory; not removing anything")
    for entry in directory.iterdir():
        ours = entry.name in (CHECKPOINT, OUTPUTS) or (entry.name.startswith(f".{CHECKPOINT}.")
                                                        and entry.name.endswith((".tmp", ".old")))
        if ours and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
    (directory / STATE_MARKER).unlink()
    if record.get("created_dir") and not any(directory.iterdir()):
        directory.rmdir()


# ------------------------------------------------------------------------------- fingerprints
def params_digest(params) -> str:
    """Content hash of a params tree (key paths, dtypes, shapes and bytes of every leaf)."""
    h = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


class FrameDigest:
    """Running content hash of the frames fed to a stream: `.update(frame)` per frame, `.hexdigest()`
    for the frames so far (a resumed run re-hashes the frames it skips and compares)."""

    def __init__(self):
        self._h = hashlib.blake2b(digest_size=16)

    def update(self, frame: np.ndarray) -> None:
        arr = np.ascontiguousarray(frame, np.float32)
        self._h.update(f"{arr.shape}|".encode())
        self._h.update(memoryview(arr).cast("B"))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


# ------------------------------------------------------------------------------- save / load
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
        with ocp.StandardCheckpointer() as ckpt:  # closed: no background thread outlives the save
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


REQUIRED_META = ("frames_done", "latency_s", "cache_bytes")


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The meta.json of a checkpoint; StateError when missing, unreadable or incomplete."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StateError(f"{directory} is not a complete stream checkpoint ({META}: {e})") from e
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META):
        raise StateError(f"{directory / META} is damaged (expected an object with {', '.join(REQUIRED_META)})")
    done = meta["frames_done"]
    if not isinstance(done, int) or done < 0 or len(meta["latency_s"]) != done or len(meta["cache_bytes"]) != done:
        raise StateError(f"{directory / META} is damaged (inconsistent frame counts)")
    return meta


def load_state(directory: str | Path, like):
    """Restore a cache saved by `save_state` into the structure (and shapes) of `like`."""
    directory = Path(directory)
    meta = read_meta(directory)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    target = {jax.tree_util.keystr(p): jax.ShapeDtypeStruct(np.shape(x), x.dtype) for p, x in leaves if np.size(x)}
    if not (directory / "cache").is_dir():
        raise StateError(f"{directory} is damaged: its cache/ checkpoint is missing")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            flat = ckpt.restore(directory.absolute() / "cache", target)
    except Exception as e:  # orbax raises assorted errors for missing / truncated / mismatched trees
        raise StateError(f"cannot restore the cache from {directory} (damaged or from another version): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    restored = [flat[jax.tree_util.keystr(p)] if np.size(x) else x for p, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in restored]), meta
