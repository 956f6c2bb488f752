"""Evaluate cache settings on a dataset: stream every sequence once per setting, score the task.

`evaluate(params, cfg, dataset, settings, task)` is what `xsvggt eval` runs:

1. every check that can fail on the inputs (task, settings, the dataset serving the task, frame
   sizes) runs first and raises a `ValueError` subclass before any model work;
2. per sequence, frames are preprocessed as `xsvggt reconstruct` preprocesses images (upstream's
   `load_and_preprocess_images`: bicubic resize to `frame_size` wide, centre crop or white pad) and
   the ground truth is carried into the same pixel grid (`data.preprocess`);
3. per setting, the frames go through the jitted streaming step (`make_step` + `init_cache`, exactly
   as `reconstruct` streams: batch 1, no query points, an uncompressed cache sized to the sequence),
   or, for `offline-full` / `offline-causal` (`settings.OFFLINE_SETTINGS`), the batch forward over
   all of them at once (`offline_sequence`, as `reconstruct --offline`);
4. the task's metrics are computed per sequence and aggregated:
   * `recon`: Acc / Comp / NC (`reconstruction_metrics`: median shift + median-norm scale, 224 px
     centre crop (whole frames when they are smaller), ICP 0.1) of the predicted points against the
     ground-truth depth unprojected into the first camera; mean over sequences (upstream). `points`:
     the point map `pts3d_in_other_view` ("pointmap", StreamVGGT's protocol) or the predicted depth
     unprojected with the predicted cameras ("depth", VGGT's: both in the first camera's frame);
   * `video-depth`: AbsRel, delta < 1.25 of `depth` with one robust scale per sequence (upstream
     `--align scale`) and the dataset's depth caps; average weighted by valid pixels (upstream).
     When the model frames are the whole images resized (landscape frames in crop mode: Sintel,
     Bonn, KITTI, ...) the prediction is resized to the ground truth's resolution with OpenCV's
     bicubic (`resize_depth`) as upstream does; when rows were cropped or padding added, the ground
     truth is carried onto the model grid instead (nearest, `data.preprocess`). A sequence without a
     valid ground-truth pixel is not scored (a warning; n/a when no sequence is);
   * `pose`: ATE, RPE-trans, RPE-rot (Sim(3), delta 1) of the cameras decoded from `camera_pose`,
     plus RRA@30, RTA@30 and AUC@30 over all frame pairs; mean over sequences, or (`pose_pairs`
     "pooled", VGGT's protocol) RRA / RTA / AUC over the pairs of every sequence together.
   Per setting it also records the cache bytes (`cache_report`, the largest over sequences), the
   median latency per frame after each sequence's first frame (which includes compilation; NaN, n/a in
   the report, when every sequence has one frame), and the
   process's peak RSS (a process-wide high-water mark: a later setting never reports less).

Any `CacheConfig` works, including one whose `prune` names a policy the user registered in
`xsvggt_jax.cache.prune.POLICIES` (see `settings.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import jax
import numpy as np

from xsvggt_jax.cache.core import CacheConfig, cache_report, init_cache
from xsvggt_jax.config import ModelConfig, check_frame_size
from xsvggt_jax.data.base import Dataset, Sequence
from xsvggt_jax.data.preprocess import preprocess_frame
from xsvggt_jax.geometry import pose_encoding_to_extri_intri, unproject_depth
from xsvggt_jax.io.frames import FrameError, preprocess_image, preprocessed_size, resized_size
from xsvggt_jax.nn.model import StreamVGGT
from xsvggt_jax.runtime import peak_rss_bytes
from xsvggt_jax.stream.loop import SingleStream, stream_steps
from xsvggt_jax.stream.step import make_step
from xsvggt_jax.eval.depth import DEPTH_PROTOCOLS, DepthProtocol, average_depth_metrics, evaluate_depth, resize_depth
from xsvggt_jax.eval.geometry import EvalInputError
from xsvggt_jax.eval.pointcloud import CROP_SIZE, reconstruction_metrics, world_to_camera
from xsvggt_jax.eval.pose import extrinsics_to_c2w, pairwise_pose_errors, pose_accuracy, pose_auc, trajectory_metrics
from xsvggt_jax.eval.settings import POINTS, Setting, as_settings
from xsvggt_jax.errors import ConfigError

log = logging.getLogger(__name__)

#: Per-frame outputs kept from the stream (the track head is not evaluated).
PREDICTION_KEYS = ("pts3d_in_other_view", "conf", "depth", "depth_conf", "camera_pose")


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task reports. columns: the metric keys of the results table; primary: the accuracy
    plotted against cache bytes; lower_is_better: its direction."""

    columns: tuple[str, ...]
    primary: str
    lower_is_better: bool


