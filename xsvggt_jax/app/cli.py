"""Command line of xsvggt-jax.

    xsvggt demo [--checkpoint FILE] [--out DIR]           procedural scene through the whole pipeline
    xsvggt convert SRC --out DIR [--spec spec.json] [--model vggt] [--weights int8|int4]   upstream checkpoint -> params dir
    xsvggt reconstruct INPUT (--params DIR | --checkpoint FILE) --out OUTDIR [options]
    xsvggt reconstruct-many INPUT... [--manifest FILE] (--params DIR | --checkpoint FILE) --out ROOT [options]
    xsvggt live SOURCE [--out OUTDIR] [options]           camera / stream / video / folder, live (app/live.py)

INPUT is a folder of images, a video file, or an .npz with `images` [S,3,H,W] (and optionally
`query_points` [N,2]).

Input problems (bad files, flags, shapes, values, existing outputs, no disk space or memory, NaN
predictions) end with one line `xsvggt: error: ...` on stderr and exit code 2, checked before any
work where possible; outputs are staged and moved into place when complete, so a failed run leaves
nothing behind. The library raises typed errors (`xsvggt_jax.errors.XsvggtError` and its kinds);
`main` prints each as that line, and lets anything else (a bug) keep its traceback. Weights and
`--dtype` come from `weights/loading.py` (as for eval and train). SIGTERM/SIGHUP clean up like Ctrl-C
and exit with 128 + the signal number. What xsvggt may delete: see `io/outdir.py` and `io/state.py`
(only files it wrote itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.errors import ConfigError, InputError, XsvggtError
from xsvggt_jax.io.fsutil import atomic_savez
from xsvggt_jax.weights.loading import (add_model_flag, add_weight_flags, check_weight_flags, load_model, model_config,
                                        spec_config, with_model)

log = logging.getLogger(__name__)

MAX_MESSAGE = 2000


# ------------------------------------------------------------------------------------------ convert
def _convert(args) -> Path:
    """SRC (an upstream checkpoint, or a float params directory) -> a params directory, its kernels
    quantized once as --weights says (`weights.quant`)."""
    from xsvggt_jax.weights.convert import convert_state_dict
    from xsvggt_jax.weights.torch_reader import read_state_dict
    from xsvggt_jax.weights.params import _check_target, load_params, load_weight_format, save_params
    from xsvggt_jax.weights.quant import WeightFormat, quantize_params

    fmt = args.weights or WeightFormat()
    from_dir = Path(args.src).is_dir()
    if from_dir and args.spec:
        raise ConfigError("--spec describes an upstream checkpoint; a params directory carries its own configuration")
    stored = load_weight_format(args.src) if from_dir else None
    if stored is not None and stored.quantized:
        raise ConfigError(f"{args.src} holds {stored.to_text()} weights already: convert from float weights")
    _check_target(Path(args.out).absolute(), args.overwrite)  # fail fast, before reading SRC
    if from_dir:
        params, cfg = load_params(args.src)
        cfg = with_model(cfg, args)
    else:
        cfg = with_model(spec_config(args.spec), args)  # the model is the user's to name: recorded in DIR
        params = convert_state_dict(read_state_dict(args.src), cfg, source=str(args.src))
    return save_params(quantize_params(params, fmt), args.out, cfg, overwrite=args.overwrite, weights=fmt)


# ------------------------------------------------------------------------------------- reconstruct
def _cache_config(args):
    """The streaming cache flags -> CacheConfig (typed by argparse; ConfigError for a value it refuses)."""
    from xsvggt_jax.cache.core import CacheConfig

    return CacheConfig(prune=args.prune, budget=args.cache_size, pool=args.pool, seed=args.seed,
                       quant=args.quant, bits=args.bits, group=args.group, scale_dtype=args.scale_dtype,
                       protect=args.protect, protect_share=args.protect_share, mass_decay=args.mass_decay,
                       merge_share=args.merge_share, camera_budget=args.camera_budget, camera_quant=args.camera_quant,
                       camera_bits=args.camera_bits, quant_once=args.quant_once)


def _query_points(text: str | None):
    if not text:
        return None
    try:
        pts = np.array([[float(v) for v in p.split(",")] for p in text.replace(";", " ").split()], np.float32)
    except ValueError:
        pts = np.zeros((0, 3))
    if pts.ndim != 2 or pts.shape[1] != 2 or not len(pts) or not np.all(np.isfinite(pts)):
        raise ConfigError(f"--query-points must look like 'x,y x,y ...', got {text!r}")
    return pts


def _export_options(args):
    """The exports' options (see io/outputs.py) from the output flags."""
    from xsvggt_jax.io.outputs import ExportOptions

    return ExportOptions(points=args.points, conf_percentile=args.conf_percentile,
                         ply_max_pixels=args.ply_max_pixels, colmap_max_points=args.colmap_max_points,
                         colmap_binary=args.colmap_binary)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _resolve_mode(args) -> None:
    """--offline from the model (`config.MODELS`, reading no weights) when neither --offline nor --stream
    is given: VGGT runs `--offline full`. Streaming a model trained with full attention: one warning line."""
    from xsvggt_jax.config import MODELS
    from xsvggt_jax.weights.params import ParamsError

    name = getattr(args, "model", None)  # the user's --model, else the model the weights record
    if not name:
        try:
            cfg = model_config(args)
        except ParamsError:  # an unreadable --params: the loader says so, after the flag checks (_validate)
            cfg = None
        name = (cfg or ModelConfig()).model
    info = MODELS[name]
    if not args.offline and not getattr(args, "stream", False) and info.offline:
        args.offline, args.offline_by_model = info.offline, info.title
    if not args.offline and info.stream_warning():
        log.warning(info.stream_warning())


