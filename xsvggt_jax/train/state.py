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

import dataclasses
from pathlib import Path
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from xsvggt_jax.errors import ConfigError

Array = jax.Array

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
        if not self.lr > 0 or self.steps < 1 or self.warmup < 0 or not self.clip_norm > 0:
            raise TrainConfigError(f"need lr > 0, steps >= 1, warmup >= 0, clip_norm > 0; got lr={self.lr}, "
                                   f"steps={self.steps}, warmup={self.warmup}, clip_norm={self.clip_norm}")


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


class Checkpoints:
    """Orbax `CheckpointManager` over `TrainState`s in `directory` (keeps the newest `keep`)."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.manager = ocp.CheckpointManager(Path(directory).absolute(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def save(self, state: TrainState) -> None:
        self.manager.save(int(state.step), args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, like: TrainState, step: Optional[int] = None) -> TrainState:
        """The checkpoint at `step` (default: the latest) restored into the structure, dtypes and
        shardings of `like`."""
        step = self.manager.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self.manager.close()
