"""Optimizer, train state and its Orbax checkpoints.

Optimizer (upstream StreamVGGT / VGGT recipe): global-norm gradient clipping, then AdamW
(betas 0.9 / 0.95, weight decay 0.05 on every trainable parameter, as torch's AdamW over one
parameter group) with a linear warmup to `lr` and a cosine decay to `lr * final_lr_ratio` at
`steps`. Frozen parameters (path prefixes, default upstream's: the DINO patch embedding and the
camera / register tokens) get zero updates through `optax.multi_transform`, so they stay bit-exact.

The numeric settings (lr, warmup, steps, final_lr_ratio, b1, b2, weight_decay, clip_norm) are arrays in
the optimizer state (`optax.inject_hyperparams`), not constants of the compiled program: one compiled
train step serves every learning rate and schedule length (a sweep compiles once), and a state can be
given new values with `set_hyperparams`. Only `freeze` (the parameter partition) is structural.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from xsvggt_jax.errors import ConfigError, InputError
from xsvggt_jax.io.fsutil import DISK_ERRNOS
from xsvggt_jax.train.rundir import os_error_in

Array = jax.Array
INT32_MAX = 2**31 - 1   # steps and warmup are int32 arrays in the state, as are its step counters

UPSTREAM_FROZEN = ("aggregator/patch_embed", "aggregator/camera_token", "aggregator/register_token")


class TrainConfigError(ConfigError):
    """An optimizer / schedule setting is out of range."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """lr: peak learning rate; warmup: linear warmup steps from 0; steps: schedule length (cosine end);
    b1, b2, weight_decay: AdamW; clip_norm: global gradient-norm clip; final_lr_ratio: cosine end
    value as a fraction of lr; freeze: '/'-joined parameter path prefixes that are not trained."""

    lr: float = 1e-4
    warmup: int = 10
    steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.05
    clip_norm: float = 1.0
    final_lr_ratio: float = 0.01
    freeze: tuple[str, ...] = UPSTREAM_FROZEN

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr > 0 and 1 <= self.steps <= INT32_MAX
                and 0 <= self.warmup <= INT32_MAX and math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise TrainConfigError(f"need a finite lr > 0, 1 <= steps <= {INT32_MAX}, 0 <= warmup <= {INT32_MAX}, "
                                   f"a finite clip_norm > 0; got lr={self.lr}, steps={self.steps}, "
                                   f"warmup={self.warmup}, clip_norm={self.clip_norm}")


#: OptimConfig fields held as arrays in the optimizer state (everything but `freeze`)
HYPERPARAMS = ("lr", "warmup", "steps", "final_lr_ratio", "b1", "b2", "weight_decay", "clip_norm")


def learning_rate_at(count, lr, warmup, steps, final_lr_ratio) -> Array:
    """The rate at step `count` (0-based) from scalars or arrays: linear warmup 0 -> lr over `warmup`
    steps, then cosine to lr * final_lr_ratio at max(steps, warmup + 1) (optax's
    `warmup_cosine_decay_schedule`, written with jnp so that its settings may be traced values)."""
    count = jnp.asarray(count, jnp.float32)
    lr, warmup = jnp.asarray(lr, jnp.float32), jnp.asarray(warmup, jnp.float32)
    decay = jnp.maximum(jnp.asarray(steps, jnp.float32), warmup + 1) - warmup
    alpha = jnp.asarray(final_lr_ratio, jnp.float32)
    t = jnp.clip(count - warmup, 0.0, decay) / decay
    cosine = lr * ((1 - alpha) * 0.5 * (1 + jnp.cos(jnp.pi * t)) + alpha)
    return jnp.where(count < warmup, lr * count / jnp.maximum(warmup, 1.0), cosine)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_labels(params: Any, freeze: tuple[str, ...]) -> Any:
    """Pytree like `params` of "frozen" (path starts with a prefix of `freeze`) or "train"."""
    def label(path, _):
        name = _path_str(path)
        return "frozen" if any(name == p or name.startswith(p + "/") for p in freeze) else "train"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimConfig, params: Any) -> optax.GradientTransformation:
    """clip -> AdamW(schedule) on trainable parameters; zero updates on frozen ones. The numeric
    settings (`HYPERPARAMS`) are arrays in the state it initialises (`optax.inject_hyperparams`)."""
    labels = param_labels(params, cfg.freeze)

    def transform(lr, warmup, steps, final_lr_ratio, b1, b2, weight_decay, clip_norm):
        schedule = lambda count: learning_rate_at(count, lr, warmup, steps, final_lr_ratio)  # noqa: E731
        train = optax.chain(optax.clip_by_global_norm(clip_norm),
                            optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
        return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)

    # host (numpy) values, not device arrays: each `init` makes its own arrays (a train step donates its
    # state, and arrays held by the optimizer itself would be deleted with the first state)
    return optax.inject_hyperparams(transform, hyperparam_dtype=jnp.float32)(
        **{name: np.asarray(getattr(cfg, name), np.int32 if name in ("warmup", "steps") else np.float32)
           for name in HYPERPARAMS})


def hyperparams(opt_state: Any) -> Optional[dict]:
    """The array hyperparameters of a `make_optimizer` state (None for another optimizer's)."""
    hp = getattr(opt_state, "hyperparams", None)
    return hp if isinstance(hp, dict) and set(HYPERPARAMS) <= set(hp) else None


def set_hyperparams(state: "TrainState", cfg: OptimConfig) -> "TrainState":
    """`state` with its optimizer's numeric settings replaced by `cfg`'s (same shapes and dtypes, so the
    compiled train step is reused). `cfg.freeze` must be the one the optimizer was made with."""
    hp = hyperparams(state.opt_state)
    if hp is None:
        raise TrainConfigError("this state's optimizer was not made by make_optimizer: it has no array "
                               "hyperparameters")
    new = {**hp, **{name: jnp.asarray(getattr(cfg, name), hp[name].dtype) for name in HYPERPARAMS}}
    new = jax.device_put(new, {name: hp[name].sharding for name in new})
    return state.replace(opt_state=state.opt_state._replace(hyperparams=new))


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs. params: model parameters; opt_state: optimizer state;
    step: [] int32 steps taken; rng: [2] uint32 raw PRNG key (split once per step); data_pos: []
    int32 index of the next batch (`data.batch_at`)."""

    params: Any
    opt_state: Any
    step: Array
    rng: Array
    data_pos: Array


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                      rng=jax.random.PRNGKey(seed), data_pos=jnp.zeros((), jnp.int32))


class CheckpointError(InputError):
    """A checkpoint that cannot be restored (damaged, truncated, non-finite) or was not written."""


@jax.jit
def _all_finite(tree: Any) -> Array:
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point number in `tree` is finite (one reduction on the device)."""
    return bool(_all_finite(tree))


@contextlib.contextmanager
def held_orbax_logs(drop: Callable[[BaseException], bool] = lambda e: True) -> Iterator[None]:
    """Hold back the records orbax logs (through absl, from its writer threads too) during the block:
    they are logged when it ends, or dropped when it raises an error for which `drop(error)` is true
    (one that the caller reports in one line itself: orbax logs every failed thread's traceback)."""
    logger, held = logging.getLogger("absl"), []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield
    except BaseException as e:
        if drop(e):
            held.clear()
        raise
    finally:
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)