def _validate(args) -> None:
    """Cross-flag checks, before any file is read or written (single flags are checked by argparse)."""
    check_weight_flags(args)
    if args.resume and args.save_state and Path(args.resume).absolute() != Path(args.save_state).absolute():
        raise ConfigError("--resume and --save-state name different directories")
    state = args.resume or args.save_state
    if args.offline and state:
        by_model = getattr(args, "offline_by_model", None)
        hint = f" ({by_model} runs --offline {args.offline} by default: add --stream)" if by_model else ""
        raise ConfigError("--save-state/--resume apply to streaming, not --offline" + hint)
    if not args.offline and (args.devices or args.attention in ("ring", "gather")):
        raise ConfigError("--devices and --attention ring|gather apply to --offline")
    if args.devices and args.devices > 1 and args.query_points:
        raise ConfigError("tracks are not available from the frame-sharded forward: use --devices 1 with "
                          "--query-points")
    if args.keep_state and not state:
        raise ConfigError("--keep-state needs --save-state or --resume")
    if state:
        out, st = Path(args.out).resolve(), Path(state).resolve()
        if _inside(st, out) or _inside(out, st):
            raise ConfigError(f"the state directory {state} and --out {args.out} must not contain each other")
    if args.attention == "packed" and args.offline:
        raise ConfigError("--attention packed reads a quantized streaming cache's codes: not with --offline")
    if not args.offline:
        cache_cfg = _cache_config(args)
        if args.attention == "packed":
            from xsvggt_jax.cache.packed_attend import config_unsupported

            if why := config_unsupported(cache_cfg):
                raise ConfigError(f"--attention packed: {why}")
    _query_points(args.query_points)


def _offline_devices(args, frames: int, qp) -> int:
    """Devices to shard an offline run's frames over: --devices (must divide the frames), else the most
    devices that divide them (1 with query points: the sharded forward has no tracks)."""
    import jax

    if args.devices:
        if args.devices > jax.device_count():
            raise ConfigError(f"--devices {args.devices}: only {jax.device_count()} devices are available")
        if frames % args.devices:
            raise ConfigError(f"{frames} frames do not split evenly over --devices {args.devices}")
        return args.devices
    if qp is not None:
        return 1
    return max(d for d in range(1, jax.device_count() + 1) if frames % d == 0)


def _warn_outside(qp: np.ndarray | None, hw: tuple[int, int]) -> None:
    if qp is None:
        return
    outside = int(np.sum((qp[:, 0] < 0) | (qp[:, 0] > hw[1] - 1) | (qp[:, 1] < 0) | (qp[:, 1] > hw[0] - 1)))
    if outside:
        log.warning("%d of %d query points lie outside the %dx%d (HxW) model input of frame 0; their tracks are "
                    "extrapolated", outside, len(qp), *hw)