TASKS: Mapping[str, Task] = {
    "recon": Task(("acc", "acc_med", "comp", "comp_med", "nc", "nc_med"), "acc", True),
    "video-depth": Task(("abs_rel", "delta_1.25"), "abs_rel", True),
    "pose": Task(("ate", "rpe_trans", "rpe_rot", "rra@30", "rta@30", "auc@30"), "ate", True),
}


class EvalConfigError(ConfigError):
    """An evaluation that cannot run as asked (unknown task, a dataset without the task's ground
    truth, frames the model cannot take); raised before any model work."""


@dataclasses.dataclass(frozen=True)
class SettingResult:
    """One setting's outcome. sequences: sequence name -> its metrics plus "frames", "cache_bytes",
    "ms_per_frame" (and "error" when the metrics could not be computed); aggregate: the task's
    aggregate over the scored sequences plus "sequences_scored"; cache: `cache_report` of the largest
    cache; ms_per_frame: median latency after each sequence's first frame (NaN when every sequence has
    one frame: a first frame's time includes compilation); peak_rss_bytes: the
    process's peak RSS after this setting; device_peak_bytes: the accelerator's peak bytes in use
    (None where the backend does not report it). An offline setting has no cache (cache_bytes 0)."""

    setting: Setting
    sequences: dict[str, dict[str, Any]]
    aggregate: dict[str, float]
    cache: dict[str, int]
    ms_per_frame: float
    peak_rss_bytes: int
    device_peak_bytes: Optional[int]


@dataclasses.dataclass(frozen=True, eq=False)
class EvalResults:
    """Everything `evaluate` measured. frame_hw: the model's input size per sequence;
    predictions: setting name -> sequence name -> PREDICTION_KEYS arrays [S, ...] when
    `keep_predictions`, else None; protocol: the choices that differ by model ({"points", "pose_pairs"})."""

    task: str
    dataset: str
    settings: tuple[SettingResult, ...]
    model: dict
    resize: str
    frame_size: int
    frame_hw: dict[str, tuple[int, int]]
    frames: dict[str, int]
    predictions: Optional[dict[str, dict[str, dict[str, np.ndarray]]]] = None
    protocol: Optional[dict] = None


# ---------------------------------------------------------------------------------------- checks
def check_evaluation(cfg: ModelConfig, dataset: Dataset, task: str, resize: str = "crop",
                     frame_size: Optional[int] = None) -> dict[str, tuple[int, int]]:
    """Everything about an evaluation that can be checked before any model work (reads the first frame
    of each sequence). Returns sequence name -> model frame (H, W). Raises EvalConfigError."""
    target = cfg.img_size if frame_size is None else frame_size
    if task not in TASKS:
        raise EvalConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    info = dataset.info
    if task not in info.tasks:
        raise EvalConfigError(f"the {info.name} dataset has no ground truth for the {task} task "
                              f"(it serves {', '.join(info.tasks)})")
    if not len(dataset):
        raise EvalConfigError(f"the {info.name} dataset has no sequences")
    sizes = {}
    for seq in dataset:
        if task in ("recon", "pose") and seq.extrinsics is None:
            raise EvalConfigError(f"{seq.name}: no ground-truth poses for the {task} task")
        if task in ("recon", "video-depth") and seq.load_depth is None:
            raise EvalConfigError(f"{seq.name}: no ground-truth depth for the {task} task")
        if task == "recon" and seq.intrinsics is None:
            raise EvalConfigError(f"{seq.name}: no intrinsics to unproject the ground-truth depth")
        if len(seq) < (3 if task == "pose" else 1):
            raise EvalConfigError(f"{seq.name}: {len(seq)} frames are too few for the {task} task")
        h0, w0 = seq.rgb(0).shape[:2]
        try:
            hw = preprocessed_size(w0, h0, resize, target)
            check_frame_size(cfg, *hw)
        except (FrameError, ValueError) as e:
            raise EvalConfigError(f"{seq.name}: {e}") from None
        sizes[seq.name] = hw
    names = [s.name for s in dataset]
    if len(set(names)) != len(names):
        raise EvalConfigError("the dataset's sequence names are not unique")
    return sizes