def is_disk_error(e: BaseException) -> bool:
    """A full disk, quota, read-only or permission error (`rundir.os_error_in`), also as tensorstore text."""
    return os_error_in(e, set(DISK_ERRNOS)) is not None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


class Checkpoints:
    """Orbax `CheckpointManager` over `TrainState`s in `directory` (keeps the newest `keep`). Saves
    are synchronous and refuse a non-finite state; temporaries of an interrupted save are removed
    when the manager is opened."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        with held_orbax_logs(is_disk_error):
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                     cleanup_tmp_directories=True))

    def save(self, state: TrainState) -> None:
        """Write `state` as the checkpoint of its step (and wait for it). A full disk raises the
        writer's error without orbax's per-thread tracebacks in the log."""
        step = int(state.step)
        if not all_finite(state):
            raise CheckpointError(f"not saving step {step}: the state holds non-finite numbers")
        with held_orbax_logs(is_disk_error):
            saved = self.manager.save(step, args=ocp.args.StandardSave(state))
            self.manager.wait_until_finished()
        if not saved:
            raise CheckpointError(f"orbax did not save step {step} in {self.directory} (it holds step "
                                  f"{self.manager.latest_step()})")

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def restore(self, like: TrainState, step: Optional[int] = None) -> TrainState:
        """The checkpoint at `step` (default: the latest) restored into the structure, dtypes and
        shardings of `like`."""
        step = self.manager.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_intact(self, like: TrainState) -> tuple[Optional[TrainState], list[tuple[int, str]]]:
        """(state, damaged): the newest checkpoint that restores into `like` and holds only finite
        numbers (None when none does), and [(step, reason)] of the newer ones that do not (truncated,
        garbled, bit-flipped into NaN). Changes nothing on disk."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with held_orbax_logs():
                    state = self.restore(like, step)
            except Exception as e:  # orbax / tensorstore raise assorted errors for damaged files
                if is_disk_error(e):  # unreadable (permissions), not damaged
                    raise
                damaged.append((step, f"cannot be read: {_first_line(e)}"))
                continue
            if not all_finite(state):
                damaged.append((step, "holds non-finite numbers"))
                continue
            return state, damaged
        return None, damaged

    def set_aside(self, step: int, directory: Path) -> Path:
        """Move checkpoint `step` out of the manager into `directory` (a new entry); returns its path."""
        directory.mkdir(parents=True, exist_ok=True)
        dest, n = directory / str(step), 1
        while dest.exists():
            dest, n = directory / f"{step}.{n}", n + 1
        self.step_dir(step).rename(dest)
        self.manager.reload()
        return dest

    def close(self) -> None:
        with held_orbax_logs(is_disk_error):
            self.manager.close()