def _export_bytes(frames: int, hw: tuple[int, int], queries: int, ply_max_pixels: int) -> int:
    """Rough upper estimate of the exported files (predictions.npz, depth maps, point cloud, COLMAP)."""
    from xsvggt_jax.stream.pipeline import prediction_bytes

    pixels = frames * hw[0] * hw[1]
    cloud = min(pixels, ply_max_pixels)
    return prediction_bytes(frames, hw, queries) + frames * 96 + pixels * (8 + 2) + cloud * (15 + 64) + (1 << 20)


def _reconstruct(args, source=None, note: str | None = None, extra_npz: dict | None = None, model=None) -> Path:
    """Run a reconstruction and write OUTDIR. `source` (a FrameSource) overrides args.input;
    `extra_npz` ({file name: {array name: array}}) adds .npz files to the outputs; `model` (params,
    cfg) overrides --params / --checkpoint."""
    import jax

    from xsvggt_jax.config import check_frame_size
    from xsvggt_jax.io.frames import DEFAULT_TARGET, FrameError
    from xsvggt_jax.io.fsutil import FsError, check_free_space, disk_error_message
    from xsvggt_jax.io.outdir import OutputDir
    from xsvggt_jax.io.scene import write_scene
    from xsvggt_jax.io.sources import open_frames
    from xsvggt_jax.weights.params import ParamsError
    from xsvggt_jax.io.state import StateError, check_state_dir, claim_state_dir, params_digest, release_state_dir
    from xsvggt_jax.stream.offline import run_offline
    from xsvggt_jax.stream.pipeline import CacheMemoryError, NonFiniteError, check_cache_memory, prediction_bytes, stream_frames
    from xsvggt_jax.runtime import peak_rss_bytes
    from xsvggt_jax.weights.quant import describe

    _resolve_mode(args)
    _validate(args)
    inputs = [p for p in (getattr(args, "input", None), args.params, args.checkpoint) if p]
    state_dir = Path(args.resume or args.save_state).absolute() if (args.resume or args.save_state) else None
    try:
        out = OutputDir(args.out, args.overwrite, protect=inputs)
        if state_dir is not None:
            check_state_dir(state_dir, resume=bool(args.resume))
        if source is None:
            source = open_frames(args.input, mode=args.resize, target=args.size or DEFAULT_TARGET, fps=args.fps,
                                 stride=args.stride)
    except (FsError, FrameError, StateError) as e:
        raise InputError(str(e)) from e
    params, cfg = load_model(args, default=None if model is None else (lambda: model))
    params = jax.device_put(params)
    qp = _query_points(args.query_points)
    qp = source.query_points if qp is None else qp
    s, hw, nq = source.num_frames, (source.height, source.width), 0 if qp is None else len(qp)
    try:
        check_frame_size(cfg, *hw, tracks=nq > 0)
    except ValueError as e:
        raise InputError(f"{source.name}: {e}") from e
    _warn_outside(qp, hw)
    devices = _offline_devices(args, s, qp) if args.offline else 1
    cache_cfg = None if args.offline else _cache_config(args)
    try:
        if cache_cfg is not None:
            check_cache_memory(cfg, cache_cfg, hw, s, nq)
        memmaps = 0 if args.offline else prediction_bytes(s, hw, nq)
        check_free_space({out.final: _export_bytes(s, hw, nq, args.ply_max_pixels) + (0 if state_dir else memmaps),
                          **({state_dir: memmaps} if state_dir and not args.resume else {})})
    except (CacheMemoryError, FsError) as e:
        raise InputError(str(e)) from e
    mode = f"offline_{args.offline}" if args.offline else "stream"
    log.info("%s: %s, %d frames of %dx%d, %d queries, backend %s", mode, source.name, s, *hw, nq,
             jax.default_backend())
    if note:
        log.warning(note)
    meta = {"model": cfg.architecture(), "dtype": cfg.dtype, "precision": cfg.precision, "cache": dataclasses.asdict(cache_cfg) if cache_cfg else None, "frames": s,
            "height": hw[0], "width": hw[1], "queries": None if qp is None else np.asarray(qp, np.float32).tolist(),
            "input": source.name}
    try:
        if state_dir is not None:
            claim_state_dir(state_dir, resume=bool(args.resume))
            meta["weights"] = params_digest(params)
        with out.staged() as tmp:
            if args.offline:
                run = run_offline(cfg, params, source, qp, args.offline == "causal", args.attention, devices)
            else:
                run = stream_frames(cfg, cache_cfg, params, source, s, hw, qp, tmp / ".work", state_dir=state_dir,
                                    save_every=args.save_every, resume=bool(args.resume), quiet=args.quiet,
                                    meta=meta, attention=args.attention)
            for name, arrays in (extra_npz or {}).items():
                atomic_savez(tmp / name, **arrays)
            write_scene(tmp, run, source, _export_options(args), cfg, note, weights=describe(params))
            shutil.rmtree(tmp / ".work", ignore_errors=True)
    except (FrameError, StateError, ParamsError, NonFiniteError, FsError) as e:
        _drop_unused_state(state_dir, args)
        raise InputError(str(e)) from e
    except OSError as e:
        msg = disk_error_message(e)
        if msg is None:
            raise
        _drop_unused_state(state_dir, args)
        raise InputError(msg) from e
    except BaseException:
        _drop_unused_state(state_dir, args)
        raise
    if state_dir is not None and not args.keep_state:
        release_state_dir(state_dir)  # the run completed: the checkpoint is spent
    log.info("%.4f s/frame after compile (%.2f s compile), cache %d bytes, peak RSS %d bytes",
             run.seconds_per_frame, run.compile_seconds, run.cache_info["cache_bytes"], peak_rss_bytes())
    return out.given


