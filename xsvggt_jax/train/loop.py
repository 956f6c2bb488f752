"""The training run behind `xsvggt train`: data, train step, logging, evaluation, checkpoints, resume.

Output directory layout (everything written by the run itself):
  run.json           the run's settings; a re-run with the same OUT must have identical settings
  .xsvggt-train.lock held (flock) by the live run, with its owner record: a second run is refused
                     (`rundir`)
  checkpoints/       Orbax CheckpointManager: TrainState (params, optimizer state, step, rng, data
                     position) every `save_every` steps and at the end; a re-run resumes from the
                     latest intact one and continues bit-identically
  damaged-checkpoints/  newer checkpoints that could not be restored (truncated, garbled,
                     non-finite), moved aside when a re-run resumed from an older one
  metrics.jsonl      one JSON object per step: {"step", "loss", loss components, "grad_norm", "lr",
                     "steps_per_s"}
  eval.jsonl         one JSON object per evaluation: {"step", "abs_rel", "delta_1.25", "ate"}
  loss.png           the loss curves
  params/            the final parameters (`io.params.save_params`, loadable by
                     `xsvggt reconstruct --params`)

Everything is checked before the first file is written (settings, the directory, the data). A loss or
gradient norm that is not finite stops the run (`TrainingDiverged`) with the last (finite) checkpoint
kept; no checkpoint holding a non-finite number is written or resumed from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
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
from xsvggt_jax.train.rundir import RUN_FILE, RUN_FORMAT, RunError, check_out_dir, claim_run_dir, normalise_path
from xsvggt_jax.train.state import (CheckpointError, Checkpoints, OptimConfig, all_finite, held_orbax_logs,
                                    init_state, is_disk_error, make_optimizer, param_labels)
from xsvggt_jax.train.step import eval_forward, make_teacher, make_train_step, place_state, shard_batch
from xsvggt_jax.errors import InputError

log = logging.getLogger(__name__)

PLOT_KEYS = ("loss", "camera", "depth_conf_l1", "point_conf_l1")
DAMAGED = "damaged-checkpoints"

__all__ = ["RUN_FORMAT", "RunConfig", "RunError", "TrainingDiverged", "check_out_dir", "train"]


class TrainingDiverged(InputError):
    """A loss, gradient norm or state that is not finite: the run stopped (its last checkpoint is kept)."""


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
        d["init"], d["teacher"] = normalise_path(self.init), normalise_path(self.teacher)
        if d["data"]["root"] is not None:
            d["data"]["root"] = normalise_path(d["data"]["root"])
        return {"format": RUN_FORMAT, **d}


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


def _resume(ckpt: Checkpoints, state, out: Path):
    """The newest intact checkpoint (or `state` when there is none); damaged newer ones are moved to
    OUT/damaged-checkpoints/ with a warning. CheckpointError when checkpoints exist and none is intact."""
    if ckpt.latest_step() is None:
        return state
    restored, damaged = ckpt.restore_intact(state)
    if restored is None:
        step, why = damaged[0]
        raise CheckpointError(
            f"cannot resume {out}: its checkpoint {ckpt.step_dir(step)} {why}"
            + (f" (older ones damaged too: {', '.join(str(s) for s, _ in damaged[1:])})" if damaged[1:] else "")
            + f"; move {ckpt.directory} aside to start this run over, or use another --out")
    for step, why in damaged:
        moved = ckpt.set_aside(step, out / DAMAGED)
        log.warning("checkpoint %s %s; moved it to %s and resuming from step %d instead",
                    ckpt.step_dir(step), why, moved, int(restored.step))
    log.info("resumed %s at step %d", out, int(restored.step))
    return restored


def _diverged(step: int, what: str, ckpt: Checkpoints) -> TrainingDiverged:
    last = ckpt.latest_step()
    kept = (f"its last checkpoint, step {last} in {ckpt.directory}, is kept" if last is not None
            else "no checkpoint had been saved")
    return TrainingDiverged(f"training diverged at step {step} ({what}); stopped: {kept}. Lower --lr (or raise "
                            "--warmup) and train into a new --out")


def train(run: RunConfig, out: str | os.PathLike, params: Optional[dict] = None,
          teacher_params: Optional[dict] = None, quiet: bool = True, mesh=None,
          clip_fn: Optional[Callable] = None) -> dict[str, Any]:
    """Run (or resume) training to run.optim.steps steps; returns {"step", "params" (path),
    "eval" (last evaluation or None)}. params: initial parameters (required unless resuming);
    teacher_params: required when run.teacher_mode is set; clip_fn: `make_clip_fn(run.data)` when the
    caller has made it already. Raises RunError (another run, a directory in use), CheckpointError
    (nothing intact to resume), TrainingDiverged; nothing is written before the settings, the
    directory and the data have been checked."""
    out = Path(out)
    check_out_dir(out, run)
    cfg, ocfg = run.model, run.optim
    if params is None:
        raise RunError("initial parameters are required")
    if run.teacher_mode and teacher_params is None:
        raise RunError("a distillation run needs the teacher's parameters")
    optimizer = make_optimizer(ocfg, params)
    labels = param_labels(params, ocfg.freeze)
    clip_fn = make_clip_fn(run.data) if clip_fn is None else clip_fn     # checks the data source
    held_out = eval_clips(run.data, run.eval_scenes) if run.eval_scenes else []
    train_step = make_train_step(cfg, optimizer, labels, loss_cfg=run.loss, mode=run.student,
                                 cache_cfg=run.student_cache, remat=run.remat, mesh=mesh)
    teacher = make_teacher(cfg, run.teacher_mode) if run.teacher_mode else None
    predict = eval_forward(cfg, run.student, run.student_cache)
    state = place_state(init_state(params, optimizer, run.seed), mesh)

    with claim_run_dir(out):
        if not check_out_dir(out, run, locked=True):    # again under the lock: no other run writes here now
            atomic_write_text(out / RUN_FILE, json.dumps(run.to_json(), indent=1))
        ckpt = Checkpoints(out / "checkpoints")
        try:
            state = _resume(ckpt, state, out)
            state, rows, last_eval = _run_steps(run, out, state, ckpt, train_step, clip_fn, held_out, predict,
                                                teacher, teacher_params, quiet, mesh)
            if not (out / "loss.png").exists():
                plot_losses(rows, out / "loss.png")
        except BaseException:
            with contextlib.suppress(Exception):   # the error in flight is the one to report
                ckpt.close()
            raise
        ckpt.close()
        final_params = jax.device_get(state.params)
        with held_orbax_logs(is_disk_error):
            path = save_params(final_params, out / "params", cfg, overwrite=True)
    return {"step": int(state.step), "params": str(path), "eval": last_eval}


def _run_steps(run: RunConfig, out: Path, state, ckpt: Checkpoints, train_step, clip_fn, held_out, predict,
               teacher, teacher_params, quiet: bool, mesh):
    """The step loop from state.step to run.optim.steps: metrics, evaluations, checkpoints. Returns
    (state, metrics rows, last evaluation)."""
    ocfg = run.optim
    start = int(state.step)
    rows = _read_jsonl(out / "metrics.jsonl", start)
    evals = _read_jsonl(out / "eval.jsonl", start)
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in evals))
    progress = Progress(ocfg.steps, quiet)
    last_eval = evals[-1] if evals else None
    t_first, done_here = None, 0   # steps/s counts from the end of the first (compiling) step
    with open(out / "metrics.jsonl", "a") as metrics_file:
        try:
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
                bad = [f"{k} {metrics[k]}" for k in ("loss", "grad_norm") if not math.isfinite(metrics.get(k, 0.0))]
                if bad:
                    raise _diverged(step, ", ".join(bad), ckpt)
                progress.update(step, metrics["loss"], metrics["lr"], rate)
                final = step >= ocfg.steps
                if held_out and (final or (run.eval_every and step % run.eval_every == 0)):
                    last_eval = {"step": step, **evaluate(predict, state.params, held_out)}
                    with open(out / "eval.jsonl", "a") as f:
                        f.write(json.dumps(last_eval) + "\n")
                    log.info("eval at step %d: %s", step, last_eval)
                if final or (run.save_every and step % run.save_every == 0):
                    if not all_finite(state):
                        raise _diverged(step, "the updated parameters or optimizer state are not finite", ckpt)
                    ckpt.save(state)
                    plot_losses(rows, out / "loss.png")
        finally:
            progress.close()
    return state, rows, last_eval
