"""Read PyTorch checkpoints into ``dict[str, numpy.ndarray]`` without torch.

Supported inputs:

* ``.safetensors`` files (via ``safetensors.numpy``);
* zip-format ``torch.save`` files (``.pth``/``.pt``/``.bin``, torch >= 1.6).

Pickled torch checkpoints are read with a restricted unpickler that resolves
only the handful of globals needed to describe tensors, so no code embedded in
the pickle is ever executed. Every tensor's declared geometry is checked
against its storage (and the total against the machine's memory) before any
data is read or allocated. Anything else raises :class:`CheckpointError`.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pickle
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

from xsvggt_jax.errors import InputError

__all__ = ["CheckpointError", "read_state_dict"]

logger = logging.getLogger(__name__)

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_WRAPPER_KEYS = ("model", "state_dict")
_PREFIX = "module."


class CheckpointError(InputError):
    """A checkpoint file is missing, corrupt, unsupported or unsafe."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.<X>Storage`` class referenced by the pickle."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage record of the archive, not read yet: ``numel`` elements of ``dtype``."""

    record: str
    dtype: np.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as the pickle declares it (``torch.as_strided`` geometry over a storage), not built yet."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    @property
    def nbytes(self) -> int:
        return self.numel * self.storage.dtype.itemsize


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``data.pkl`` that only knows how to describe tensors (it reads no tensor data)."""

    def __init__(self, file: IO[bytes], zf: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(file)
        self._zf = zf
        self._prefix = prefix
        self._path = path
        self._storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils":
            if name == "_rebuild_tensor_v2":
                return self._rebuild_tensor_v2
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
        elif module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        elif module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise CheckpointError(
            f"{self._path}: checkpoint references forbidden global '{module}.{name}' "
            "(only torch tensor-rebuilding globals are allowed)"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not _is_int(numel) or numel < 0:
            raise CheckpointError(f"{self._path}: malformed storage reference {pid!r}")
        key = str(key)
        if key not in self._storages:
            record = f"{self._prefix}/data/{key}"
            try:
                stored = self._zf.getinfo(record).file_size
            except KeyError:
                raise CheckpointError(f"{self._path}: missing data record '{record}'") from None
            ref = _StorageRef(record, storage_type.dtype, numel)
            if stored < ref.nbytes:
                raise CheckpointError(
                    f"{self._path}: data record '{record}' has {stored} bytes, "
                    f"expected {ref.nbytes} ({numel} x {storage_type.name})"
                )
            self._storages[key] = ref
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise CheckpointError(f"{self._path}: storage '{key}' used with two dtypes")
        return storage

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: bool = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> _TensorRef:
        if not isinstance(storage, _StorageRef):
            raise CheckpointError(f"{self._path}: tensor rebuilt from a non-storage object")
        if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
                and all(map(_is_int, (*size, *stride, storage_offset)))):
            raise CheckpointError(f"{self._path}: invalid tensor geometry size={size!r} stride={stride!r}")
        return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any, state: Any = None) -> Any:
    """``torch.nn.Parameter`` is just its data for our purposes."""
    return data


def _check_tensor(name: str, t: _TensorRef, path: Path) -> None:
    """Reject geometry that reads outside its storage or claims more elements than the storage holds.

    A tensor never needs more elements than its storage (a stride-0 "expanded" tensor is how a tiny
    file claims terabytes), so such a tensor is refused before anything is allocated.
    """
    size, stride, offset = t.size, t.stride, t.offset
    if len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
        raise CheckpointError(f"{path}: tensor '{name}' has invalid geometry size={size} stride={stride}")
    if t.numel == 0:
        return
    if t.numel > t.storage.numel:
        raise CheckpointError(
            f"{path}: tensor '{name}' claims {t.numel} elements ({_human(t.nbytes)}) of a storage holding "
            f"{t.storage.numel}: size={size} stride={stride} overlaps itself, refusing to expand it"
        )
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= t.storage.numel:
        raise CheckpointError(
            f"{path}: tensor '{name}': storage of {t.storage.numel} elements is too short for "
            f"size={size} stride={stride} offset={offset}"
        )


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} TiB"