# --------------------------------------------------------------------------------------- streaming
@functools.lru_cache(maxsize=16)
def _step_fn(cfg: ModelConfig, cache_cfg: CacheConfig) -> Callable:
    """One jitted step per (model, cache) configuration, so repeated evaluations compile once."""
    return make_step(cfg, cache_cfg)


def _device_peak_bytes() -> Optional[int]:
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def stream_sequence(params: dict, cfg: ModelConfig, cache_cfg: CacheConfig,
                    frames: np.ndarray) -> tuple[dict[str, np.ndarray], list[float], dict[str, int]]:
    """Frames [S, H, W, 3] float32 in [0, 1] through the streaming step as `xsvggt reconstruct`
    streams them. Returns (predictions: PREDICTION_KEYS -> float32 [S, ...], latency in seconds per
    frame (device-synchronised; the first includes compilation), `cache_report` of the cache)."""
    s, h, w, _ = frames.shape
    cache = init_cache(cfg, cache_cfg, 1, (h, w), max_frames=s)
    info = cache_report(cfg, cache_cfg, cache)  # fixed shapes: the bytes never change
    outs: dict[str, list] = {k: [] for k in PREDICTION_KEYS}
    latency = []
    for stepped in stream_steps(SingleStream(_step_fn(cfg, cache_cfg), params, cache), frames):
        latency.append(stepped.seconds)
        for k in PREDICTION_KEYS:
            outs[k].append(np.asarray(stepped.out[k][0], np.float32))
    return {k: np.stack(v) for k, v in outs.items()}, latency, info


@functools.lru_cache(maxsize=16)
def _offline_fn(cfg: ModelConfig, causal: bool) -> Callable:
    """The jitted batch forward per (model, mask): jax compiles it once per frames shape."""
    model = StreamVGGT(cfg)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, None, causal, method=StreamVGGT.offline))


def offline_sequence(params: dict, cfg: ModelConfig, causal: bool,
                     frames: np.ndarray) -> tuple[dict[str, np.ndarray], list[float], dict[str, int]]:
    """Frames [S, H, W, 3] through the batch forward as `xsvggt reconstruct --offline` runs them (one
    device). Returns what `stream_sequence` does: (predictions, seconds per frame (the forward's time
    spread evenly, compilation excluded), {"cache_bytes": 0})."""
    x = jax.numpy.asarray(frames)[None]
    compiled = _offline_fn(cfg, causal).lower(params, x).compile()  # compiled once per shape (jax's cache)
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, x))
    per_frame = (time.perf_counter() - t0) / len(frames)
    preds = {k: np.asarray(out[k][0], np.float32) for k in PREDICTION_KEYS}
    return preds, [per_frame] * len(frames), {"cache_bytes": 0}


