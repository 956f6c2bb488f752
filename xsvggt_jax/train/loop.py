"""The training run behind `xsvggt train`: data, train step, logging, evaluation, checkpoints, resume.

Output directory layout (everything written by the run itself):
  run.json           the run's settings; a re-run with the same OUT must have identical settings
  checkpoints/       Orbax CheckpointManager: TrainState (params, optimizer state, step, rng, data
                     position) every `save_every` steps and at the end; a re-run resumes from the
                     latest one and continues bit-identically
  metrics.jsonl      one JSON object per step: {"step", "loss", loss components, "grad_norm", "lr",
                     "steps_per_s"}
  eval.jsonl         one JSON object per evaluation: {"step", "abs_rel", "delta_1.25", "ate"}
  loss.png           the loss curves
  params/            the final parameters (`io.params.save_params`, loadable by
                     `xsvggt reconstruct --params`)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.eval.depth import DELTA_KEYS, evaluate_depth
from xsvggt_jax.eval.geometry import EvalInputError
from xsvggt_jax.eval.pose import extrinsics_to_c2w, trajectory_metrics
from xsvggt_jax.io.fsutil import atomic_write, atomic_write_text
from xsvggt_jax.weights.params import save_params
from xsvggt_jax.geometry import pose_encoding_to_extri_intri
from xsvggt_jax.train.config import LossConfig
from xsvggt_jax.train.data import DataSource, batch_at, eval_clips, make_clip_fn
from xsvggt_jax.train.state import Checkpoints, OptimConfig, init_state, make_optimizer, param_labels
from xsvggt_jax.train.step import eval_forward, make_teacher, make_train_step, place_state, shard_batch
from xsvggt_jax.errors import InputError

log = logging.getLogger(__name__)

RUN_FORMAT = "xsvggt-train/2"  # 2: optimizer settings are arrays in the checkpointed state
PLOT_KEYS = ("loss", "camera", "depth_conf_l1", "point_conf_l1")


class RunError(InputError):
    """The output directory holds another run (different settings) or files that are not ours."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Settings of one training run. student: "causal" | "full" | "stream" (with student_cache);
    teacher_mode: None (supervised) or "full" | "causal" | "stream" (distillation from teacher
    params, uncompressed cache for "stream"); eval_every / save_every: steps (0: only at the end);
    eval_scenes: held-out procedural scenes per evaluation; seed: parameter init and step rng."""

    model: ModelConfig
    data: DataSource
    optim: OptimConfig
    loss: LossConfig = LossConfig()
    student: str = "causal"
    student_cache: Optional[CacheConfig] = None
    teacher_mode: Optional[str] = None
    remat: bool = False
    init: str = "random"
    teacher: Optional[str] = None
    eval_every: int = 0
    save_every: int = 0
    eval_scenes: int = 2
    seed: int = 0

    def to_json(self) -> dict:
        """Plain JSON of the settings that determine the run's numbers (compared on resume)."""
        def plain(x):
            if dataclasses.is_dataclass(x):
                return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
            return list(map(plain, x)) if isinstance(x, (tuple, list)) else x
        d = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)
             if f.name not in ("eval_every", "save_every", "eval_scenes")}
        d["model"] = self.model.to_dict()
        return {"format": RUN_FORMAT, **d}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested JSON objects -> {"optim.steps": 3, ...}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def check_out_dir(out: Path, run: RunConfig) -> bool:
    """True when `out` holds this run to resume; False when it is new or empty. Raises RunError for
    a different run or a non-empty directory that is not a training run."""
    marker = out / "run.json"
    if marker.exists():
        try:
            stored = json.loads(marker.read_text())
        except ValueError as e:
            raise RunError(f"{marker}: not a training run file ({e})") from e
        current = _flatten(json.loads(json.dumps(run.to_json())))
        if _flatten(stored) != current:
            old = _flatten(stored)
            diff = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
            raise RunError(f"{out} holds a training run with other settings ({', '.join(diff)}); "
                           "use another --out")
        return True
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} exists and is not an xsvggt training run; use another --out")
    return False


