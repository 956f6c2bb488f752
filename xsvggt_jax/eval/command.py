"""`xsvggt eval`: evaluate cache settings on a dataset and write results.json, results.md and
accuracy_vs_bytes.png into OUTDIR.

    xsvggt eval [DATA] --dataset 7scenes|nrgbd|tum|tum-dynamics|scannet|bonn|sintel|kitti|procedural
                --task recon|video-depth|pose (--params DIR | --checkpoint FILE [--spec spec.json])
                [--model streamvggt|vggt] [--settings none,xstream:2048,xstream-int4:2048|offline-full,...]
                [--points pointmap|depth] --out OUTDIR [--overwrite]
                [--sequences N] [--frames-per-sequence N] [--resize crop|pad] [--frame-size W] [--dtype D]
                [--quiet]

--model picks the protocol of that model's authors where they differ (`settings.PROTOCOLS`): VGGT runs
`offline-full`, scores recon on depth unprojected with its cameras, pools the pose pairs of every
sequence and draws --frames-per-sequence frames at random (seed --seed); StreamVGGT streams the cache
settings, scores the point map, averages pose metrics over sequences and takes the first N frames.

DATA is not used by `--dataset procedural`, which renders its scenes at the model's frame size; with
procedural data and no weights a small randomly initialised model is used (its numbers are
meaningless: the run checks the pipeline). Every input problem (unknown dataset or task, bad DATA,
bad settings, frames the model cannot take, an existing OUTDIR that xsvggt did not write) is one
`xsvggt: error: ...` line before any model work. OUTDIR is built in a temporary sibling and renamed
when complete; an existing OUTDIR is replaced only if it holds a previous xsvggt result, or with
--overwrite, which replaces only the files named as eval's outputs and keeps the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.errors import ConfigError, InputError
from xsvggt_jax.weights.loading import add_weight_flags, load_model, model_config, with_dtype, with_model

log = logging.getLogger(__name__)

RANDOM_MODEL_NOTE = ("eval: no --checkpoint/--params, so a small RANDOMLY INITIALISED model is used; its metrics "
                     "are meaningless (this run checks the evaluation pipeline, speed and cache bytes)")


def add_parser(sub) -> argparse.ArgumentParser:
    """The `eval` subcommand on the CLI's subparsers."""
    e = sub.add_parser("eval", help="evaluate cache settings on a dataset (accuracy vs cache bytes)")
    e.add_argument("data", nargs="?", help="dataset folder (not used by --dataset procedural)")
    e.add_argument("--dataset", required=True, help="7scenes, nrgbd, tum, tum-dynamics, scannet, bonn, sintel, "
                                                    "kitti or procedural")
    e.add_argument("--task", required=True, help="recon, video-depth or pose")
    e.add_argument("--settings",
                   help="comma-separated cache settings <policy>[-<layout><bits>|-int<bits>][:<budget>], or "
                        "offline-full / offline-causal (the batch forward) (default: the model's protocol: "
                        "none,xstream:2048,xstream-int4:2048 for streamvggt, offline-full for vggt)")
    e.add_argument("--points", choices=("pointmap", "depth"),
                   help="recon: score the point map or the depth unprojected with the predicted cameras (default: "
                        "the model's protocol: pointmap for streamvggt, depth for vggt)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--overwrite", action="store_true",
                   help="write into an existing --out that xsvggt did not write: files with eval's output names "
                        "are replaced, the others are kept")
    e.add_argument("--sequences", type=int, help="evaluate only the first N sequences")
    e.add_argument("--frames-per-sequence", type=int, help="only N frames of each sequence: the first N, or N at "
                                                           "random with --model vggt (procedural: render N frames)")
    e.add_argument("--resize", choices=("crop", "pad"), default="crop", help="frame preprocessing (default crop)")
    e.add_argument("--frame-size", type=int, help="width frames are resized to (default: the model's img_size, "
                                                  "518 for the published model)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    add_weight_flags(e.add_argument_group("weights (procedural data without them: a random tiny model)"),
                     required=False, model=True)
    c = e.add_argument_group("cache options shared by every setting (as `xsvggt reconstruct`)")
    c.add_argument("--pool", type=int, default=16, help="query pooling size of the xstream score")
    c.add_argument("--group", type=int, default=64, help="quantization group size")
    c.add_argument("--scale-dtype", choices=("float32", "float16"), default="float32", help="group scale dtype")
    c.add_argument("--seed", type=int, default=0, help="seed of the random pruning policy (and of random frames)")
    return e


