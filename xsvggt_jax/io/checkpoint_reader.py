"""Read PyTorch checkpoints into ``dict[str, numpy.ndarray]`` without torch.

Supported inputs:

* ``.safetensors`` files (via ``safetensors.numpy``);
* zip-format ``torch.save`` files (``.pth``/``.pt``/``.bin``, torch >= 1.6).

Pickled torch checkpoints are read with a restricted unpickler that resolves
only the handful of globals needed to rebuild tensors, so no code embedded in
the pickle is ever executed. Anything else raises :class:`CheckpointError`.
"""

from __future__ import annotations

import collections
import logging
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

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


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsupported or unsafe."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.<X>Storage`` class referenced by the pickle."""

    name: str
    dtype: np.dtype


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``data.pkl`` that only knows how to rebuild tensors."""

    def __init__(self, file: IO[bytes], zf: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(file)
        self._zf = zf
        self._prefix = prefix
        self._path = path
        self._storages: dict[str, np.ndarray] = {}

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

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise CheckpointError(f"{self._path}: malformed storage reference {pid!r}")
        key = str(key)
        if key not in self._storages:
            record = f"{self._prefix}/data/{key}"
            try:
                raw = self._zf.read(record)
            except KeyError:
                raise CheckpointError(f"{self._path}: missing data record '{record}'") from None
            need = numel * storage_type.dtype.itemsize
            if len(raw) < need:
                raise CheckpointError(
                    f"{self._path}: data record '{record}' has {len(raw)} bytes, "
                    f"expected {need} ({numel} x {storage_type.name})"
                )
            self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype, count=numel)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise CheckpointError(f"{self._path}: storage '{key}' used with two dtypes")
        return storage

    def _rebuild_tensor_v2(
        self,
        storage: np.ndarray,
        storage_offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
        requires_grad: bool = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> np.ndarray:
        """Build a contiguous array viewing ``storage`` like ``torch.as_strided``."""
        if not isinstance(storage, np.ndarray):
            raise CheckpointError(f"{self._path}: tensor rebuilt from a non-storage object")
        size, stride = tuple(size), tuple(stride)
        if len(size) != len(stride) or min((*size, *stride, storage_offset), default=0) < 0:
            raise CheckpointError(f"{self._path}: invalid tensor geometry size={size} stride={stride}")
        if 0 in size:
            return np.zeros(size, dtype=storage.dtype)
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise CheckpointError(
                f"{self._path}: storage of {storage.size} elements is too short for tensor "
                f"size={size} stride={stride} offset={storage_offset}"
            )
        item = storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[storage_offset:], shape=size, strides=[s * item for s in stride], writeable=False
        )
        return np.array(view, copy=True, order="C")


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any, state: Any = None) -> Any:
    """``torch.nn.Parameter`` is just its data for our purposes."""
    return data


def _find_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    """Return the archive's top folder holding ``data.pkl``."""
    prefixes = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(prefixes) != 1:
        raise CheckpointError(f"{path}: zip archive is not a torch checkpoint (found {len(prefixes)} '*/data.pkl')")
    return prefixes[0]


def _load_torch_zip(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _find_prefix(zf, path)
            if f"{prefix}/byteorder" in zf.namelist():
                order = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
                if order != "little":
                    raise CheckpointError(f"{path}: byte order '{order}' not supported (little-endian only)")
            with zf.open(f"{prefix}/data.pkl") as fh:
                return _RestrictedUnpickler(fh, zf, prefix, path).load()
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


def _normalize(obj: Any, path: Path) -> dict[str, np.ndarray]:
    """Unwrap ``{'model'|'state_dict': ...}`` wrappers, validate, strip ``module.``."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: top-level object is {type(obj).__name__}, not a dict")
    for wrapper in _WRAPPER_KEYS:
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and (
            len(obj) == 1 or (inner and all(isinstance(v, np.ndarray) for v in inner.values()))
        ):
            logger.debug("%s: using state dict under key '%s'", path, wrapper)
            obj = inner
            break
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state_dict key {key!r} is not a string")
        if not isinstance(value, np.ndarray):
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
        obj: Any = _load_torch_zip(path)
    elif path.suffix == ".safetensors" or _looks_like_safetensors(head):
        obj = _load_safetensors(path)
    elif head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: legacy torch format not supported; re-save with torch>=1.6 zip format"
        )
    else:
        raise CheckpointError(f"{path}: not a recognised checkpoint (neither torch zip nor safetensors)")
    state = _normalize(obj, path)
    logger.info("loaded %d tensors from %s", len(state), path)
    return state
