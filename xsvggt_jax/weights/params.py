"""Save and load converted Flax parameters: an orbax checkpoint plus the model configuration.

Layout of a params directory::

    DIR/config.json   {"format": "xsvggt-params/2", "model": ModelConfig.to_dict()}, plus
                      "weights": WeightFormat.to_dict() when the kernels are stored as int8 / int4
                      code nodes (`weights.quant`; absent: float weights)
                      (format 1, ModelConfig.to_spec() + "dtype" and "precision", is still read)
    DIR/params/       orbax StandardCheckpointer checkpoint of the `params` tree
    DIR/checksum.json {"format": "xsvggt-checksum/1", "arrays": {name: sha256 of its bytes},
                      "model": ModelConfig.architecture()} (and "weights" as in config.json) written
                      by `save_params`; `load_params` refuses arrays whose bytes changed (a bit flip)
                      and a config.json edited to another architecture (or weight format) that keeps
                      every shape. A directory without it (older versions) loads unchecked.

Writes are atomic: everything is built in a hidden temporary sibling of DIR and renamed into place
at the end, so a failure never leaves a half-written DIR (`staged_dir` does the same for any output
directory, e.g. the CLI's reconstruction results).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional

import jax
import numpy as np

from xsvggt_jax.config import ConfigError, ModelConfig
from xsvggt_jax.errors import InputError
from xsvggt_jax.weights.quant import WeightFormat, is_quantized, stored_shapes

__all__ = ["ParamsError", "save_params", "load_params", "load_config", "load_weight_format", "staged_dir"]

log = logging.getLogger(__name__)

FORMAT = "xsvggt-params/2"
FORMAT_V1 = "xsvggt-params/1"
CONFIG_FILE = "config.json"
PARAMS_SUBDIR = "params"
CHECKSUM_FILE = "checksum.json"
CHECKSUM_FORMAT = "xsvggt-checksum/1"
WEIGHTS_KEY = "weights"


class ParamsError(InputError):
    """A directory is not a params directory written by `save_params` (or cannot be written)."""


# ------------------------------------------------------------------------------ atomic directories
def _is_params_dir(final: Path) -> bool:
    """Holds nothing but what `save_params` writes (config.json of our format and params/)."""
    try:
        names = {p.name for p in final.iterdir()}
        fmt = json.loads((final / CONFIG_FILE).read_text()).get("format")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return names - {CHECKSUM_FILE} == {CONFIG_FILE, PARAMS_SUBDIR} and fmt in (FORMAT, FORMAT_V1)


def _check_target(final: Path, overwrite: bool) -> None:
    """An existing non-empty `final` is replaced only with `overwrite` and only if it is a params
    directory that `save_params` wrote and nothing else was put in: never a user's files."""
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise ParamsError(f"{final} exists and is not a directory")
        if not any(final.iterdir()):
            return
        if not overwrite:
            raise ParamsError(f"{final} already exists and is not empty (use --overwrite / overwrite=True to replace "
                              "a params directory written by xsvggt)")
        if not _is_params_dir(final):
            raise ParamsError(f"{final} is not a params directory written by xsvggt (or holds other files): "
                              "refusing to replace it; choose another directory")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `final`; on normal exit rename it to `final`.

    An existing non-empty `final` is refused unless `overwrite` and it is a params directory written by
    `save_params` with nothing else in it (checked before and after the body); it is then replaced
    only once the new content is complete. On any exception the
    temporary directory is removed and `final` is left as it was.
    """
    final = Path(final).absolute()
    _check_target(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the result normal permissions
        yield tmp
        _check_target(final, overwrite)
        if final.exists() and any(final.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            try:
                os.replace(final, old)  # rename onto the fresh empty dir
                os.replace(tmp, final)
            except BaseException:
                if not final.exists():
                    os.replace(old, final)  # put the previous content back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------- checksum
def _array_digests(params: dict) -> dict[str, str]:
    """{"a/b/c": sha256 hex of the leaf's dtype, shape and bytes}: one pass over each array's bytes,
    the arrays hashed in parallel threads (hashlib releases the GIL on large buffers)."""
    from flax.traverse_util import flatten_dict

    flat = {"/".join(k): v for k, v in flatten_dict(params).items()}

    def digest(leaf) -> str:
        arr = np.ascontiguousarray(np.asarray(leaf))
        h = hashlib.sha256(f"{arr.dtype.str}|{arr.shape}|".encode())
        h.update(memoryview(arr.reshape(-1).view(np.uint8)))
        return h.hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(flat, pool.map(digest, flat.values())))


def _flat_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_checksum(directory: Path) -> Optional[dict]:
    """The checksum record, or None for a directory written before checksums (logged at debug)."""
    path = directory / CHECKSUM_FILE
    if not path.exists():
        log.debug("%s has no %s (written by an older xsvggt): array checksums not verified", directory, CHECKSUM_FILE)
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ParamsError(f"{path}: unreadable checksum record ({e})") from e
    if (not isinstance(record, dict) or record.get("format") != CHECKSUM_FORMAT
            or not isinstance(record.get("arrays"), dict) or not isinstance(record.get("model"), dict)):
        raise ParamsError(f"{path}: not a checksum record (expected \"format\": \"{CHECKSUM_FORMAT}\", "
                          "\"arrays\" and \"model\")")
    return record


def _weights_record(fmt: WeightFormat) -> Optional[dict]:
    return fmt.to_dict() if fmt.quantized else None


def _check_config_checksum(record: dict, cfg: ModelConfig, fmt: WeightFormat, directory: Path) -> None:
    """config.json describes the architecture and weight format the arrays were saved with (cheap:
    before any array is read)."""
    if record.get(WEIGHTS_KEY) != _weights_record(fmt):
        raise ParamsError(f"{directory}: {CONFIG_FILE} describes other weights ({fmt.to_dict()}) than the arrays were "
                          f"saved as ({record.get(WEIGHTS_KEY) or 'float'}, recorded in {CHECKSUM_FILE}; edited after "
                          "saving?)")
    saved, now = _flat_dict(record["model"]), _flat_dict(cfg.architecture())
    diff = [f"{k} {saved.get(k, '(absent)')!r} (saved) vs {now.get(k, '(absent)')!r} ({CONFIG_FILE})"
            for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]
    if diff:
        raise ParamsError(f"{directory}: {CONFIG_FILE} differs from the configuration the arrays were saved with "
                          f"(recorded in {CHECKSUM_FILE}; edited after saving?): " + "; ".join(diff))


def _check_array_checksums(record: dict, params: dict, directory: Path) -> None:
    """Every array's bytes are those `save_params` hashed (a flipped bit names its array)."""
    leaves = jax.tree.leaves(params)
    if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
        log.debug("%s: arrays span other processes; checksums not verified here", directory)
        return
    have, want = _array_digests(params), record["arrays"]
    for name in sorted(want.keys() | have.keys()):
        if want.get(name) != have.get(name):
            problem = ("is not in the record" if name not in want else "is missing" if name not in have
                       else "has other bytes than when it was saved (corrupted or modified)")
            raise ParamsError(f"{directory}: {PARAMS_SUBDIR}/ does not match {CHECKSUM_FILE}: array {name} {problem}")


# ------------------------------------------------------------------------------------ save / load
def save_params(params: dict, directory: str | os.PathLike, cfg: ModelConfig, overwrite: bool = False,
                weights: Optional[WeightFormat] = None) -> Path:
    """Write `params` (the Flax `params` collection of `cfg`; numpy or jax arrays) and `cfg` to
    `directory`, atomically. Refuses an existing non-empty `directory` unless `overwrite=True`.
    weights: the format of quantized `params` (`weights.quant.quantize_params(params, weights)`),
    recorded in config.json; None (or float) for float parameters."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    fmt = weights or WeightFormat()
    if is_quantized(params) != fmt.quantized:
        raise ParamsError(f"save_params: weights={fmt.to_text()!r} but the parameters are "
                          f"{'quantized' if is_quantized(params) else 'float'}")
    config = {"format": FORMAT, "model": cfg.to_dict()}
    if fmt.quantized:
        config[WEIGHTS_KEY] = fmt.to_dict()
    with staged_dir(directory, overwrite) as tmp:
        # the context closes the checkpointer (joins its background commit threads): an unclosed one
        # finishes after interpreter shutdown has begun and prints "Event loop is closed" tracebacks
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_SUBDIR, params)
            ckptr.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        checksum = {"format": CHECKSUM_FORMAT, "algorithm": "sha256", "model": cfg.architecture(),
                    "arrays": _array_digests(params)}
        if fmt.quantized:
            checksum[WEIGHTS_KEY] = fmt.to_dict()
        (tmp / CHECKSUM_FILE).write_text(json.dumps(checksum, indent=1) + "\n")
    log.info("saved params to %s", directory)
    return directory


def _config_from_json(data: Any, path: Path) -> ModelConfig:
    if not isinstance(data, dict) or data.get("format") not in (FORMAT, FORMAT_V1):
        raise ParamsError(f"{path}: not a params config (missing \"format\": \"{FORMAT}\")")
    if data["format"] == FORMAT:
        unknown = sorted(set(data) - {"format", "model", WEIGHTS_KEY})
        if unknown:
            raise ParamsError(f"{path}: unknown key(s) {unknown}")
        return ModelConfig.from_dict(data.get("model"))
    # format 1 stored upstream's spec plus dtype and precision, so it lacks rope_freq, qk_norm,
    # dino.layer_norm_eps, camera.mlp_ratio and camera.iterations: they take the defaults. That is exact
    # for everything `xsvggt convert` wrote (a spec or the published model); of a config saved from
    # code with other values, load_params' array check still catches those that change shapes.
    spec = {k: v for k, v in data.items() if k not in ("format", "dtype", "precision")}
    overrides = {k: data[k] for k in ("dtype", "precision") if k in data}
    log.info("%s: reading a format-1 params config", path)
    return ModelConfig.from_spec(spec, **overrides)


def _read_config(directory: Path) -> tuple[dict, Path]:
    """config.json of a params directory, parsed (ParamsError when missing or unreadable)."""
    if not directory.is_dir():
        raise ParamsError(f"{directory}: params directory not found")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ParamsError(f"{directory}: not a params directory ({CONFIG_FILE} is missing)")
    try:
        return json.loads(path.read_text()), path
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParamsError(f"{path}: unreadable config ({e})") from e


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a params directory (cheap: reads only config.json)."""
    return load_stored(directory)[0]


def load_weight_format(directory: str | os.PathLike) -> WeightFormat:
    """How a params directory stores its kernels (float unless config.json says int8 / int4; cheap)."""
    return load_stored(directory)[1]


def load_stored(directory: str | os.PathLike) -> tuple[ModelConfig, WeightFormat]:
    """(ModelConfig, WeightFormat) of a params directory, from one read of its config.json."""
    data, path = _read_config(Path(directory))
    try:
        cfg = _config_from_json(data, path)
    except ConfigError as e:
        raise ParamsError(f"{path}: invalid configuration ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or WEIGHTS_KEY not in data:
        return cfg, WeightFormat()
    try:
        return cfg, WeightFormat.from_dict(data[WEIGHTS_KEY])
    except ConfigError as e:
        raise ParamsError(f"{path}: invalid weight format ({e})") from e


@functools.lru_cache(maxsize=8)  # tracing the model's parameter shapes takes seconds
def _expected_shapes(cfg: ModelConfig, fmt: WeightFormat) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from flax.traverse_util import flatten_dict

    from xsvggt_jax.nn.model import param_shapes

    return tuple(("/".join(k), tuple(v.shape)) for k, v in flatten_dict(stored_shapes(param_shapes(cfg), fmt)).items())


def _check_arrays(stored: dict, cfg: ModelConfig, fmt: WeightFormat, directory: Path) -> None:
    """Compare the checkpoint's array metadata with the parameter tree `cfg` needs (abstractly), its
    kernels stored as `fmt` says."""
    from flax.traverse_util import flatten_dict

    want = dict(_expected_shapes(cfg, fmt))
    have = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(stored).items()}
    for name in sorted(want.keys() | have.keys()):
        if name not in have:
            problem = f"it lacks array {name} {want[name]}"
        elif name not in want:
            problem = f"it has an extra array {name} {have[name]}"
        elif have[name] != want[name]:
            problem = f"array {name} has shape {have[name]} where the configuration needs {want[name]}"
        else:
            continue
        raise ParamsError(f"{directory}: {PARAMS_SUBDIR}/ does not match {CONFIG_FILE}: {problem}")


def load_params(directory: str | os.PathLike, *,
                sharding: Optional[jax.sharding.Sharding] = None) -> tuple[dict, ModelConfig]:
    """Restore `(params, cfg)` written by `save_params`, bit-identical (same tree, dtypes, values).

    The leaves are device arrays (`jax.Array`) placed with `sharding` (default: the first local device),
    so a jitted function may close over them or take them as arguments without a copy per call.
    Raises ParamsError if the directory is not a params directory or if its arrays do not match its
    configuration (checked from the metadata, before any array is read), and, when the directory has
    a `CHECKSUM_FILE`, if config.json's architecture differs from the one saved (before any array is
    read) or an array's bytes differ from those saved (hashed once after reading).
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    cfg, fmt = load_stored(directory)
    ckpt = directory / PARAMS_SUBDIR
    if not ckpt.is_dir():
        raise ParamsError(f"{directory}: not a params directory ({PARAMS_SUBDIR}/ checkpoint is missing)")
    record = _read_checksum(directory)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # every process of a multi-process run reads the params on its own (no cross-process sync)
    local = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=local) as ckptr:
            stored = ckptr.metadata(ckpt).item_metadata.tree
            _check_arrays(stored, cfg, fmt, directory)
            if record is not None:
                _check_config_checksum(record, cfg, fmt, directory)
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), stored)
            params = ckptr.restore(ckpt, target)
    except ParamsError:
        raise
    except Exception as e:  # orbax raises a variety of types for a damaged checkpoint
        raise ParamsError(f"{directory}: cannot restore {PARAMS_SUBDIR}/ ({type(e).__name__}: {e})") from e
    if record is not None:
        _check_array_checksums(record, params, directory)
    log.info("loaded params from %s", directory)
    return params, cfg
