"""`reconstruct-many` end to end: this process's share of the scenes, resume, the pools, the summary.

ROOT/summary.json is an xsvggt output like a scene's files: it replaces only a summary xsvggt wrote
(its "producer"), and a file of the same name that xsvggt did not write is refused before any work
(`check_root`; replaced with --overwrite, as OUTDIR's files are).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.config import ModelConfig, check_frame_size
from xsvggt_jax.io.frames import DEFAULT_TARGET
from xsvggt_jax.io.fsutil import PRODUCER, FsError, atomic_write_json, check_writable, write_error
from xsvggt_jax.io.sources import open_frames
from xsvggt_jax.io.outdir import OutputDir
from xsvggt_jax.io.outputs import ExportOptions
from xsvggt_jax.many import hosts
from xsvggt_jax.many.driver import Stats, group_pools, resolve_modes, run_scenes
from xsvggt_jax.many.offline import run_offline_scenes
from xsvggt_jax.many.scenes import (SUMMARY, Job, Scene, completed_report, input_fingerprint, pool_key,
                                    process_share, recorded_identity, summary_entry)
from xsvggt_jax.stream.loop import Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class SceneOptions:
    """How `run_many` opens each scene and writes it. resize / stride: the frames' preprocessing
    (`io.frames.open_frames`); query_points: [N, 2] pixels tracked in every scene instead of its own
    (None: each scene's own); overwrite / protect: each ROOT/<scene>'s `io.outdir.OutputDir` (protect:
    paths its outputs must not touch: the inputs, the weights); exports: what is written; size: a fixed
    (H, W) frame size (`reconstruct --size`; None: upstream's 518-px width)."""
    exports: ExportOptions = dataclasses.field(default_factory=ExportOptions)
    resize: str = "crop"
    stride: int = 1
    query_points: Optional[np.ndarray] = None
    overwrite: bool = False
    protect: tuple = ()
    size: Optional[tuple[int, int]] = None


def check_root(root: Path, overwrite: bool = False) -> None:
    """Refuse ROOT before any work (FsError): a file in its place, a read-only file system or no write
    permission, or a summary.json that xsvggt did not write (unless `overwrite`)."""
    if root.exists() and not root.is_dir():
        raise FsError(f"{root} exists and is not a directory")
    check_writable(root)
    check_summary(root, overwrite)


def check_summary(root: Path, overwrite: bool = False) -> None:
    """FsError unless ROOT/summary.json may be written: absent, a summary xsvggt wrote, or (with
    `overwrite`) any file; never a directory."""
    path = root / SUMMARY
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        raise FsError(f"{path} is a directory where xsvggt writes its summary; move it away")
    if overwrite or _our_summary(path):
        return
    raise FsError(f"{path} already exists and was not written by xsvggt (use --overwrite to replace it, or "
                  "move it away)")


def _our_summary(path: Path) -> bool:
    if path.is_symlink():
        return False
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("producer") == PRODUCER


def _unchanged(scene: Scene, report: dict) -> bool:
    """Whether a finished scene's report records this very input, unchanged since."""
    recorded = recorded_identity(report)
    if recorded is None or recorded.get("input") != str(scene.path):
        return False
    try:
        return recorded.get("fingerprint") == input_fingerprint(scene.path)
    except FsError:
        return False


def plan(scenes: Sequence[Scene], root: Path, cfg: ModelConfig,
         options: SceneOptions) -> tuple[list[Job], list[dict]]:
    """Jobs to run and summary entries of the scenes that are not run: complete from an earlier run
    of the same, unchanged input ("skipped") or unusable ("failed": unreadable input, wrong frame size,
    an output directory in the way: the ValueError subclasses `open_frames`, `check_frame_size` and
    `OutputDir` raise). A job's scene carries its input's fingerprint."""
    jobs, entries = [], []
    for scene in scenes:
        out_dir = root / scene.name
        report = completed_report(out_dir)
        if report is not None and _unchanged(scene, report) and (
                options.size is None or [report.get("height"), report.get("width")] == list(options.size)):
            entries.append(summary_entry(scene, "skipped", report.get("frames"), report.get("total_seconds"),
                                         report.get("cache_bytes")))
            log.info("%s: complete from an earlier run, skipped", scene.name)
            continue
        if report is not None:
            log.info("%s: its input changed since the earlier run (or is not recorded): run again", scene.name)
        try:
            source = open_frames(scene.path, mode=options.resize, target=options.size or DEFAULT_TARGET,
                                 stride=options.stride)
            if options.query_points is not None:
                source.query_points = options.query_points
            height, width, points = pool_key(source)
            check_frame_size(cfg, height, width, tracks=points > 0)
            scene = dataclasses.replace(scene, fingerprint=input_fingerprint(scene.path))
            jobs.append(Job(scene, source, OutputDir(out_dir, options.overwrite, protect=options.protect)))
        except ValueError as e:
            entries.append(summary_entry(scene, "failed", error=str(e)))
            log.warning("%s: failed: %s", scene.name, e)
    return jobs, entries


def check_pool_memory(cfg: ModelConfig, cache_cfg: CacheConfig, jobs: Sequence[Job], slots: int,
                      query_pools: str = "split") -> None:
    """Raise `pipeline.CacheMemoryError` when a pool's caches (slots x one scene's, sized for the pool's
    longest scene) would not fit the device's available memory; before any scene runs. query_pools:
    "split" or "shared" (`driver.group_pools`)."""
    from xsvggt_jax.stream.pipeline import CacheMemoryError, cache_memory_bytes
    from xsvggt_jax.runtime import device_available_bytes

    available = device_available_bytes()
    for (h, w, nq), group in group_pools(jobs, query_pools).items():
        need = min(slots, len(group)) * cache_memory_bytes(
            cfg, cache_cfg, (h, w), max(j.source.num_frames for j in group), nq)
        if available is not None and need > available:
            raise CacheMemoryError(f"a pool of {min(slots, len(group))} streams of {h}x{w} needs {need} bytes of "
                                   f"cache, {available} are available: use fewer --slots or prune the cache")


def stats_entry(stats: Stats, process_id: int, slots: int, prefetch: int) -> dict:
    return {"process": process_id, "slots": slots, "prefetch": prefetch, "steps": stats.steps,
            "frames": stats.frames, "pools": stats.pools, "total_seconds": stats.total_s,
            "frame_wait_seconds": stats.frame_wait_s, "writer_wait_seconds": stats.writer_wait_s,
            "device_idle_fraction": stats.device_idle_fraction}


def run_many(scenes: Sequence[Scene], root: Path, cfg: ModelConfig, cache_cfg: Optional[CacheConfig], params: dict,
             options: SceneOptions, *, slots: int = 1, prefetch: int = 4, quiet: bool = True,
             slot_compute: str = "auto", query_pools: str = "auto", offline: Optional[str] = None,
             frames_per_device: Optional[int] = None) -> dict:
    """Run this process's share of `scenes` (all of them in a single-process run) into ROOT/<scene>/
    (opened and written as `options` says; each scene's report.json records its input,
    `scenes.IDENTITY`) and write ROOT/summary.json (process 0, after every process finished;
    `check_summary`, FsError on a foreign one unless `options.overwrite`, or when it cannot be
    written). Returns the summary on
    every process (all read the partial summaries after the barrier): {"scenes": [entry...] sorted
    by name (see `scenes.summary_entry`), "failed": int, "processes": [loop statistics...],
    "device_idle_fraction": frame-wait time / loop time over all processes}. Raises
    `pipeline.CacheMemoryError` before any scene runs when a pool's caches do not fit. slot_compute:
    how a pool steps its slots, query_pools: whether scenes with different numbers of query points
    share a pool (both as `driver.run_scenes`). offline: "full" or "causal" runs every scene through
    that batch forward instead of streaming it (`many.offline.run_offline_scenes`: `slots` scenes a
    forward, scenes with more than `frames_per_device` frames sequence parallel; no cache: `cache_cfg`
    None)."""
    import jax

    n, i = jax.process_count(), jax.process_index()
    check_root(root, options.overwrite)
    _writing(root.mkdir, parents=True, exist_ok=True)
    mine = process_share(scenes, n, i)
    log.info("process %d of %d: %d of %d scenes", i, n, len(mine), len(scenes))
    jobs, entries = plan(mine, root, cfg, options)
    if not offline:
        check_pool_memory(cfg, cache_cfg, jobs, slots, resolve_modes(slot_compute, query_pools, jax.local_devices())[2])
    progress = Progress(sum(job.source.num_frames for job in jobs), quiet)
    try:
        if offline:
            results, stats = run_offline_scenes(cfg, params, jobs, options.exports, causal=offline == "causal",
                                                slots=slots, prefetch=prefetch, frames_per_device=frames_per_device,
                                                progress=progress)
        else:
            results, stats = run_scenes(cfg, cache_cfg, params, jobs, options.exports, slots=slots, prefetch=prefetch,
                                        progress=progress, slot_compute=slot_compute, query_pools=query_pools)
    finally:
        progress.close()
    part = {"scenes": entries + results, "processes": [stats_entry(stats, i, slots, prefetch)]}
    if n == 1:
        return _write_summary(root, part["scenes"], part["processes"], options.overwrite)
    _writing(atomic_write_json, hosts.partial_path(root, i), part)
    hosts.barrier("xsvggt-reconstruct-many-partials")  # every partial summary is written
    merged = [hosts.read_partial(root, k) for k in range(n)]
    entries, processes = [e for p in merged for e in p["scenes"]], [s for p in merged for s in p["processes"]]
    summary, error = _summary(entries, processes), None
    if i == 0:
        try:
            _write_summary(root, entries, processes, options.overwrite)
        except FsError as e:  # raised after the barrier: the other processes must not wait for process 0
            error = e
    hosts.barrier("xsvggt-reconstruct-many-summary")  # every process has read them
    if i == 0:
        hosts.remove_partials(root, n)
    if error is not None:
        raise error
    return summary


def _summary(entries: list[dict], processes: list[dict]) -> dict:
    total = sum(p["total_seconds"] for p in processes)
    return {"producer": PRODUCER, "scenes": sorted(entries, key=lambda e: e["scene"]),
            "failed": sum(e["status"] == "failed" for e in entries), "processes": processes,
            "device_idle_fraction": sum(p["frame_wait_seconds"] for p in processes) / total if total else 0.0}


def _write_summary(root: Path, entries: list[dict], processes: list[dict], overwrite: bool) -> dict:
    summary = _summary(entries, processes)
    check_summary(root, overwrite)  # again: a file may have appeared during the run
    _writing(atomic_write_json, root / SUMMARY, summary)
    return summary


def _writing(write: Callable, *args, **kwargs):
    """write(*args, **kwargs), an OSError the user can fix (read-only, full disk, ...) as FsError."""
    try:
        return write(*args, **kwargs)
    except OSError as e:
        if (err := write_error(e)) is None:
            raise
        raise err from e