def _read_jsonl(path: Path, upto_step: int) -> list[dict]:
    """Entries of a JSONL log with step <= upto_step (later ones belong to an interrupted run)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


def plot_losses(rows: list[dict], path: Path) -> None:
    """Loss curves of metrics rows into a PNG (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key in PLOT_KEYS:
        if rows and key in rows[0]:
            ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (total can be negative: -alpha log conf)")
    ax.legend()
    ax.grid(alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


def clip_metrics(out: dict, scene) -> dict[str, Any]:
    """Depth AbsRel / delta<1.25 (one median scale over the clip), camera ATE (Sim(3)-aligned camera
    centres) and focal error (mean |f / f_true - 1| over frames and both axes; inf for a field of view
    <= 0) of one clip's predictions against its procedural scene. out: host arrays
    {"depth" [1, S, H, W, 1], "camera_pose" [1, S, 9]}. "ate" is None when the clip allows no
    alignment: fewer than 3 frames, or coinciding predicted centres (an untrained model)."""
    _, h, w = scene.depth.shape
    depth = evaluate_depth(out["depth"][0, ..., 0], scene.depth, align="median")
    extr, intr = pose_encoding_to_extri_intri(jax.numpy.asarray(out["camera_pose"][0]), (h, w))
    try:
        ate = trajectory_metrics(extrinsics_to_c2w(np.asarray(extr)), extrinsics_to_c2w(scene.extrinsics))["ate"]
    except EvalInputError:
        ate = None
    diag = (slice(None), [0, 1], [0, 1])  # [S, 2]: fx, fy
    with np.errstate(invalid="ignore"):
        ratio = np.asarray(intr, np.float64)[diag] / np.asarray(scene.intrinsics, np.float64)[diag]
    focal = np.abs(ratio - 1.0)
    return {"abs_rel": depth["abs_rel"], DELTA_KEYS[0]: depth[DELTA_KEYS[0]], "ate": ate,
            "focal_err": float(np.mean(np.where(np.isfinite(focal), focal, np.inf)))}


def evaluate(predict: Callable, params: dict, clips: list) -> dict[str, float]:
    """Mean of `clip_metrics` over held-out clips (predict(params, images [1, S, H, W, 3])); "ate"
    averages the clips that allow it (None when none does)."""
    rows = [clip_metrics(jax.device_get(predict(params, targets["images"][None])), scene)
            for targets, scene in clips]
    ates = [r["ate"] for r in rows if r["ate"] is not None]
    return {"abs_rel": float(np.mean([r["abs_rel"] for r in rows])),
            DELTA_KEYS[0]: float(np.mean([r[DELTA_KEYS[0]] for r in rows])),
            "ate": float(np.mean(ates)) if ates else None,
            "focal_err": float(np.mean([r["focal_err"] for r in rows]))}


class Progress:
    """A one-line progress bar on stderr (nothing when quiet)."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet = total, quiet

    def update(self, step: int, loss: float, lr: float, rate: float) -> None:
        if not self.quiet:
            sys.stderr.write(f"\rstep {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} steps/s")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.quiet:
            sys.stderr.write("\n")


def train(run: RunConfig, out: str | os.PathLike, params: Optional[dict] = None,
          teacher_params: Optional[dict] = None, quiet: bool = True, mesh=None) -> dict[str, Any]:
    """Run (or resume) training to run.optim.steps steps; returns {"step", "params" (path),
    "eval" (last evaluation or None)}. params: initial parameters (required unless resuming);
    teacher_params: required when run.teacher_mode is set."""
    out = Path(out)
    resuming = check_out_dir(out, run)
    out.mkdir(parents=True, exist_ok=True)
    if not resuming:
        atomic_write_text(out / "run.json", json.dumps(run.to_json(), indent=1))
    cfg, ocfg = run.model, run.optim
    if params is None:
        raise RunError("initial parameters are required")
    optimizer = make_optimizer(ocfg, params)
    labels = param_labels(params, ocfg.freeze)
    state = place_state(init_state(params, optimizer, run.seed), mesh)
    ckpt = Checkpoints(out / "checkpoints")
    if resuming and ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        log.info("resumed %s at step %d", out, int(state.step))
    train_step = make_train_step(cfg, optimizer, labels, loss_cfg=run.loss, mode=run.student,
                                 cache_cfg=run.student_cache, remat=run.remat, mesh=mesh)
    teacher = make_teacher(cfg, run.teacher_mode) if run.teacher_mode else None
    clip_fn = make_clip_fn(run.data)
    predict = eval_forward(cfg, run.student, run.student_cache)
    held_out = eval_clips(run.data, run.eval_scenes) if run.eval_scenes else []

    start = int(state.step)
    rows = _read_jsonl(out / "metrics.jsonl", start)
    evals = _read_jsonl(out / "eval.jsonl", start)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in evals))
    progress = Progress(ocfg.steps, quiet)
    last_eval = evals[-1] if evals else None
    t_first, done_here = None, 0   # steps/s counts from the end of the first (compiling) step
    with open(out / "metrics.jsonl", "a") as metrics_file:
        while int(state.step) < ocfg.steps:
            batch = batch_at(clip_fn, run.data, int(state.data_pos))
            if teacher is not None:
                images = batch["images"]
                batch = {"images": images, **{k: np.asarray(v) for k, v in
                                              jax.device_get(teacher(teacher_params, images)).items()}}
            state, metrics = train_step(state, shard_batch(batch, mesh))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            done_here += 1
            step = int(state.step)
            if t_first is None:
                t_first, rate = time.perf_counter(), 0.0
            else:
                rate = (done_here - 1) / (time.perf_counter() - t_first)
            row = {"step": step, **metrics, "steps_per_s": rate}
            rows.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            progress.update(step, metrics["loss"], metrics["lr"], rate)
            final = step >= ocfg.steps
            if held_out and (final or (run.eval_every and step % run.eval_every == 0)):
                last_eval = {"step": step, **evaluate(predict, state.params, held_out)}
                with open(out / "eval.jsonl", "a") as f:
                    f.write(json.dumps(last_eval) + "\n")
                log.info("eval at step %d: %s", step, last_eval)
            if final or (run.save_every and step % run.save_every == 0):
                ckpt.save(state)
                plot_losses(rows, out / "loss.png")
    progress.close()
    if not (out / "loss.png").exists():
        plot_losses(rows, out / "loss.png")
    ckpt.close()
    final_params = jax.device_get(state.params)
    path = save_params(final_params, out / "params", cfg, overwrite=True)
    return {"step": int(state.step), "params": str(path), "eval": last_eval}