def _drop_unused_state(state_dir: Path | None, args) -> None:
    """After a failed run: a state directory without a checkpoint holds nothing worth keeping."""
    from xsvggt_jax.io.state import CHECKPOINT, StateError, release_state_dir

    if state_dir is not None and not args.resume and not (state_dir / CHECKPOINT).exists():
        try:
            release_state_dir(state_dir)
        except (StateError, OSError):
            pass


# --------------------------------------------------------------------------------- reconstruct-many
def _reconstruct_many(args) -> Path:
    """Many scenes through pools of --slots streams, or offline in batches of --slots scenes, into
    ROOT/<scene>/ (see `xsvggt_jax.many`)."""
    import jax

    from xsvggt_jax.io.fsutil import FsError
    from xsvggt_jax.many import (ClusterError, SceneListError, SceneOptions, initialize, name_scenes, read_manifest,
                                 run_many)
    from xsvggt_jax.many.run import check_root
    from xsvggt_jax.stream.pipeline import CacheMemoryError

    args.resume, args.save_state, args.keep_state = None, None, False
    args.devices, args.attention = None, "auto"
    _resolve_mode(args)
    _validate(args)
    if args.max_frames_per_device and not args.offline:
        raise ConfigError("--max-frames-per-device applies to --offline")
    root = Path(args.out).absolute()
    try:
        initialize(args.coordinator, args.num_processes, args.process_id, auto=args.auto_cluster)
        inputs = list(args.inputs) + (read_manifest(args.manifest) if args.manifest else [])
        check_root(root, args.overwrite)
        scenes = name_scenes(inputs, root)
    except (ClusterError, SceneListError, FsError) as e:
        raise InputError(str(e)) from e
    if not args.offline and args.slot_compute == "sequential" and len(jax.local_devices()) > 1:
        raise InputError(f"--slot-compute sequential steps the slots on one device, this process has "
                         f"{len(jax.local_devices())}: use batched (or auto)")
    if root.exists() and not root.is_dir():
        raise InputError(f"{root} exists and is not a directory")
    params, cfg = load_model(args)
    cache_cfg = None if args.offline else _cache_config(args)
    protect = [s.path for s in scenes] + [p for p in (args.params, args.checkpoint) if p]
    options = SceneOptions(exports=_export_options(args), resize=args.resize, stride=args.stride,
                           query_points=_query_points(args.query_points), overwrite=args.overwrite, size=args.size,
                           protect=tuple(protect))
    try:
        summary = run_many(scenes, root, cfg, cache_cfg, params, options, slots=args.slots or len(jax.local_devices()),
                           prefetch=args.prefetch, quiet=args.quiet, slot_compute=args.slot_compute,
                           query_pools=args.query_pools, offline=args.offline,
                           frames_per_device=args.max_frames_per_device)
    except (CacheMemoryError, FsError) as e:
        raise InputError(str(e)) from e
    if summary["failed"]:
        raise InputError(f"{summary['failed']} of {len(summary['scenes'])} scenes failed "
                         f"(see {root / 'summary.json'})")
    return root


