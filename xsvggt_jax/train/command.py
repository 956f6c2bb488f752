"""`xsvggt train`: turn the parsed flags into a `loop.RunConfig` (every flag checked before any
work) and run it. Bad flags raise the CLI's UsageError (one `xsvggt: error:` line, exit 2)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax

from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.config import ModelConfig, check_frame_size
from xsvggt_jax.data import DATASETS
from xsvggt_jax.data.base import DataError
from xsvggt_jax.weights.params import ParamsError, load_params
from xsvggt_jax.nn.model import init_params
from xsvggt_jax.train.config import DENSE_ALIGNMENTS, LossConfig, LossConfigError
from xsvggt_jax.train.data import DataSource, make_clip_fn
from xsvggt_jax.train.loop import RunConfig, TrainingDiverged, train
from xsvggt_jax.train.rundir import RunError, check_out_dir, check_out_path, disk_error_line, normalise_path
from xsvggt_jax.train.state import INT32_MAX, UPSTREAM_FROZEN, CheckpointError, OptimConfig, TrainConfigError

_CACHE_INTS = {"budget", "pool", "seed", "bits", "group", "chunk", "quant_head_dim", "camera_budget", "camera_bits"}
_CACHE_FLOATS = {"protect_share", "mass_decay"}
_CACHE_OPTIONAL = {"quant_head_dim", "camera_budget", "camera_quant", "camera_bits"}   # "none": None


def parse_cache(text: str) -> CacheConfig:
    """'prune=xstream,budget=64,quant=kcvt' -> CacheConfig (ValueError, one line, on a bad key or value)."""
    fields = {f.name for f in dataclasses.fields(CacheConfig)}
    kw = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--student-cache: expected KEY=VALUE,... with KEY in {sorted(fields)}, got {item!r} "
                             f"in {text!r}")
        if key in _CACHE_OPTIONAL and value == "none":
            kw[key] = None
            continue
        try:
            kw[key] = int(value) if key in _CACHE_INTS else float(value) if key in _CACHE_FLOATS else value
        except ValueError:
            kind = "an integer" if key in _CACHE_INTS else "a number"
            raise ValueError(f"--student-cache: {key} must be {kind}, got {value!r}") from None
    try:
        return CacheConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--student-cache {text!r}: {e}") from None


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like HxW, e.g. 28x42, got {text!r}") from None
    return h, w


def _model_config(args) -> tuple[ModelConfig, dict | None]:
    """(config, initial params or None for random init)."""
    if args.init != "random":
        if args.config:
            raise ValueError("--config applies to --init random; a params directory carries its own config")
        params, cfg = load_params(args.init)
        return cfg, params
    if not args.config:
        raise ValueError("--init random needs --config (a preset or a spec.json)")
    if args.config.endswith(".json"):
        return ModelConfig.from_spec(args.config), None
    return ModelConfig.preset(args.config), None


def _check_numbers(args) -> None:
    if (args.steps < 1 or args.batch < 1 or args.frames < 1 or args.eval_every < 0 or args.save_every < 0
            or args.eval_scenes < 0):
        raise ValueError("--steps, --batch and --frames must be >= 1; --eval-every, --save-every, "
                         "--eval-scenes >= 0")
    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup), ("--seed", args.seed)):
        if not 0 <= value <= INT32_MAX:
            raise ValueError(f"{flag} must be between 0 and {INT32_MAX} (a 32-bit integer), got {value}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ValueError(f"--lr must be a positive number, got {args.lr}")


def _data_source(args, h: int, w: int) -> DataSource:
    if args.data == "procedural":
        return DataSource(batch=args.batch, frames=args.frames, height=h, width=w, seed=args.seed)
    name, sep, root = args.data.partition(":")
    if not sep or name not in DATASETS or not Path(root).is_dir():
        raise ValueError(f"--data must be 'procedural' or READER:ROOT with READER in {sorted(DATASETS)} "
                         f"and ROOT a folder, got {args.data!r}")
    return DataSource(dataset=name, root=normalise_path(root), batch=args.batch, frames=args.frames, height=h,
                      width=w, seed=args.seed)


def run_train_command(args, usage_error: type[Exception]) -> Path:
    """Everything is checked (flags, --out, the data, the weights) before the run writes its first file."""
    try:
        if args.teacher_mode and not args.teacher:
            raise ValueError("--teacher-mode applies to distillation: give --teacher PARAMS too")
        _check_numbers(args)
        out = Path(args.out)
        check_out_path(out)
        cfg, params = _model_config(args)
        if args.dtype:
            cfg = dataclasses.replace(cfg, dtype=args.dtype)
        h, w = parse_size(args.size)
        check_frame_size(cfg, h, w)
        source = _data_source(args, h, w)
        cache_cfg = parse_cache(args.student_cache) if args.student_cache is not None else None
        student = "stream" if cache_cfg is not None else args.student
        if student == "stream" and cache_cfg is None:
            raise ValueError("--student stream needs --student-cache")
        freeze = args.freeze or ("none" if args.init == "random" else "upstream")
        optim = OptimConfig(lr=args.lr, warmup=args.warmup, steps=args.steps,
                            freeze=UPSTREAM_FROZEN if freeze == "upstream" else ())
        align = args.align or ("none" if args.init == "random" else "scale&shift")
        run = RunConfig(model=cfg, data=source, optim=optim, loss=LossConfig(dense_alignment=align),
                        student=student, student_cache=cache_cfg,
                        teacher_mode=(args.teacher_mode or "full") if args.teacher else None, remat=args.remat,
                        init=normalise_path(str(args.init)), teacher=normalise_path(args.teacher),
                        eval_every=args.eval_every, save_every=args.save_every, eval_scenes=args.eval_scenes,
                        seed=args.seed)
        check_out_dir(out, run)
        clip_fn = make_clip_fn(source)         # reads the dataset's index: a bad --data stops here
        teacher_params = None
        if args.teacher:
            teacher_params, teacher_cfg = load_params(args.teacher)
            if teacher_cfg.to_dict() != dataclasses.replace(cfg, dtype=teacher_cfg.dtype).to_dict():
                raise ValueError("the teacher's model configuration differs from the student's")
        if params is None:
            params = init_params(cfg, jax.random.key(args.seed))
        result = train(run, out, params, teacher_params, quiet=args.quiet, clip_fn=clip_fn)
    except Exception as e:
        # first: a full disk / read-only / permission error, which orbax and tensorstore wrap in their own
        # (ValueError) types
        msg = disk_error_line(e)
        if msg is not None:
            raise usage_error(msg) from e
        if isinstance(e, (ValueError, ParamsError, DataError, RunError, TrainConfigError, LossConfigError,
                          CheckpointError, TrainingDiverged)):
            raise usage_error(str(e)) from e
        raise
    return Path(result["params"])


def add_parser(sub) -> None:
    """The `xsvggt train` subcommand's arguments."""
    t = sub.add_parser("train", help="train or distill a model (supervised on procedural scenes / a dataset)")
    t.add_argument("--config", help="model preset (tiny, micro, medium, published) or spec.json (--init random)")
    t.add_argument("--init", default="random", help="'random' or a params directory to start from")
    t.add_argument("--data", default="procedural", help="'procedural' or READER:ROOT (e.g. scannet:/data/scannet)")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--frames", type=int, default=2)
    t.add_argument("--size", default="28x42", help="frame size HxW (multiples of the patch size)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--out", required=True, help="run directory (re-run with the same --out to resume)")
    t.add_argument("--teacher", help="teacher params directory (distillation)")
    t.add_argument("--teacher-mode", choices=("full", "causal", "stream"),
                   help="the teacher's forward (with --teacher; default full)")
    t.add_argument("--student", choices=("causal", "full", "stream"), default="causal")
    t.add_argument("--student-cache", help="streaming student's cache: KEY=VALUE,... of CacheConfig "
                                           "(e.g. prune=xstream,budget=64,quant=kcvt); implies --student stream")
    t.add_argument("--freeze", choices=("upstream", "none"),
                   help="frozen parameters (default: upstream's with --init PARAMS, none with random init)")
    t.add_argument("--align", choices=DENSE_ALIGNMENTS,
                   help="dense-map alignment in the loss (default: none with random init, upstream's "
                        "scale&shift with --init PARAMS; see train.config.DENSE_ALIGNMENTS)")
    t.add_argument("--remat", action="store_true", help="rematerialise transformer blocks (less memory)")
    t.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (params stay float32)")
    t.add_argument("--eval-every", type=int, default=0, help="evaluate on held-out scenes every K steps")
    t.add_argument("--eval-scenes", type=int, default=2, help="held-out procedural scenes per evaluation")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (always at the end)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