# ----------------------------------------------------------------------------------- ground truth
@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: identity equality
class GroundTruth:
    """A sequence in the model's pixel grid (`load_ground_truth`): frames [S, H, W, 3]; depth
    [S, H, W] (0 invalid) or None; intrinsics [S, 3, 3] or None; extrinsics [S, 4, 4]
    camera-from-world or None; pose_valid [S]."""

    frames: np.ndarray
    depth: Optional[np.ndarray]
    intrinsics: Optional[np.ndarray]
    extrinsics: Optional[np.ndarray]
    pose_valid: np.ndarray


def load_ground_truth(seq: Sequence, task: str, resize: str, target: int) -> GroundTruth:
    """Frames and the task's ground truth of `seq`, preprocessed to `target` px wide with `resize`."""
    s = len(seq)
    if task == "pose":  # depth is not needed (and may live in another camera, e.g. ScanNet)
        frames = [preprocess_image(seq.pil(i), resize, target, name=f"{seq.name}/{seq.frame_ids[i]}")
                  for i in range(s)]
        depth = intr = None
    else:
        parts = [preprocess_frame(seq, i, resize, target) for i in range(s)]
        frames = [p[0] for p in parts]
        depth = np.stack([p[1] for p in parts])
        intr = None if parts[0][2] is None else np.stack([p[2] for p in parts])
        if task == "video-depth" and _whole_image(seq, resize, target):
            depth = np.stack([seq.depth(i) for i in range(s)])  # scored at the dataset's resolution
    valid = np.ones(s, bool) if seq.pose_valid is None else np.asarray(seq.pose_valid, bool)
    return GroundTruth(np.stack(frames), depth, intr, seq.extrinsics, valid)


def _whole_image(seq: Sequence, resize: str, target: int) -> bool:
    """The model frames are the whole images, only resized (no rows cropped, no padding)."""
    h0, w0 = seq.rgb(0).shape[:2]
    return preprocessed_size(w0, h0, resize, target)[::-1] == resized_size(w0, h0, resize, target)


# ----------------------------------------------------------------------------------------- metrics
def _depth_protocol(dataset_name: str, max_depth: Optional[float]) -> DepthProtocol:
    return DEPTH_PROTOCOLS.get(dataset_name, DepthProtocol(max_depth=max_depth))


def predicted_points(preds: Mapping[str, np.ndarray], points: str = "pointmap") -> np.ndarray:
    """The predicted points [S, H, W, 3] in the first camera's frame: the point map ("pointmap") or the
    depth unprojected with the predicted cameras ("depth"; they put frame 0's camera at the origin)."""
    if points not in POINTS:
        raise ConfigError("points", f"must be one of {', '.join(POINTS)}, got {points!r}")
    if points == "pointmap":
        return preds["pts3d_in_other_view"]
    extr, intr = pose_encoding_to_extri_intri(preds["camera_pose"], preds["depth"].shape[1:3])
    return unproject_depth(preds["depth"], extr, intr)