# --------------------------------------------------------------------------------------------- demo
def _demo(args) -> Path:
    """A procedural scene streamed with compression on, through the shipped demo model (a small model
    trained here on procedural scenes, `xsvggt_jax.pretrained`) unless --checkpoint is given."""
    from xsvggt_jax.data.procedural import make_demo_scene
    from xsvggt_jax.io.frames import FrameSource
    from xsvggt_jax import pretrained

    args.offline, args.params, args.devices, args.attention = None, None, None, "auto"
    hw = (392, 518) if args.checkpoint else tuple(pretrained.card("demo")["frame_size"])
    scene = make_demo_scene(frames=args.frames, height=hw[0], width=hw[1])

    class SceneSource(FrameSource):
        def __iter__(self):
            yield from scene.images

    source = SceneSource("procedural demo scene", len(scene.images), *hw, scene.query_points)
    ground_truth = {"scene_ground_truth.npz": dict(depth=scene.depth, extrinsics=scene.extrinsics,
                                                   intrinsics=scene.intrinsics,
                                                   images=scene.images.transpose(0, 3, 1, 2))}  # as an .npz input
    if args.checkpoint:
        return _reconstruct(args, source=source, extra_npz=ground_truth)
    _validate(args)  # before loading the model (as _reconstruct does before its own)
    note = ("demo: the shipped `demo` model (tiny, trained in this repository on procedural scenes only; "
            "model card: xsvggt_jax/pretrained/demo.md)")
    out = _reconstruct(args, source=source, note=note, extra_npz=ground_truth, model=pretrained.load("demo"))
    print(note)
    return out


