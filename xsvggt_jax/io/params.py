"""Save and load converted Flax parameters: an orbax checkpoint plus the model configuration.

Layout of a params directory::

    DIR/config.json   ModelConfig.to_spec() + "dtype", "precision" and a "format" marker
    DIR/params/       orbax StandardCheckpointer checkpoint of the `params` tree

Writes are atomic: everything is built in a hidden temporary sibling of DIR and renamed into place
at the end, so a failure never leaves a half-written DIR (`staged_dir` does the same for any output
directory, e.g. the CLI's reconstruction results).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..config import ModelConfig

__all__ = ["ParamsError", "save_params", "load_params", "load_config", "staged_dir"]

log = logging.getLogger(__name__)

FORMAT = "xsvggt-params/1"
CONFIG_FILE = "config.json"
PARAMS_SUBDIR = "params"


class ParamsError(ValueError):
    """A directory is not a params directory written by `save_params` (or cannot be written)."""


# ------------------------------------------------------------------------------ atomic directories
def _check_target(final: Path, overwrite: bool) -> None:
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise ParamsError(f"{final} exists and is not a directory")
        if not overwrite and any(final.iterdir()):
            raise ParamsError(f"{final} already exists and is not empty (use --overwrite / overwrite=True to replace it)")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `final`; on normal exit rename it to `final`.

    An existing non-empty `final` is refused unless `overwrite` (checked before and after the body);
    with `overwrite` it is replaced only once the new content is complete. On any exception the
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


# ------------------------------------------------------------------------------------ save / load
def save_params(params: dict, directory: str | os.PathLike, cfg: ModelConfig, overwrite: bool = False) -> Path:
    """Write `params` (the Flax `params` collection of `cfg`) and `cfg` to `directory`, atomically.

    Refuses an existing non-empty `directory` unless `overwrite=True`. Returns the directory path.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    spec = dict(cfg.to_spec(), dtype=cfg.dtype, precision=cfg.precision, format=FORMAT)
    with staged_dir(directory, overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_SUBDIR, params)
            ckptr.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    log.info("saved params to %s", directory)
    return directory


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a params directory (cheap: reads only config.json)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ParamsError(f"{directory}: params directory not found")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ParamsError(f"{directory}: not a params directory ({CONFIG_FILE} is missing)")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParamsError(f"{path}: unreadable config ({e})") from e
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ParamsError(f"{path}: not a params config (missing \"format\": \"{FORMAT}\")")
    spec = dict(spec)
    spec.pop("format")
    overrides = {k: spec.pop(k) for k in ("dtype", "precision") if k in spec}
    try:
        return ModelConfig.from_spec(spec, **overrides)
    except (ValueError, TypeError) as e:
        raise ParamsError(f"{path}: invalid configuration ({e})") from e


def load_params(directory: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """Restore `(params, cfg)` written by `save_params`, bit-identical (same tree, dtypes, values)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    cfg = load_config(directory)
    ckpt = directory / PARAMS_SUBDIR
    if not ckpt.is_dir():
        raise ParamsError(f"{directory}: not a params directory ({PARAMS_SUBDIR}/ checkpoint is missing)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(ckpt)
    except Exception as e:  # orbax raises a variety of types for a damaged checkpoint
        raise ParamsError(f"{directory}: cannot restore {PARAMS_SUBDIR}/ ({type(e).__name__}: {e})") from e
    log.info("loaded params from %s", directory)
    return params, cfg