def take_frames(seq, n: int, rng: np.random.RandomState | None = None):
    """n frames of a `data.Sequence` (all of them if it is shorter): the first n, or with `rng` n drawn
    at random without replacement, in the drawn order (VGGT's CO3D evaluation: `rng.choice`)."""
    if n >= len(seq):
        return seq
    idx = np.arange(n) if rng is None else rng.choice(len(seq), n, replace=False)
    cut = lambda a: None if a is None else a[idx]
    load_rgb = seq.load_rgb if rng is None else (lambda i: seq.load_rgb(int(idx[i])))
    load_depth = seq.load_depth if rng is None or seq.load_depth is None else (lambda i: seq.load_depth(int(idx[i])))
    return dataclasses.replace(seq, frame_ids=tuple(seq.frame_ids[i] for i in idx), load_rgb=load_rgb,
                               load_depth=load_depth, intrinsics=cut(seq.intrinsics), extrinsics=cut(seq.extrinsics),
                               depth_intrinsics=cut(seq.depth_intrinsics), pose_valid=cut(seq.pose_valid),
                               timestamps=cut(seq.timestamps))


def _procedural_config(args, cfg, target: int):
    """The eval-small preset rendered at the model's frame size (W = target, H ~ 3/4 W in patches)."""
    from xsvggt_jax.data import PRESETS

    patch = cfg.patch_size
    height = max(patch, round(0.75 * target / patch) * patch)
    frames = args.frames_per_sequence or PRESETS["eval-small"].frames
    return dataclasses.replace(PRESETS["eval-small"], frames=frames, height=height, width=target)


def _model_config(args) -> tuple[ModelConfig, bool]:
    """(ModelConfig, random?) from the weight options, reading no weights."""
    cfg = model_config(args)
    if cfg is not None:
        return cfg, False
    if args.dataset != "procedural":
        raise InputError(f"--params or --checkpoint is required to evaluate on {args.dataset}")
    return with_model(with_dtype(ModelConfig.tiny(), args), args), True


def _dataset(args, cfg, protocol):
    from xsvggt_jax.data import Dataset, load_dataset

    for flag in ("sequences", "frames_per_sequence"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.dataset == "procedural":
        target = args.frame_size or cfg.img_size
        ds = load_dataset("procedural", config=_procedural_config(args, cfg, target),
                          num_sequences=args.sequences or 2)
    else:
        if not args.data:
            raise InputError(f"DATA, the {args.dataset} folder, is required")
        if not Path(args.data).is_dir():
            raise InputError(f"{args.data}: dataset folder not found")
        ds = load_dataset(args.dataset, args.data)
    seqs = ds.sequences[:args.sequences] if args.sequences else ds.sequences
    if args.frames_per_sequence:
        rng = np.random.RandomState(args.seed) if protocol.sampling == "random" else None
        seqs = tuple(take_frames(s, args.frames_per_sequence, rng) for s in seqs)
    return Dataset(info=ds.info, sequences=tuple(seqs))


def run(args) -> Path:
    """Run `xsvggt eval`. Bad inputs raise `xsvggt_jax.errors` errors (the CLI prints one line), every
    one before the weights are read or the model runs."""
    import jax

    from xsvggt_jax.data import DATASETS
    from xsvggt_jax.eval.report import write_report
    from xsvggt_jax.eval.runner import TASKS, check_evaluation, evaluate
    from xsvggt_jax.eval.settings import PROTOCOLS, parse_settings
    from xsvggt_jax.io.outdir import OutputDir
    from xsvggt_jax.nn.model import init_params
    from xsvggt_jax.weights.quant import describe

    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
    if args.task not in TASKS:
        raise ConfigError(f"unknown task {args.task!r}; choose from {', '.join(TASKS)}")
    cfg, random_model = _model_config(args)
    protocol = PROTOCOLS[cfg.model]
    settings = parse_settings(args.settings or protocol.settings, {"pool": args.pool, "group": args.group,
                                                                   "scale_dtype": args.scale_dtype, "seed": args.seed})
    # replaces only what an earlier xsvggt run wrote there; never the user's files or the data
    out = OutputDir(args.out, args.overwrite, protect=[args.data] if args.data else [])
    dataset = _dataset(args, cfg, protocol)
    check_evaluation(cfg, dataset, args.task, args.resize, args.frame_size)
    if cfg.model_info.stream_warning() and any(not s.offline for s in settings):
        log.warning(cfg.model_info.stream_warning())

    note = RANDOM_MODEL_NOTE if random_model else None
    if random_model:
        log.warning(note)
    params, cfg = load_model(args, default=lambda: (init_params(cfg, jax.random.PRNGKey(0)), cfg))
    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(dataset), unit="sequence", dynamic_ncols=True)
    try:
        with out.staged() as tmp:
            tick = None if bar is None else (lambda seq: bar.update(1))
            results = evaluate(params, cfg, dataset, settings, args.task, resize=args.resize,
                               frame_size=args.frame_size, progress=tick, points=args.points or protocol.points,
                               pose_pairs=protocol.pose_pairs)
            write_report(results, tmp, extra={"data": None if args.dataset == "procedural" else str(args.data),
                                               "random_model": random_model, "weights": describe(params)},
                         note=note)
    finally:
        if bar is not None:
            bar.close()
    if note:
        print(note)
    return out.given


__all__ = ["RANDOM_MODEL_NOTE", "add_parser", "run", "take_frames"]