# ------------------------------------------------------------------------------------------ parsers
def _typed(convert, check, what: str):
    """An argparse type: `convert` the text, then require `check(value)` (error names `what`)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


POSITIVE_INT = _typed(int, lambda v: v >= 1, "a positive integer")
NON_NEGATIVE_INT = _typed(int, lambda v: v >= 0, "a non-negative integer")
POSITIVE_FLOAT = _typed(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
PERCENTILE = _typed(float, lambda v: 0 <= v <= 100, "a percentile between 0 and 100")
MEMORY_FRACTION = _typed(float, lambda v: 0 < v <= 1, "a fraction of the GPU's memory in (0, 1]")
MODEL_COMMANDS = ("reconstruct", "reconstruct-many", "demo", "eval", "train", "live")  # the commands that run the model


def _add_run_options(r: argparse.ArgumentParser, demo: bool = False, stream_state: bool = True) -> None:
    from xsvggt_jax.cache.core import QUANT_LAYOUTS, SCALE_DTYPES
    from xsvggt_jax.cache.prune import POLICIES, PROTECT
    from xsvggt_jax.cache.quant import PACK_BITS

    w = r.add_argument_group("weights")
    if not demo:
        add_weight_flags(w, model=True)
    else:
        add_weight_flags(w, params=False, required=False,
                         checkpoint_help="upstream StreamVGGT .pth / .safetensors (default: the shipped demo model)")
    w.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache (default: ~/.cache/xsvggt-jax/jax-compile)")
    o = r.add_argument_group("outputs")
    o.add_argument("--overwrite", action="store_true",
                   help="write into an existing OUTDIR that xsvggt did not write (files with xsvggt's output "
                        "names are replaced; nothing else is removed)")
    o.add_argument("--conf-percentile", type=PERCENTILE, default=50.0,
                   help="keep points whose confidence is at least this percentile (0-100; default 50)")
    o.add_argument("--points", choices=("depth", "pointmap"), default="depth",
                   help="point cloud from unprojected depth (default) or from the point map head")
    o.add_argument("--ply-max-pixels", type=POSITIVE_INT, default=20_000_000,
                   help="frames are subsampled so the cloud draws from at most this many pixels")
    o.add_argument("--colmap-max-points", type=POSITIVE_INT, default=100_000,
                   help="at most this many points in the COLMAP model (random subset; default 100000)")
    o.add_argument("--colmap-binary", action="store_true", help="write the COLMAP model as .bin instead of .txt")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--query-points", help="points to track in frame 0: 'x,y x,y ...' (pixels of the model input)")
    g = r.add_argument_group("streaming cache (XStreamVGGT compression)")
    g.add_argument("--prune", choices=tuple(POLICIES), default="xstream" if demo else "none",
                   help="cache pruning policy (reconstruct default none: plain StreamVGGT)")
    g.add_argument("--cache-size", type=POSITIVE_INT, default=512 if demo else 2048,
                   help="tokens kept per attention layer when pruning")
    g.add_argument("--pool", type=POSITIVE_INT, default=16, help="query pooling size of the xstream score")
    g.add_argument("--quant", choices=tuple(QUANT_LAYOUTS), default="kcvt" if demo else "none",
                   help="K/V quantization layout: K per Channel|Token, V per Channel|Token")
    g.add_argument("--bits", type=int, choices=tuple(PACK_BITS), default=4, help="quantization code width")
    g.add_argument("--group", type=POSITIVE_INT, default=64, help="quantization group size")
    g.add_argument("--scale-dtype", choices=tuple(SCALE_DTYPES), default="float32",
                   help="group scales: float32 (bit-exact with upstream) or float16 (smaller cache)")
    g.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed of the random pruning policy")
    g.add_argument("--protect", choices=PROTECT, default="full",
                   help="full: always keep the first and current frame (XStreamVGGT; may exceed the budget); "
                        "budget: keep exactly --cache-size tokens, protecting a share of those frames")
    g.add_argument("--protect-share", type=float, default=0.5,
                   help="--protect budget: share of the budget reserved for the first + current frame")
    g.add_argument("--mass-decay", type=float, default=0.9, help="cumulative policy: attention-mass decay per call")
    g.add_argument("--merge-share", type=float, default=0.5,
                   help="merge policy: share of a frame's tokens merged into their nearest kept key when evicted")
    g.add_argument("--camera-budget", type=POSITIVE_INT,
                   help="tokens kept per camera-trunk layer when pruning (default: --cache-size, as upstream)")
    g.add_argument("--camera-quant", choices=tuple(QUANT_LAYOUTS),
                   help="camera-trunk K/V layout (default: upstream's rule: unquantized at the published size)")
    g.add_argument("--camera-bits", type=int, choices=tuple(PACK_BITS), help="camera-trunk code width (default --bits)")
    g.add_argument("--quant-once", action="store_true",
                   help="quantize each token's K/V once, when it enters the cache (KIVI: per-channel groups wait "
                        "in a float window until full; pruning keeps whole groups); default: upstream's order, "
                        "the whole cache re-quantized every step")
    if not stream_state:
        return
    st = r.add_argument_group("checkpointing the stream")
    st.add_argument("--save-state", help="new or empty directory to checkpoint the stream into every --save-every "
                                         "frames (xsvggt removes only its own files from it)")
    st.add_argument("--save-every", type=POSITIVE_INT, default=50, help="frames between stream checkpoints")
    st.add_argument("--resume", help="continue the stream checkpointed in this directory")
    st.add_argument("--keep-state", action="store_true", help="keep the state directory after a completed run")


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    """--offline causal|full | --stream (default: the model's, `config.MODELS`: VGGT offline full)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--offline", choices=("causal", "full"),
                      help="batch forward over all frames instead of streaming (causal or full attention; default "
                           "full for --model vggt)")
    mode.add_argument("--stream", action="store_true",
                      help="stream even a model that runs offline by default (--model vggt: with a warning)")


