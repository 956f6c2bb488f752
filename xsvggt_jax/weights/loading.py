"""Flags -> (params, model config): the one loader of `xsvggt reconstruct`, `reconstruct-many`, `demo`,
`eval` and `train`, and the one `--dtype` flag and override (here, below eval/ and train/, so that
every command can use it).

* `add_weight_flags(group)`: --params | --checkpoint, --spec, --cache-dir, --dtype (`add_dtype_flag`),
  --weights (`add_weights_flag`) and with `model=True` --model (`add_model_flag`: which published model
  the weights are, `config.MODELS`).
* `model_config(args)`: the configuration those flags name, reading no weights (checks before loading).
* `load_model(args)`: (params, config): a params directory (--params, or train's --init DIR), else an
  upstream checkpoint (--checkpoint [--spec], converted once and cached under --cache-dir), else the
  caller's `default` (the demo model, eval's random tiny model, train's random init).
* Both apply --dtype (`with_dtype`), the compute dtype (default "auto": float32 on CPU; on accelerators
  bfloat16 aggregator + float32 heads, upstream's autocast); parameters keep theirs. And --model
  (`with_model`): a --checkpoint is StreamVGGT unless --model says otherwise; a params directory is the
  model it records (`xsvggt convert --model`), unless --model says otherwise.
* `load_model` applies --weights (`weights.quant.WeightFormat`, text FORMAT[:GROUP]): float weights are
  quantized once, in memory, to int8 / int4 code nodes (a params directory written by `xsvggt convert
  --weights` already holds them: it loads as stored). Left out: the weights as stored. A quantized
  directory cannot be re-quantized (another format, or float): ConfigError, before any array is read.
  A command without the flag (train) refuses quantized weights (ParamsError).

Errors are typed (`xsvggt_jax.errors`): ParamsError / CheckpointError / ConversionError from the
weights, ConfigError for a bad --spec or --config, InputError when no weights are named.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, Optional

from xsvggt_jax.config import AUTO_DTYPE, DTYPES, MODELS, ModelConfig
from xsvggt_jax.errors import ConfigError, InputError

log = logging.getLogger(__name__)

__all__ = ["DTYPE_CHOICES", "DTYPE_HELP", "MODEL_HELP", "WEIGHTS_HELP", "add_dtype_flag", "add_model_flag",
           "add_weights_flag", "add_weight_flags", "check_weight_flags", "config_from_name", "load_model",
           "model_config", "spec_config", "weight_format", "with_dtype", "with_model"]

DTYPE_CHOICES = (AUTO_DTYPE, *DTYPES)
DTYPE_HELP = ("compute dtype (default auto: float32 on CPU; on GPU/TPU bfloat16 in the aggregator and float32 in "
              "the heads, as upstream's autocast; float32 / bfloat16 / float16: the whole network; parameters "
              "keep their dtype)")


WEIGHTS_HELP = ("weight-only quantization, FORMAT[:GROUP]: float, int8 (one scale per output channel), int4 (groups "
                "of 64 input rows), e.g. int4:128 or int8:channel; kernels stored packed on the device and decoded "
                "inside the step (heads' last layers stay float). Default: the weights as stored (a params "
                "directory written by `xsvggt convert --weights` is quantized already)")


def weight_format(text: str):
    """argparse type of --weights: a `WeightFormat` (ArgumentTypeError naming the problem)."""
    from xsvggt_jax.weights.quant import WeightFormat

    try:
        return WeightFormat.from_text(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.problem or str(e)) from None


def add_weights_flag(group) -> None:
    """The --weights flag (a `WeightFormat`; default None: as stored) on a parser or argument group."""
    group.add_argument("--weights", type=weight_format, metavar="FORMAT[:GROUP]", help=WEIGHTS_HELP)


def add_dtype_flag(group) -> None:
    """The --dtype flag (choices: "auto" and `config.DTYPES`, default "auto") on a parser or argument group."""
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default=AUTO_DTYPE, help=DTYPE_HELP)


MODEL_HELP = ("which published model the weights are (their tensors cannot tell): streamvggt (default for a "
              "--checkpoint) or vggt (VGGT-1B, VGGT-1B-Commercial: trained with full attention, runs --offline full by "
              "default); a --params directory records the one it was converted as")


def add_model_flag(group) -> None:
    """The --model flag (choices: `config.MODELS`; default: what the weights record, see `with_model`)."""
    group.add_argument("--model", choices=tuple(MODELS), help=MODEL_HELP)


def add_weight_flags(group, *, params: bool = True, required: bool = True, model: bool = False,
                     checkpoint_help: str = "upstream StreamVGGT / VGGT .pth / .pt / .safetensors (converted on the "
                                            "fly)") -> None:
    """--params | --checkpoint (one of them `required`; no --params with `params=False`), --spec,
    --cache-dir, --dtype and --weights, on an argument group; --model too with `model`."""
    src = group.add_mutually_exclusive_group(required=required) if params else group
    if params:
        src.add_argument("--params", help="params directory written by `xsvggt convert`")
    src.add_argument("--checkpoint", help=checkpoint_help)
    group.add_argument("--spec", help="spec.json of a non-published configuration (with --checkpoint)")
    group.add_argument("--cache-dir", help="where converted checkpoints are cached (default ~/.cache/xsvggt-jax)")
    add_dtype_flag(group)
    if model:
        add_model_flag(group)
    add_weights_flag(group)


def check_weight_flags(args: argparse.Namespace) -> None:
    """Cross-flag checks of the weight flags (argparse checks each one); ConfigError."""
    spec = getattr(args, "spec", None)
    if spec and getattr(args, "params", None):
        raise ConfigError("--spec describes a --checkpoint; a --params directory carries its own configuration")
    if spec and not getattr(args, "checkpoint", None):
        raise ConfigError("--spec needs --checkpoint")


def with_dtype(cfg: ModelConfig, args: argparse.Namespace) -> ModelConfig:
    """`cfg` with the --dtype override (unchanged without one): the one place it is applied."""
    dtype = getattr(args, "dtype", None)
    return cfg.replace(dtype=dtype) if dtype and dtype != cfg.dtype else cfg


def with_model(cfg: ModelConfig, args: argparse.Namespace) -> ModelConfig:
    """`cfg` labelled with the --model the user named (unchanged without one): the one place it is applied.
    The checkpoints of the models have the same tensors, so the name is the user's to give; a params
    directory recorded as another model is run as the one named (logged)."""
    name = getattr(args, "model", None)
    if not name or name == cfg.model:
        return cfg
    if getattr(args, "params", None):
        log.info("%s records the %s model; running it as %s (--model)", args.params, cfg.model, name)
    return cfg.replace(model=name)


def spec_config(spec: Optional[str]) -> ModelConfig:
    """The configuration of a --checkpoint: its --spec (upstream's spec.json), else the published one."""
    if not spec:
        return ModelConfig.published()
    try:
        return ModelConfig.from_spec(spec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"bad spec {spec}: {e}") from e


def config_from_name(name: str) -> ModelConfig:
    """train's --config: a preset name (`config.PRESETS`) or a spec.json."""
    if name.endswith(".json"):
        return spec_config(name)
    return ModelConfig.preset(name)


def _params_dir(args: argparse.Namespace, params_dir: Optional[str]) -> Optional[str]:
    return params_dir or getattr(args, "params", None)


def _check_stored(args: argparse.Namespace, directory: str) -> ModelConfig:
    """The weight format a params directory stores against --weights; its config (cheap: config.json only)."""
    from xsvggt_jax.weights.params import ParamsError, load_stored

    cfg, stored = load_stored(directory)
    if not stored.quantized:
        return cfg
    if not hasattr(args, "weights"):
        raise ParamsError(f"{directory} holds {stored.to_text()} weights; this command needs float weights "
                          "(a params directory written without --weights)")
    want = args.weights
    if want is not None and (want.format, want.group) != (stored.format, stored.group):
        raise ConfigError(f"--weights {want.to_text()}: {directory} holds {stored.to_text()} weights, which are not "
                          f"quantized again; leave --weights out (or give {stored.to_text()}), or start from float "
                          "weights")
    return cfg


def _apply_weights(params: Any, args: argparse.Namespace) -> Any:
    """--weights applied to loaded parameters: float ones quantized (placed like them); else as they are."""
    import jax

    from xsvggt_jax.weights.quant import describe, is_quantized, quantize_params

    want = getattr(args, "weights", None)
    if want is not None and want.quantized and not is_quantized(params):
        first = jax.tree.leaves(params)[0]
        like = first.sharding if getattr(first, "committed", False) else None
        params = jax.device_put(quantize_params(params, want), like)
        info = describe(params)
        log.info("weights quantized to %s: %d bytes (float32: %d)", want.to_text(), info["bytes"],
                 info["float32_bytes"])
    return params


def model_config(args: argparse.Namespace, *, params_dir: Optional[str] = None) -> Optional[ModelConfig]:
    """The configuration the weight flags name, --dtype applied, reading no weights: the params directory
    `params_dir` (default --params; its weight format checked against --weights), else --checkpoint's
    (--spec or published); None when neither is given. --model applied (`with_model`)."""
    check_weight_flags(args)
    directory = _params_dir(args, params_dir)
    if directory:
        return with_model(with_dtype(_check_stored(args, directory), args), args)
    if getattr(args, "checkpoint", None):
        return with_model(with_dtype(spec_config(getattr(args, "spec", None)), args), args)
    return None


def load_model(args: argparse.Namespace, *, params_dir: Optional[str] = None,
               default: Optional[Callable[[], tuple[Any, ModelConfig]]] = None) -> tuple[Any, ModelConfig]:
    """(params, config) from the weight flags, --dtype and --weights applied: the params directory
    `params_dir` (default --params), else --checkpoint [--spec] (converted on the first use, then read
    from the conversion cache under --cache-dir), else `default()` -> (params, config). InputError when
    none applies. --model applied (`with_model`)."""
    from xsvggt_jax.weights.cached import params_from_checkpoint
    from xsvggt_jax.weights.params import load_params

    check_weight_flags(args)
    directory, checkpoint = _params_dir(args, params_dir), getattr(args, "checkpoint", None)
    if directory:
        _check_stored(args, directory)
        params, cfg = load_params(directory)
    elif checkpoint:
        cache_dir = getattr(args, "cache_dir", None)
        params, cfg = params_from_checkpoint(checkpoint, spec_config(getattr(args, "spec", None)),
                                             Path(cache_dir) if cache_dir else None)
    elif default is not None:
        params, cfg = default()
    else:
        raise InputError("no weights given: use --params DIR or --checkpoint FILE")
    return _apply_weights(params, args), with_model(with_dtype(cfg, args), args)