def _memory_bytes() -> int:
    """Physical memory of this machine (the bound on what a checkpoint may make us allocate)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound
        return sys.maxsize


def _materialise(refs: dict[str, _TensorRef], zf: zipfile.ZipFile, path: Path) -> dict[str, np.ndarray]:
    """Check every tensor and the total, then read the storages and build contiguous arrays."""
    for name, t in refs.items():
        _check_tensor(name, t, path)
    storages = {t.storage.record: t.storage for t in refs.values()}
    total = sum(s.nbytes for s in storages.values()) + sum(t.nbytes for t in refs.values())
    if total > _memory_bytes():
        raise CheckpointError(f"{path}: loading needs {_human(total)}, more than this machine's "
                              f"{_human(_memory_bytes())} of memory")
    data = {record: np.frombuffer(zf.read(record), dtype=s.dtype, count=s.numel) for record, s in storages.items()}
    out = {}
    for name, t in refs.items():
        if t.numel == 0:
            out[name] = np.zeros(t.size, dtype=t.storage.dtype)
            continue
        item = t.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(data[t.storage.record][t.offset:], shape=t.size,
                                               strides=[s * item for s in t.stride], writeable=False)
        out[name] = np.array(view, copy=True, order="C")
    return out


def _find_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    """Return the archive's top folder holding ``data.pkl``."""
    prefixes = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(prefixes) != 1:
        raise CheckpointError(f"{path}: zip archive is not a torch checkpoint (found {len(prefixes)} '*/data.pkl')")
    return prefixes[0]


def _load_torch_zip(path: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _find_prefix(zf, path)
            if f"{prefix}/byteorder" in zf.namelist():
                order = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
                if order != "little":
                    raise CheckpointError(f"{path}: byte order '{order}' not supported (little-endian only)")
            with zf.open(f"{prefix}/data.pkl") as fh:
                obj = _RestrictedUnpickler(fh, zf, prefix, path).load()
            return _materialise(_normalize(obj, path, _TensorRef), zf, path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt zip archive ({exc})") from exc
    except (pickle.UnpicklingError, TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint pickle ({type(exc).__name__}: {exc})") from exc


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    import safetensors
    import safetensors.numpy

    try:
        return dict(safetensors.numpy.load_file(str(path)))
    except (safetensors.SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(exc).__name__}: {exc})") from exc


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def _normalize(obj: Any, path: Path, tensor_type: type) -> dict[str, Any]:
    """Unwrap ``{'model'|'state_dict': ...}`` wrappers, check every entry is a `tensor_type`, strip
    ``module.``."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: top-level object is {type(obj).__name__}, not a dict")
    for wrapper in _WRAPPER_KEYS:
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and (
            len(obj) == 1 or (inner and all(isinstance(v, tensor_type) for v in inner.values()))
        ):
            logger.debug("%s: using state dict under key '%s'", path, wrapper)
            obj = inner
            break
    state: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state_dict key {key!r} is not a string")
        if not isinstance(value, tensor_type):
            raise CheckpointError(f"{path}: state_dict entry '{key}' is {type(value).__name__}, not a tensor")
        state[key] = value
    if state and all(k.startswith(_PREFIX) for k in state):
        state = {k[len(_PREFIX):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a checkpoint as a flat ``{name: numpy array}`` mapping.

    Args:
        path: a ``.safetensors`` file or a zip-format ``torch.save`` file.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, in an
            unsupported format, or references a forbidden pickle global.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with path.open("rb") as fh:
        head = fh.read(16)
    if not head:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    if head.startswith(b"PK"):
        state = _load_torch_zip(path)
    elif path.suffix == ".safetensors" or _looks_like_safetensors(head):
        state = _normalize(_load_safetensors(path), path, np.ndarray)
    elif head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: legacy torch format not supported; re-save with torch>=1.6 zip format"
        )
    else:
        raise CheckpointError(f"{path}: not a recognised checkpoint (neither torch zip nor safetensors)")
    logger.info("loaded %d tensors from %s", len(state), path)
    return state