class _Parser(argparse.ArgumentParser):
    """argparse with xsvggt's error format: one `xsvggt: error: ...` line, exit code 2."""

    def error(self, message: str):
        where = self.prog.removeprefix("xsvggt").strip()  # the subcommand
        sys.stderr.write(f"xsvggt: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _train(args) -> Path:
    from xsvggt_jax.train.command import run_train_command

    return run_train_command(args)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="xsvggt", description="StreamVGGT in JAX: streaming 4D reconstruction")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="stream a procedural scene through the whole pipeline")
    d.add_argument("--out", default="xsvggt-demo", help="output directory (default ./xsvggt-demo)")
    d.add_argument("--frames", type=POSITIVE_INT, default=24, help="frames of the procedural scene")
    _add_run_options(d, demo=True)

    c = sub.add_parser("convert", help="convert an upstream .pth/.safetensors checkpoint to a params dir")
    c.add_argument("src", help="upstream state_dict (.pth zip format or .safetensors), or a float params directory "
                               "(to write it quantized with --weights)")
    c.add_argument("--out", required=True, help="params directory to write")
    c.add_argument("--spec", help="model spec.json (default: the published StreamVGGT configuration)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    add_model_flag(c)
    from xsvggt_jax.weights.loading import add_weights_flag
    add_weights_flag(c)

    r = sub.add_parser("reconstruct", help="reconstruct from images, a video or an .npz")
    r.add_argument("input", help="folder of images, video file, or .npz with 'images' [S,3,H,W] in [0,1]")
    r.add_argument("--out", required=True, help="output directory")
    _add_mode_flags(r)
    from xsvggt_jax.attention.dispatch import ATTENTION_IMPLS
    r.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto",
                   help="global attention: auto (cudnn on GPU, else blocked/xla), xla (dense), blocked "
                        "(online softmax over key blocks, causal blocks skipped), cudnn, ring/gather (--offline with "
                        "--devices), packed (streaming: a quantized cache attended as its packed codes, without "
                        "dequantizing it; the Pallas kernel on a GPU)")
    r.add_argument("--devices", type=POSITIVE_INT,
                   help="--offline: shard the frames over this many devices (ring attention; default: all "
                        "devices that divide the frame count; 1 with --query-points)")
    r.add_argument("--resize", choices=("crop", "pad"), default="crop", help="preprocessing of images/video")
    from xsvggt_jax.app.live import SIZE, SIZE_HELP, add_parser as add_live_parser  # `xsvggt live`: app/live.py
    r.add_argument("--size", type=SIZE, help=SIZE_HELP + "; default: upstream's 518-px width")
    fr = r.add_mutually_exclusive_group()
    fr.add_argument("--fps", type=POSITIVE_FLOAT, help="sample a video at this frame rate")
    fr.add_argument("--stride", type=POSITIVE_INT, default=1, help="take every STRIDE-th frame")
    _add_run_options(r)

    m = sub.add_parser("reconstruct-many", help="reconstruct many scenes, batched, into ROOT/<scene>/")
    m.add_argument("inputs", nargs="*", metavar="INPUT", help="scenes: folders of images, videos or .npz files")
    m.add_argument("--manifest", help="file listing more inputs, one per line (relative to the file's folder)")
    m.add_argument("--out", required=True, help="ROOT: each scene goes to ROOT/<scene>/, the summary to "
                                                 "ROOT/summary.json")
    m.add_argument("--resize", choices=("crop", "pad"), default="crop", help="preprocessing of images/video")
    m.add_argument("--size", type=SIZE, help=SIZE_HELP + "; default: upstream's 518-px width")
    m.add_argument("--stride", type=POSITIVE_INT, default=1, help="take every STRIDE-th frame")
    m.add_argument("--slots", type=POSITIVE_INT,
                   help="streams stepped together, or scenes a forward with --offline (default: the number of local "
                        "devices)")
    _add_mode_flags(m)
    m.add_argument("--max-frames-per-device", type=POSITIVE_INT, metavar="N",
                   help="--offline: a scene with more frames runs alone, its frames split over the local devices "
                        "(ring attention; default: when its batch does not fit a device's memory)")
    m.add_argument("--prefetch", type=NON_NEGATIVE_INT, default=4,
                   help="frames decoded ahead per scene by reader threads (0: decode in the main loop)")
    from xsvggt_jax.stream.pool import SLOT_COMPUTE
    m.add_argument("--slot-compute", choices=("auto", *SLOT_COMPUTE), default="auto",
                   help="how a pool steps its slots: batched (one vmapped program; GPU/TPU, meshes), sequential "
                        "(the single-scene step per slot, one device: bit-identical to `reconstruct`), auto "
                        "(sequential on one CPU device, else batched)")
    from xsvggt_jax.many.driver import QUERY_POOLS
    m.add_argument("--query-pools", choices=QUERY_POOLS, default="auto",
                   help="scenes with different numbers of query points: shared (one pool per frame size, points "
                        "padded and masked; last-bit differences in vis/track_conf), split (a pool per point "
                        "count), auto (split with sequential slots, shared with batched ones)")
    cl = m.add_argument_group("many machines (jax.distributed)")
    cl.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
    cl.add_argument("--num-processes", type=POSITIVE_INT, help="processes in the run")
    cl.add_argument("--process-id", type=NON_NEGATIVE_INT, help="this process's index")
    cl.add_argument("--auto-cluster", action="store_true",
                    help="let JAX detect the cluster (SLURM, Open MPI, TPU pods, ...)")
    _add_run_options(m, stream_state=False)

    v = sub.add_parser("view", help="serve an interactive 3D view of an OUTDIR in the browser (viser)")
    v.add_argument("outdir", help="output directory written by `xsvggt reconstruct` or `xsvggt demo`")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                                                       "0.0.0.0 or :: every interface, with a warning)")
    v.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080; busy: the next free one)")
    v.add_argument("--max-points", type=int, default=300_000, help="draw at most this many points (default 300000)")
    v.add_argument("--conf-percentile", type=float,
                   help="draw predictions.npz's depth points above this confidence percentile, with a slider "
                        "(default: points.ply as written)")
    from xsvggt_jax.eval.command import add_parser as add_eval_parser  # `xsvggt eval`: xsvggt_jax/eval/command.py
    add_eval_parser(sub)
    from xsvggt_jax.train.command import add_parser as add_train_parser  # `xsvggt train`: xsvggt_jax/train/command.py
    add_train_parser(sub)
    add_live_parser(sub, _add_run_options)
    for name in MODEL_COMMANDS:
        sub.choices[name].add_argument(
            "--memory-fraction", type=MEMORY_FRACTION, metavar="F",
            help="preallocate this share of the GPU's memory at start, as JAX does by default (0.75); default: "
                 "allocate on demand, unless XLA_PYTHON_CLIENT_PREALLOCATE / XLA_CLIENT_MEM_FRACTION / "
                 "XLA_PYTHON_CLIENT_ALLOCATOR are set")
    return p


