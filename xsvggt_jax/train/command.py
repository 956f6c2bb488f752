"""`xsvggt train`: turn the parsed flags into a `loop.RunConfig` (every flag checked before any
work) and run it. Bad flags raise `xsvggt_jax.errors` errors (the CLI prints one `xsvggt: error:`
line, exit 2)."""

from __future__ import annotations

import math
from pathlib import Path

import jax

from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.config import ModelConfig, check_frame_size
from xsvggt_jax.data import DATASETS
from xsvggt_jax.errors import ConfigError, InputError, ResourceError
from xsvggt_jax.nn.model import init_params
from xsvggt_jax.train.config import DENSE_ALIGNMENTS, LossConfig
from xsvggt_jax.train.data import DataSource, make_clip_fn
from xsvggt_jax.train.loop import RunConfig, train
from xsvggt_jax.train.rundir import check_out_dir, check_out_path, disk_error_line, normalise_path
from xsvggt_jax.train.state import INT32_MAX, UPSTREAM_FROZEN, OptimConfig
from xsvggt_jax.weights.loading import add_dtype_flag, config_from_name, load_model, model_config, with_dtype


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like HxW, e.g. 28x42, got {text!r}") from None
    return h, w


def _model_config(args) -> ModelConfig:
    """The student's configuration, --init DIR's or --config's, --dtype applied; reads no weights."""
    if args.init != "random":
        if args.config:
            raise ConfigError("--config applies to --init random; a params directory carries its own config")
        return model_config(args, params_dir=args.init)
    if not args.config:
        raise ConfigError("--init random needs --config (a preset or a spec.json)")
    return with_dtype(config_from_name(args.config), args)


def _check_numbers(args) -> None:
    if (args.steps < 1 or args.batch < 1 or args.frames < 1 or args.eval_every < 0 or args.save_every < 0
            or args.eval_scenes < 0):
        raise ConfigError("--steps, --batch and --frames must be >= 1; --eval-every, --save-every, "
                          "--eval-scenes >= 0")
    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup), ("--seed", args.seed)):
        if not 0 <= value <= INT32_MAX:
            raise ConfigError(f"{flag} must be between 0 and {INT32_MAX} (a 32-bit integer), got {value}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")


def _data_source(args, h: int, w: int) -> DataSource:
    if args.data == "procedural":
        return DataSource(batch=args.batch, frames=args.frames, height=h, width=w, seed=args.seed)
    name, sep, root = args.data.partition(":")
    if not sep or name not in DATASETS or not Path(root).is_dir():
        raise InputError(f"--data must be 'procedural' or READER:ROOT with READER in {sorted(DATASETS)} "
                         f"and ROOT a folder, got {args.data!r}")
    return DataSource(dataset=name, root=normalise_path(root), batch=args.batch, frames=args.frames, height=h,
                      width=w, seed=args.seed)


def run_config(args) -> RunConfig:
    """The flags -> RunConfig, every flag checked; reads no weights."""
    if args.teacher_mode and not args.teacher:
        raise ConfigError("--teacher-mode applies to distillation: give --teacher PARAMS too")
    _check_numbers(args)
    cfg = _model_config(args)
    h, w = parse_size(args.size)
    check_frame_size(cfg, h, w)
    source = _data_source(args, h, w)
    cache_cfg = None
    if args.student_cache is not None:
        cache_cfg = CacheConfig.from_text(args.student_cache, where="--student-cache")
    student = "stream" if cache_cfg is not None else args.student
    if student == "stream" and cache_cfg is None:
        raise ConfigError("--student stream needs --student-cache")
    freeze = args.freeze or ("none" if args.init == "random" else "upstream")
    optim = OptimConfig(lr=args.lr, warmup=args.warmup, steps=args.steps,
                        freeze=UPSTREAM_FROZEN if freeze == "upstream" else ())
    align = args.align or ("none" if args.init == "random" else "scale&shift")
    return RunConfig(model=cfg, data=source, optim=optim, loss=LossConfig(dense_alignment=align),
                     student=student, student_cache=cache_cfg,
                     teacher_mode=(args.teacher_mode or "full") if args.teacher else None, remat=args.remat,
                     init=normalise_path(str(args.init)), teacher=normalise_path(args.teacher),
                     eval_every=args.eval_every, save_every=args.save_every, eval_scenes=args.eval_scenes,
                     seed=args.seed)


def run_train_command(args) -> Path:
    """Run `xsvggt train`. Everything is checked (flags, the teacher's configuration, --out, the data)
    before the run writes its first file; then the weights are loaded and the run trains (resuming the
    run in --out)."""
    run = run_config(args)
    out = Path(args.out)
    check_out_path(out)
    if args.teacher:
        teacher_cfg = model_config(args, params_dir=args.teacher)
        if teacher_cfg.to_dict() != run.model.replace(dtype=teacher_cfg.dtype).to_dict():
            raise ConfigError("the teacher's model configuration differs from the student's")
    try:
        check_out_dir(out, run)
        clip_fn = make_clip_fn(run.data)         # reads the dataset's index: a bad --data stops here
        if args.init != "random":
            params, _ = load_model(args, params_dir=args.init)
        else:
            params = init_params(run.model, jax.random.key(args.seed))
        teacher_params = load_model(args, params_dir=args.teacher)[0] if args.teacher else None
        result = train(run, out, params, teacher_params, quiet=args.quiet, clip_fn=clip_fn)
    except Exception as e:  # a full disk / read-only / permission error, which orbax and tensorstore wrap
        msg = disk_error_line(e)
        if msg is None:
            raise
        raise ResourceError(msg) from e
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
    add_dtype_flag(t)
    t.add_argument("--eval-every", type=int, default=0, help="evaluate on held-out scenes every K steps")
    t.add_argument("--eval-scenes", type=int, default=2, help="held-out procedural scenes per evaluation")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (always at the end)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