def pair_errors(preds: Mapping[str, np.ndarray], truth: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    """(rotation, translation) errors in degrees of every pair of the frames with a valid ground-truth
    pose (`eval.pose.pairwise_pose_errors`)."""
    pred_extr, _ = pose_encoding_to_extri_intri(preds["camera_pose"], preds["depth"].shape[1:3])
    keep = truth.pose_valid
    return pairwise_pose_errors(pred_extr[keep], truth.extrinsics[keep])


def pair_metrics(rot_err: np.ndarray, trans_err: np.ndarray) -> dict[str, float]:
    """RRA@30, RTA@30 and AUC@30 of pair errors."""
    return {**pose_accuracy(rot_err, trans_err, 30.0), "auc@30": pose_auc(rot_err, trans_err, 30)}


def score(task: str, preds: Mapping[str, np.ndarray], truth: GroundTruth, protocol: DepthProtocol,
          points: str = "pointmap") -> dict[str, float]:
    """The task's metrics of one sequence (see the module docstring); points: the recon task's
    (`predicted_points`)."""
    if task == "video-depth":
        pred = preds["depth"][..., 0]                                            # [S, H, W]
        if pred.shape != truth.depth.shape:  # ground truth at the dataset's resolution: upstream's bicubic
            pred = resize_depth(pred, truth.depth.shape[1:])
        metrics = evaluate_depth(pred, truth.depth, align="scale", dataset=protocol)
        if metrics["valid_pixels"] == 0:  # as recon's too few valid points: recorded, reported as n/a
            cap = "" if protocol.max_depth is None else f" below the {protocol.max_depth:g} m cap"
            raise EvalInputError(f"no valid ground-truth depth pixel (finite, > 0{cap}) in any frame")
        return metrics
    if task == "recon":
        extr = truth.extrinsics[:, :3]
        gt_world = unproject_depth(truth.depth, extr, truth.intrinsics)          # [S, H, W, 3]
        gt = world_to_camera(gt_world.astype(np.float64), extr[0])               # first camera's frame
        valid = (truth.depth > 0) & np.isfinite(truth.depth)
        h, w = truth.depth.shape[1:]
        crop = CROP_SIZE if min(h, w) >= CROP_SIZE else None  # frames smaller than the protocol's crop: whole
        return reconstruction_metrics(predicted_points(preds, points), gt, valid, crop=crop)
    # pose
    hw = preds["depth"].shape[1:3]
    pred_extr, _ = pose_encoding_to_extri_intri(preds["camera_pose"], hw)         # [S, 3, 4]
    keep = truth.pose_valid
    metrics = trajectory_metrics(extrinsics_to_c2w(pred_extr[keep]), extrinsics_to_c2w(truth.extrinsics[keep]))
    metrics.update(pair_metrics(*pair_errors(preds, truth)))                    # rra@30, rta@30, auc@30
    return metrics


#: Per-sequence entries that are bookkeeping, not metrics (never averaged).
_BOOKKEEPING = ("frames", "cache_bytes", "ms_per_frame")


def _aggregate(task: str, per_seq: list[dict[str, Any]], pairs: Optional[list] = None) -> dict[str, float]:
    """The mean over scored sequences (video-depth: weighted by valid pixels); `pairs` ((rotation,
    translation) errors of each scored sequence): RRA / RTA / AUC over all of them pooled instead."""
    scored = [{k: v for k, v in m.items() if k not in _BOOKKEEPING} for m in per_seq
              if "error" not in m and m.get("valid_pixels", 1) > 0]
    if not scored:
        return {"sequences_scored": 0}
    if task == "video-depth":
        out = average_depth_metrics(scored)
    else:
        keys = [k for k, v in scored[0].items() if isinstance(v, (int, float))]
        out = {k: float(np.mean([m[k] for m in scored])) for k in keys}
    if pairs:
        out.update(pair_metrics(np.concatenate([r for r, _ in pairs]), np.concatenate([t for _, t in pairs])))
    return {**out, "sequences_scored": len(scored)}


# ------------------------------------------------------------------------------------------ driver
def evaluate(params: dict, cfg: ModelConfig, dataset: Dataset, settings: str | Iterable[str | Setting | CacheConfig],
             task: str, *, resize: str = "crop", frame_size: Optional[int] = None,
             progress: Optional[Callable[[Sequence], None]] = None, keep_predictions: bool = False,
             points: str = "pointmap", pose_pairs: str = "sequence") -> EvalResults:
    """Stream every sequence of `dataset` once per setting and score `task` ("recon", "video-depth",
    "pose"; see the module docstring).

    settings: a settings string ("none,xstream:2048,..."), or an iterable of setting strings,
    `Setting`s or `CacheConfig`s (a bare CacheConfig is named by its repr). resize: "crop" | "pad";
    frame_size: width the frames are resized to (default `cfg.img_size`: 518 for the published model).
    progress: called with each sequence after it has been streamed with every setting.
    keep_predictions: keep every setting's predictions in `EvalResults.predictions`. points: the recon
    task's points ("pointmap" or "depth", `predicted_points`); pose_pairs: "sequence" or "pooled" (the
    pose task's RRA / RTA / AUC over all sequences' pairs together): see `settings.PROTOCOLS`.
    Raises EvalConfigError / SettingsError / DataError / FrameError before any model work."""
    target = cfg.img_size if frame_size is None else frame_size
    chosen = as_settings(settings)
    if points not in POINTS or pose_pairs not in ("sequence", "pooled"):
        raise EvalConfigError(f"points must be one of {POINTS} and pose_pairs sequence or pooled, got {points!r}, "
                              f"{pose_pairs!r}")
    sizes = check_evaluation(cfg, dataset, task, resize, target)
    protocol = _depth_protocol(dataset.info.name, dataset.info.max_depth)
    params = jax.device_put(params)  # committed, so every call of a memoised step hits its compile cache
    per_seq: dict[str, dict[str, dict]] = {s.name: {} for s in chosen}
    latency: dict[str, list[float]] = {s.name: [] for s in chosen}
    caches: dict[str, dict[str, int]] = {s.name: {} for s in chosen}
    peaks: dict[str, tuple[int, Optional[int]]] = {}
    kept: dict[str, dict] = {s.name: {} for s in chosen}
    pooled: dict[str, list] = {s.name: [] for s in chosen}
    for seq in dataset:
        truth = load_ground_truth(seq, task, resize, target)
        for setting in chosen:
            if setting.offline:
                preds, lat, info = offline_sequence(params, cfg, setting.offline == "causal", truth.frames)
            else:
                preds, lat, info = stream_sequence(params, cfg, setting.cache, truth.frames)
            try:
                metrics = score(task, preds, truth, protocol, points)
                if task == "pose" and pose_pairs == "pooled":
                    pooled[setting.name].append(pair_errors(preds, truth))
            except EvalInputError as e:  # e.g. too few valid points: recorded, the other sequences go on
                log.warning("%s / %s: %s", setting.name, seq.name, e)
                metrics = {"error": str(e)}
            after_first = lat[1:]  # the first frame may include compilation: a 1-frame sequence has no timing
            per_seq[setting.name][seq.name] = {**metrics, "frames": len(seq), "cache_bytes": info["cache_bytes"],
                                               "ms_per_frame": _median_ms(after_first)}
            latency[setting.name].extend(after_first)
            if info["cache_bytes"] >= caches[setting.name].get("cache_bytes", -1):
                caches[setting.name] = info
            peaks[setting.name] = (peak_rss_bytes(), _device_peak_bytes())
            if keep_predictions:
                kept[setting.name][seq.name] = preds
            log.info("%s / %s: %s", setting.name, seq.name,
                     {k: per_seq[setting.name][seq.name].get(k) for k in TASKS[task].columns})
        if progress is not None:
            progress(seq)
    results = tuple(
        SettingResult(s, per_seq[s.name], _aggregate(task, list(per_seq[s.name].values()), pooled[s.name]),
                      caches[s.name],
                      _median_ms(latency[s.name]), *peaks[s.name])
        for s in chosen)
    return EvalResults(task=task, dataset=dataset.info.name, settings=results, model=cfg.to_dict(), resize=resize,
                       frame_size=target, frame_hw=sizes, frames={s.name: len(s) for s in dataset},
                       predictions=kept if keep_predictions else None,
                       protocol={"points": points, "pose_pairs": pose_pairs})


def _median_ms(seconds: list[float]) -> float:
    """Median latency in ms; NaN (reported as n/a) when no frame was timed after a first one."""
    return 1e3 * float(np.median(seconds)) if seconds else float("nan")


def finite_or_none(value: Any) -> Any:
    """JSON-safe numbers: NaN / inf -> None (recursively through dicts and lists)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


__all__ = ["EvalConfigError", "EvalResults", "GroundTruth", "PREDICTION_KEYS", "SettingResult", "TASKS", "Task",
           "check_evaluation", "evaluate", "finite_or_none", "load_ground_truth", "offline_sequence", "pair_errors",
           "pair_metrics", "predicted_points", "score", "stream_sequence"]