def _view(args) -> Path:
    """Serve `xsvggt view` until Ctrl-C / SIGTERM."""
    from xsvggt_jax.app.view import serve

    serve(args.outdir, args.host, args.port, args.max_points, args.conf_percentile,
          announce=lambda msg: print(msg, file=sys.stderr, flush=True))
    return Path(args.outdir)


def _eval(args) -> Path:
    from xsvggt_jax.eval.command import run
    return run(args)


def _live(args):
    from xsvggt_jax.app.live import run_live

    check_weight_flags(args)
    return run_live(args, _cache_config(args), _export_options(args), _query_points(args.query_points),
                    announce=lambda msg: print(msg, file=sys.stderr, flush=True))


def _fail(message: str, code: int = 2) -> None:
    msg = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if len(msg) > MAX_MESSAGE:  # e.g. a wrong --spec: every parameter is listed
        log.info("full error: %s", message)
        msg = msg[:MAX_MESSAGE] + f" ... ({len(msg) - MAX_MESSAGE} more characters; -v shows all)"
    sys.stderr.write(f"xsvggt: error: {msg}\n")
    raise SystemExit(code) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `xsvggt` console script. Returns 0; input errors raise SystemExit(2), SIGTERM /
    SIGHUP SystemExit(128 + signal) after the same cleanup as Ctrl-C (KeyboardInterrupt)."""
    from xsvggt_jax.runtime import (MemoryConfigError, Terminated, configure_compile_cache, configure_device_memory,
                                    signals_as_interrupt)

    args = _parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    try:  # before anything starts JAX's backend (parsing and imports do not)
        configure_device_memory(getattr(args, "memory_fraction", None))
    except MemoryConfigError as e:
        _fail(f"--memory-fraction: {e}")
    if args.command in MODEL_COMMANDS:
        configure_compile_cache(not getattr(args, "no_compile_cache", False))
    try:
        with signals_as_interrupt():
            out = {"convert": _convert, "reconstruct": _reconstruct, "reconstruct-many": _reconstruct_many,
                   "demo": _demo, "view": _view, "eval": _eval, "train": _train, "live": _live}[args.command](args)
    except XsvggtError as e:  # the library's typed errors (xsvggt_jax.errors): one line, exit 2
        _fail(str(e))
    except Terminated as e:
        done = {"train": "checkpoints already saved are kept: re-run the same command to resume",
                "view": "the viewer stopped (it writes nothing)"}.get(args.command, "partial outputs were removed")
        _fail(f"stopped by {e}; {done}", 128 + e.signum)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
