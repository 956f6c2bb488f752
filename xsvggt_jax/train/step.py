"""The jitted train step (supervised or distillation) and the forward passes it differentiates.

Student / teacher forward modes (`MODES`):
  "full":   offline, every frame attends to every frame (VGGT-style);
  "causal": offline with the frame-causal mask (StreamVGGT's training forward);
  "stream": `lax.scan` of the pure streaming `step.step` over the clip with a `CacheConfig`. With a
            compressed cache this is compression-aware fine-tuning. Gradients flow through the
            current frame's keys / values and, for pruned caches, through the kept past keys / values
            (the top-k choice itself is discrete). A quantized cache stores integer codes, so the
            past keys / values reach the loss only through the dequantization's float scale and zero
            point (round() and the integer codes have no gradient; no straight-through estimator).
Distillation targets are the teacher's outputs (camera_pose, depth, pts3d_in_other_view; every
pixel valid), computed by a separately jitted `make_teacher` function, so the train step is the same
function in both modes: `train_step(state, batch) -> (state, metrics)`, with batch = images plus
targets.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import numpy as np
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.model import StreamVGGT
from xsvggt_jax.stream.step import step as stream_step
from xsvggt_jax.train.config import LossConfig
from xsvggt_jax.train.losses import multitask_loss
from xsvggt_jax.train.state import TrainState, hyperparams, learning_rate_at
from xsvggt_jax.errors import ConfigError

Array = jax.Array
MODES = ("full", "causal", "stream")
DISTILL_KEYS = ("camera_pose", "depth", "pts3d_in_other_view")


class TrainModeError(ConfigError):
    """An unknown forward mode, or a stream mode without a cache configuration."""


class TraceCountError(RuntimeError):
    """A train step traced more often than its `max_traces` (each retrace recompiles)."""


def check_mode(mode: str, cache_cfg: Optional[CacheConfig]) -> None:
    if mode not in MODES:
        raise TrainModeError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "stream" and cache_cfg is None:
        raise TrainModeError("the stream mode needs a CacheConfig")


def forward(cfg: ModelConfig, mode: str, cache_cfg: Optional[CacheConfig], params: dict, images: Array,
            rng: Optional[Array] = None, remat: bool = False) -> dict:
    """Model outputs [B, S, ...] (see `xsvggt_jax.nn.model`) for images [B, S, H, W, 3] in [0, 1].
    rng: key of a stream's cache (the random pruning policy); remat: rematerialise each transformer
    block of the aggregator (offline modes) or each frame step (stream) in the backward pass."""
    check_mode(mode, cache_cfg)
    # "xla" attention: the blocked implementation's loops have data-dependent trip counts (causal
    # blocks skipped), which reverse-mode differentiation does not support
    model = StreamVGGT(cfg, remat=remat, attention="xla")
    if mode != "stream":
        return model.apply({"params": params}, images, None, mode == "causal", method=StreamVGGT.offline)
    b, s, h, w, _ = images.shape
    cache = init_cache(cfg, cache_cfg, b, (h, w), max_frames=s)
    if rng is not None:
        cache = cache.replace(rng=rng)
    frame_step = functools.partial(stream_step, cfg, cache_cfg, params)
    if remat:
        frame_step = jax.checkpoint(frame_step)     # per frame: recompute the frame in the backward pass
    _, out = jax.lax.scan(frame_step, cache, jnp.swapaxes(images, 0, 1))
    return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), out)      # [S, B, ...] -> [B, S, ...]


def make_teacher(cfg: ModelConfig, mode: str, cache_cfg: Optional[CacheConfig] = None
                 ) -> Callable[[dict, Array], dict]:
    """Jitted teacher(params, images [B,S,H,W,3]) -> distillation targets {camera_pose [B,S,9],
    depth [B,S,H,W,1], pts3d_in_other_view [B,S,H,W,3]} (float32). mode "stream" defaults to the
    uncompressed cache."""
    if mode == "stream" and cache_cfg is None:
        cache_cfg = CacheConfig.uncompressed()
    check_mode(mode, cache_cfg)

    @jax.jit
    def teacher(params: dict, images: Array) -> dict:
        out = forward(cfg, mode, cache_cfg, params, images)
        return {k: out[k].astype(jnp.float32) for k in DISTILL_KEYS}

    return teacher


def trainable_norm(grads: dict, labels: dict) -> Array:
    """Global norm of the gradients of the trainable ("train"-labelled) parameters."""
    kept = jax.tree_util.tree_map(lambda g, l: g if l == "train" else jnp.zeros((), g.dtype), grads, labels)
    return optax.tree.norm(kept)


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, labels: dict,
                    schedule: Optional[optax.Schedule] = None, *, loss_cfg: LossConfig = LossConfig(),
                    mode: str = "causal", cache_cfg: Optional[CacheConfig] = None, remat: bool = False,
                    mesh: Optional[Mesh] = None, max_traces: int = 1) -> Callable:
    """Jitted `train_step(state, batch) -> (state, metrics)`; the state is donated.

    batch: images [B,S,H,W,3] plus target keys of `multitask_loss` (camera_pose [B,S,9], depth
    [B,S,H,W,1], pts3d_in_other_view [B,S,H,W,3], valid [B,S,H,W] optional). labels: `param_labels`
    of the parameters (for the logged gradient norm). schedule: the optimizer's learning rate, for the
    "lr" metric; None (the default) reads it from a `make_optimizer` state, whose settings are arrays,
    so this one compiled step serves every lr / warmup / steps (`xsvggt_jax.train.state.set_hyperparams`);
    a schedule function is compiled into the step.
    metrics: the loss components of `multitask_loss`, "grad_norm" (trainable, before clipping) and
    "lr" (the rate this step used; absent for another optimizer without a schedule). mesh: shard the
    batch over its "data" axis and replicate the state (data parallel; B must divide by the axis
    size); default: `default_mesh()`. Place the
    state with `place_state` and the batch with `shard_batch` (same mesh) before the first call:
    inputs of another sharding trace again (and trip the trace counter). Raises TraceCountError when this
    step (each `make_train_step` call counts its own traces) is traced more than `max_traces` times.
    """
    check_mode(mode, cache_cfg)
    if mode == "stream" and not cache_cfg.pruned:
        raise TrainModeError("a streaming student needs a pruned cache (prune != 'none'): the uncompressed "
                             "cache attends over its filled prefix in a loop of data-dependent length, which "
                             "reverse-mode differentiation does not support")

    traces = 0

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        nonlocal traces
        traces += 1
        if traces > max_traces:
            raise TraceCountError(f"the train step is traced {traces} times (at most {max_traces}): its inputs "
                                  "changed shape, dtype or sharding (place them with place_state / shard_batch)")
        rng, key = jax.random.split(state.rng)
        targets = {k: v for k, v in batch.items() if k != "images"}

        def loss_fn(params):
            preds = forward(cfg, mode, cache_cfg, params, batch["images"], key, remat)
            return multitask_loss(preds, targets, loss_cfg)

        (_, comps), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                            step=state.step + 1, rng=rng, data_pos=state.data_pos + 1)
        metrics = {**comps, "grad_norm": trainable_norm(grads, labels)}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        elif (hp := hyperparams(state.opt_state)) is not None:
            metrics["lr"] = learning_rate_at(state.step, hp["lr"], hp["warmup"], hp["steps"], hp["final_lr_ratio"])
        return new, metrics

    mesh = default_mesh() if mesh is None else mesh   # explicit shardings: one trace, one compile
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    return jax.jit(train_step, donate_argnums=(0,), in_shardings=(replicated, batch_sharding),
                   out_shardings=(replicated, replicated))


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def default_mesh() -> Mesh:
    """The "data" mesh of the first device alone (single-device training)."""
    return data_mesh(jax.devices()[:1])


def shard_batch(batch: dict, mesh: Optional[Mesh] = None) -> dict:
    """Device-put a host batch split along the batch axis over the mesh's "data" axis (default mesh:
    `default_mesh()`)."""
    return jax.device_put(batch, NamedSharding(mesh or default_mesh(), PartitionSpec("data")))


def place_state(state: TrainState, mesh: Optional[Mesh] = None) -> TrainState:
    """The state replicated over the mesh (default: `default_mesh()`), as `make_train_step` expects."""
    return jax.device_put(state, NamedSharding(mesh or default_mesh(), PartitionSpec()))


def eval_forward(cfg: ModelConfig, mode: str, cache_cfg: Optional[CacheConfig]) -> Callable[[dict, Array], dict]:
    """Jitted predict(params, images) -> {camera_pose, depth} (for periodic evaluation)."""
    @functools.partial(jax.jit)
    def predict(params: dict, images: Array) -> dict:
        out = forward(cfg, mode, cache_cfg, params, images)
        return {"camera_pose": out["camera_pose"], "depth": out["depth"]}
    return predict
