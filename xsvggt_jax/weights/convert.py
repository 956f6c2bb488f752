"""Strict conversion of an upstream state_dict into the Flax parameter tree of a ModelConfig."""

from __future__ import annotations

import functools
import logging
from typing import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.model import param_shapes

from xsvggt_jax.weights.keymap import map_key, transformed_shape
from xsvggt_jax.errors import InputError

log = logging.getLogger(__name__)


class ConversionError(InputError):
    """The checkpoint does not match the configuration; the message names the problems (the first
    few of each kind, with counts)."""


@functools.lru_cache(maxsize=4)  # tracing the published model's shapes takes seconds
def _target(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {".".join(k): tuple(v.shape) for k, v in flatten_dict(param_shapes(cfg)).items()}


_LISTED = 10  # problems named per kind; the rest are counted


def _listing(items: list[str]) -> str:
    more = f", ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def _report(unused, missing, mismatched, cfg: ModelConfig, expected: int, source: str) -> None:
    """Raise ConversionError describing the problems, if any.

    A checkpoint converted with the published configuration (no spec given) whose tensors mostly
    do not fit is a smaller or larger model: say so in one line instead of listing every name.
    """
    mismatch_text = [f"{k} (source {s} -> {t}, expected {e})" for k, s, t, e in sorted(mismatched)]
    bad = len(missing) + len(mismatched)
    if bad * 2 > expected and cfg.architecture() == ModelConfig.published().architecture():
        examples = ([f"{k} is {t}, expected {e}" for k, _, t, e in sorted(mismatched)]
                    + [f"{k} is missing" for k in sorted(missing)])[:3]
        raise ConversionError(f"{source} looks like a non-published configuration ({bad} of {expected} expected "
                              f"tensors missing/mismatched, e.g. {'; '.join(examples)}): pass --spec")
    problems = []
    if unused:
        problems.append(f"{len(unused)} unused source key(s): " + _listing(sorted(unused)))
    if missing:
        problems.append(f"{len(missing)} parameter(s) not filled: " + _listing(sorted(missing)))
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + _listing(mismatch_text))
    if problems:
        raise ConversionError(f"{source} is not a {cfg.model_info.title} state_dict for this configuration:\n  "
                              + "\n  ".join(problems))


def check_coverage(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig, source: str = "checkpoint") -> None:
    """Validate a key -> shape listing against `cfg` without any tensor data."""
    target = _target(cfg)
    filled, unused, mismatched = set(), [], []
    for key, shape in shapes.items():
        path, fn = map_key(key, len(shape))
        if path not in target:
            unused.append(key)
            continue
        got = transformed_shape(tuple(shape), fn)
        if got != target[path]:
            mismatched.append((key, tuple(shape), got, target[path]))
        filled.add(path)
    _report(unused, set(target) - filled, mismatched, cfg, len(target), source)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "checkpoint",
                       dtype=np.float32) -> dict:
    """Map every tensor of an upstream state_dict onto the Flax params of `cfg` (strict)."""
    check_coverage({k: v.shape for k, v in state_dict.items()}, cfg, source)
    flat = {}
    for key, value in state_dict.items():
        path, fn = map_key(key, value.ndim)
        flat[tuple(path.split("."))] = np.ascontiguousarray(fn(np.asarray(value))).astype(dtype, copy=False)
    log.info("converted %d tensors from %s", len(flat), source)
    return unflatten_dict(flat)
