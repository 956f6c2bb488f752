"""Model configuration: frozen, validated dataclasses, a lossless dict form and named presets.

* `ModelConfig.to_dict()` / `ModelConfig.from_dict()`: every field, JSON-ready, with a format version
  (`CONFIG_FORMAT`). Params directories and the conversion-cache key store this form.
* `ModelConfig.from_spec()` / `to_spec()`: only the adapter for upstream's `spec.json` (the reference
  test model's hyper-parameters, see ../shared/reference/README.md); it describes the architecture
  subset upstream exposes.
* `PRESETS` / `ModelConfig.preset(name)`: the named configurations (`published` = upstream
  `StreamVGGT()` defaults).
* `MODELS` / `ModelConfig.model`: which published model the weights are (StreamVGGT or VGGT-1B: one
  architecture, the same tensor names and shapes, so the user names it); an identity, not an
  architecture field (`IDENTITY_FIELDS`).

Every way of building a configuration (constructor, `replace`, `from_dict`, `from_spec`, presets) runs
the same validation in `__post_init__` and raises `ConfigError` (`xsvggt_jax.errors`, a ValueError)
whose one-sentence message names the offending field, e.g. ``dpt.intermediate_layer_idx[2] is 7, out of
range for depth 4``. `value_from_text` reads a field's value from text by the field's annotation (the
one text parser of configuration values; `cache.core.CacheConfig.from_text` uses it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import re
import types
import typing
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from xsvggt_jax.errors import ConfigError, InputError  # ConfigError: importable from here as before

__all__ = ["AUTO_DTYPE", "CONFIG_FORMAT", "DTYPES", "IDENTITY_FIELDS", "MODELS", "PRECISIONS", "RUNTIME_FIELDS",
           "PRESETS", "ConfigError", "ModelInfo",
           "DinoConfig", "CameraHeadConfig", "DPTConfig", "TrackHeadConfig", "ModelConfig", "check_frame_size",
           "compute_backend", "value_from_text"]

CONFIG_FORMAT = "xsvggt-config/1"
DTYPES: Mapping[str, Any] = MappingProxyType(
    {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16})
# the precision policy: "auto" resolves by the default backend (`compute_backend`): float32 everywhere on
# CPU; on accelerators what upstream StreamVGGT evaluates with, its aggregator (DINOv2 + alternating
# attention) under bfloat16 autocast and every head under `autocast(enabled=False)`, i.e. float32
AUTO_DTYPE = "auto"
PRECISIONS: Mapping[str, jax.lax.Precision] = MappingProxyType(
    {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST})
# fields that choose how the network is computed, not what it is: they do not change the parameters
RUNTIME_FIELDS = ("dtype", "precision")
# fields that name which published model the weights are: they change neither the network nor its parameters
IDENTITY_FIELDS = ("model",)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A published model of this architecture (`MODELS`). trained: the attention across frames it was
    trained with ("causal": frame t sees frames <= t, so streaming is what it learnt; "full": every frame
    sees every frame); offline: what `xsvggt reconstruct` runs by default (None: stream; "full" or
    "causal": that batch forward)."""

    name: str
    title: str
    trained: str
    offline: str | None

    def stream_warning(self) -> str | None:
        """The one line to warn with when this model streams (None: it was trained to)."""
        if self.trained == "causal":
            return None
        return (f"{self.title} was trained with {self.trained} attention across frames, not to stream: streamed, each "
                "frame sees only the frames before it, which it never did in training (run it offline full to use "
                "it as trained)")


MODELS: Mapping[str, ModelInfo] = MappingProxyType({
    "streamvggt": ModelInfo("streamvggt", "StreamVGGT", "causal", None),
    "vggt": ModelInfo("vggt", "VGGT-1B", "full", "full"),
})


def _show(value: Any) -> str:
    """A short JSON-ish rendering of a bad value for error messages."""
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check `value` against the field annotation `hint`; returns it normalised (int -> float for
    float fields, list -> tuple for tuple fields)."""
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {_show(value)}")
        return value
    if hint is int:  # numbers.Integral admits numpy integers; bools are refused
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(name, f"must be an integer, got {_show(value)}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(name, f"must be a number, got {_show(value)}")
        if not math.isfinite(value):
            raise ConfigError(name, f"must be finite, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {_show(value)}")
        return value
    if typing.get_origin(hint) is tuple:  # tuple[int, ...]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"must be a list, got {_show(value)}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(name, f"must be a {hint.__name__}, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config field type {hint!r}")  # pragma: no cover (a programming error)


_TEXT_KINDS = {int: "an integer", float: "a number", bool: "true or false"}


def value_from_text(name: str, hint: Any, text: str) -> Any:
    """The value of config field `name` written as `text`, read by its annotation `hint`: int, float
    (finite), bool (true/false), str, a `Literal[...]` of strings, or `Optional[...]` of those, where
    "none" reads None for a number (an Optional str field takes "none" as the string: leave the field
    out for its default). Raises ConfigError naming the field, e.g. ``budget must be an integer, got
    'abc'``. Values are checked against the annotation only; the dataclass validates the rest."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == len(typing.get_args(hint)) or len(args) != 1:
            raise TypeError(f"unsupported config field type {hint!r}")  # pragma: no cover (a programming error)
        if args[0] is not str and text.strip().lower() == "none":
            return None
        return value_from_text(name, args[0], text)
    text = text.strip()
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if text not in choices:
            raise ConfigError(name, f"must be one of {', '.join(map(str, choices))}, got {text!r}")
        return text
    if hint is str:
        return text
    if hint is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(name, f"must be true or false, got {text!r}")
        return text.lower() == "true"
    if hint in (int, float):
        try:
            value = hint(text) if hint is float or re.fullmatch(r"[+-]?\d+", text) else None
        except ValueError:
            value = None
        if value is None or (hint is float and not math.isfinite(value)):
            raise ConfigError(name, f"must be {_TEXT_KINDS[hint]}, got {text!r}")
        return value
    raise TypeError(f"unsupported config field type {hint!r}")  # pragma: no cover (a programming error)


class _Validated:
    """Base of the config dataclasses: type-check and normalise every field, then `_check` the values.

    `SECTION` is the field name under which a nested config sits in `ModelConfig` (error messages
    name fields as ``section.field``).
    """

    SECTION: ClassVar[str] = ""

    def _name(self, field: str) -> str:
        return f"{self.SECTION}.{field}" if self.SECTION else field

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _coerce(self._name(f.name), _hints(type(self))[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Value constraints beyond the types (overridden)."""

    def _positive(self, *fields: str) -> None:
        for field in fields:
            value = getattr(self, field)
            values = value if isinstance(value, tuple) else (value,)
            for i, v in enumerate(values):
                if v <= 0:
                    name = self._name(field) + (f"[{i}]" if isinstance(value, tuple) else "")
                    raise ConfigError(name, f"must be positive, got {_show(v)}")

    def _divisible(self, field: str, by_field: str) -> None:
        value, divisor = getattr(self, field), getattr(self, by_field)
        if value % divisor:
            raise ConfigError(self._name(field), f"({value}) must be divisible by {self._name(by_field)} ({divisor})")


@dataclasses.dataclass(frozen=True)
class DinoConfig(_Validated):
    """DINOv2 ViT with registers used as the patch embedder (published: ViT-L/14 + 4 registers)."""

    SECTION: ClassVar[str] = "dino"
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6

    def _check(self) -> None:
        self._positive("embed_dim", "depth", "num_heads", "mlp_ratio", "layer_norm_eps")
        self._divisible("embed_dim", "num_heads")


@dataclasses.dataclass(frozen=True)
class CameraHeadConfig(_Validated):
    """Camera head: AdaLN-modulated transformer trunk refined `iterations` times."""

    SECTION: ClassVar[str] = "camera"
    trunk_depth: int = 4
    num_heads: int = 16
    mlp_ratio: float = 4.0
    iterations: int = 4

    def _check(self) -> None:
        self._positive("trunk_depth", "num_heads", "mlp_ratio", "iterations")


@dataclasses.dataclass(frozen=True)
class DPTConfig(_Validated):
    """DPT heads (depth, point map) and the track head's feature extractor share these.

    The DPT head has `STAGES` = 4 resolution stages, each fed by one aggregator layer
    (`intermediate_layer_idx`) projected to `out_channels` channels.
    """

    SECTION: ClassVar[str] = "dpt"
    STAGES: ClassVar[int] = 4
    features: int = 256
    out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23)

    def _check(self) -> None:
        self._positive("features", "out_channels")
        for field in ("out_channels", "intermediate_layer_idx"):
            n = len(getattr(self, field))
            if n != self.STAGES:
                raise ConfigError(self._name(field), f"must list {self.STAGES} entries (one per DPT stage), got {n}")
        for i, idx in enumerate(self.intermediate_layer_idx):
            if idx < 0:
                raise ConfigError(self._name(f"intermediate_layer_idx[{i}]"), f"must be >= 0, got {idx}")


@dataclasses.dataclass(frozen=True)
class TrackHeadConfig(_Validated):
    """Track head: DPT feature extractor (stride 2) + iterative correlation tracker."""

    SECTION: ClassVar[str] = "track"
    features: int = 128
    stride: int = 2
    corr_levels: int = 7
    corr_radius: int = 4
    hidden_size: int = 384
    depth: int = 6
    max_scale: float = 518.0
    iters: int = 4
    num_heads: int = 8
    num_virtual_tracks: int = 64

    def _check(self) -> None:
        self._positive("features", "stride", "corr_levels", "hidden_size", "depth", "max_scale", "iters",
                       "num_heads", "num_virtual_tracks")
        if self.corr_radius < 0:
            raise ConfigError(self._name("corr_radius"), f"must be >= 0, got {self.corr_radius}")
        if self.features % 4:  # the tracker's 2D sin-cos embedding: 3 * features + 4 channels in 4 parts
            raise ConfigError(self._name("features"), f"({self.features}) must be divisible by 4")
        self._divisible("hidden_size", "num_heads")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Validated):
    """Whole-network configuration.

    `img_size` only fixes the DINOv2 position-embedding grid (img_size // patch_size squared); any
    frame whose sides are multiples of `patch_size` is accepted at run time.
    `dtype` is the compute dtype: a `DTYPES` key (the whole network in it) or "auto" (`AUTO_DTYPE`, the
    default): float32 on CPU; on accelerators bfloat16 in the aggregator and float32 in the heads, as
    upstream's autocast. `trunk_jnp_dtype` / `head_jnp_dtype` are the resolved dtypes. `precision` is
    the matmul precision (a `PRECISIONS` key; parity needs float32 + highest). `model` names the published
    model the weights are (a `MODELS` key; `model_info`): the checkpoints cannot tell them apart.
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    rope_freq: float = 100.0
    qk_norm: bool = True
    dino: DinoConfig = DinoConfig()
    camera: CameraHeadConfig = CameraHeadConfig()
    dpt: DPTConfig = DPTConfig()
    track: TrackHeadConfig = TrackHeadConfig()
    model: str = "streamvggt"
    dtype: str = AUTO_DTYPE
    precision: str = "highest"

    def _check(self) -> None:
        for field, registry in (("dtype", (AUTO_DTYPE, *DTYPES)), ("precision", PRECISIONS), ("model", MODELS)):
            if getattr(self, field) not in registry:
                raise ConfigError(field, f"must be one of {sorted(registry)}, got {_show(getattr(self, field))}")
        self._positive("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                       "num_register_tokens", "rope_freq")
        if self.img_size < self.patch_size:
            raise ConfigError("img_size", f"({self.img_size}) must be at least patch_size ({self.patch_size})")
        self._divisible("embed_dim", "num_heads")
        if self.head_dim % 4:
            raise ConfigError("embed_dim", f"/ num_heads = {self.head_dim} must be divisible by 4 (2D RoPE)")
        if self.dino.embed_dim != self.embed_dim:
            raise ConfigError("dino.embed_dim", f"({self.dino.embed_dim}) must equal embed_dim ({self.embed_dim}): "
                              "the aggregator consumes the DINOv2 tokens directly")
        if (2 * self.embed_dim) % self.camera.num_heads:
            raise ConfigError("camera.num_heads", f"({self.camera.num_heads}) must divide the camera trunk width "
                              f"2 * embed_dim ({2 * self.embed_dim})")
        for i, idx in enumerate(self.dpt.intermediate_layer_idx):
            if idx >= self.depth:
                raise ConfigError(f"dpt.intermediate_layer_idx[{i}]", f"is {idx}, out of range for depth {self.depth}")

    # ----------------------------------------------------------------------------------------- derived
    @property
    def model_info(self) -> ModelInfo:
        return MODELS[self.model]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_special_tokens(self) -> int:
        """Camera token + register tokens, placed before the patch tokens of every frame."""
        return 1 + self.num_register_tokens

    @property
    def pos_grid(self) -> int:
        return self.img_size // self.patch_size

    def compute_dtypes(self) -> dict[str, str]:
        """The resolved compute dtypes {"trunk": aggregator and DINOv2, "heads": camera (trunk and
        K/V cache included), DPT and track heads}: `dtype` itself for both unless it is "auto"."""
        if self.dtype != AUTO_DTYPE:
            return {"trunk": self.dtype, "heads": self.dtype}
        if compute_backend() == "cpu":
            return {"trunk": "float32", "heads": "float32"}
        return {"trunk": "bfloat16", "heads": "float32"}

    @property
    def trunk_jnp_dtype(self):
        """The aggregator's (and DINOv2's, and the global K/V cache's) compute dtype."""
        return DTYPES[self.compute_dtypes()["trunk"]]

    @property
    def head_jnp_dtype(self):
        """The heads' compute dtype (and the camera K/V cache's)."""
        return DTYPES[self.compute_dtypes()["heads"]]

    @property
    def jnp_dtype(self):
        """The trunk's compute dtype (`trunk_jnp_dtype`), as attention kernels are chosen for it."""
        return self.trunk_jnp_dtype

    @property
    def jax_precision(self) -> jax.lax.Precision:
        return PRECISIONS[self.precision]

    def tokens_per_frame(self, height: int, width: int) -> int:
        check_frame_size(self, height, width)
        return self.num_special_tokens + (height // self.patch_size) * (width // self.patch_size)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------------------- lossless dict form
    def to_dict(self) -> dict:
        """Every field as plain JSON types (nested sections as objects, tuples as lists), plus
        ``"format": CONFIG_FORMAT``. `from_dict(to_dict())` == self."""
        return {"format": CONFIG_FORMAT, **_to_plain(self)}

    def architecture(self) -> dict:
        """`to_dict()` without the `RUNTIME_FIELDS` and `IDENTITY_FIELDS`: everything that determines the
        parameters."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS + IDENTITY_FIELDS}

    @classmethod
    def from_dict(cls, data: Any) -> "ModelConfig":
        """Inverse of `to_dict`. Keys left out take their defaults; unknown keys, wrong types and
        invalid values raise ConfigError, as does a missing or different ``format``."""
        if not isinstance(data, Mapping):
            raise ConfigError("config", f"must be an object, got {_show(data)}")
        if data.get("format") != CONFIG_FORMAT:
            raise ConfigError("format", f"must be {CONFIG_FORMAT!r} (this version's config format), "
                              f"got {_show(data.get('format'))}")
        return _from_plain(cls, {k: v for k, v in data.items() if k != "format"}, "config")

    # ----------------------------------------------------------------------------------------- presets
    @classmethod
    def published(cls) -> "ModelConfig":
        """Upstream `StreamVGGT()` defaults (the released checkpoint)."""
        return PRESETS["published"]

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """The reference test model's configuration (see `PRESETS`)."""
        return PRESETS["tiny"]

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """The configuration registered as `name` in `PRESETS`."""
        if name not in PRESETS:
            raise ConfigError("preset", f"must be one of {sorted(PRESETS)}, got {_show(name)}")
        return PRESETS[name]

    # ------------------------------------------------------------------------ upstream spec.json adapter
    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | str | Path, **overrides) -> "ModelConfig":
        """Build from upstream's `spec.json` format (a dict or a file path); `overrides` are fields
        of ours (e.g. dtype) applied afterwards. Sections left out take the published values; the
        DINOv2 width defaults to `embed_dim`. Errors name the spec's own keys (``patch_embed.depth``)."""
        if isinstance(spec, (str, os.PathLike)):
            path = Path(spec)
            try:
                spec = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"spec {path}", f"is not a readable JSON file ({e})") from None
        if not isinstance(spec, Mapping):
            raise ConfigError("spec", f"must be a JSON object, got {_show(spec)}")
        plain = {k: v for k, v in _pick(spec, _SPEC_TOP + tuple(_SPEC_SECTIONS), "spec").items() if k in _SPEC_TOP}
        for spec_key, section in _SPEC_SECTIONS.items():
            if spec_key in spec:
                if not isinstance(spec[spec_key], Mapping):
                    raise ConfigError(spec_key, f"must be an object, got {_show(spec[spec_key])}")
                plain[section] = _pick(spec[spec_key], _SPEC_FIELDS[section] + _SPEC_IGNORED.get(spec_key, ()),
                                       spec_key)
                for ignored in _SPEC_IGNORED.get(spec_key, ()):
                    plain[section].pop(ignored, None)
        if "embed_dim" in plain:
            plain.setdefault("dino", {}).setdefault("embed_dim", plain["embed_dim"])
        try:
            cfg = _from_plain(cls, plain, "spec")
        except ConfigError as e:
            field = _SPEC_NAMES.sub(lambda m: _SPEC_KEYS[m.group(1)] + ".", e.field)
            raise ConfigError(field, _SPEC_NAMES.sub(lambda m: _SPEC_KEYS[m.group(1)] + ".", e.problem)) from None
        return cfg.replace(**overrides) if overrides else cfg

    def to_spec(self) -> dict:
        """Upstream's `spec.json` of this architecture (for building the upstream model). Raises
        ConfigError if a field that spec cannot express differs from upstream's fixed value; the
        runtime and identity fields (`RUNTIME_FIELDS`, `IDENTITY_FIELDS`) are not part of a spec."""
        published = PRESETS["published"]
        for name in _unspecified_fields():
            ours, theirs = _get(self, name), _get(published, name)
            if ours != theirs:
                raise ConfigError(name, f"= {_show(ours)} cannot be expressed in upstream's spec.json "
                                  f"(upstream fixes it at {_show(theirs)}); use to_dict()")
        plain = _to_plain(self)
        spec = {k: plain[k] for k in _SPEC_TOP}
        for spec_key, section in _SPEC_SECTIONS.items():
            spec[spec_key] = {k: plain[section][k] for k in _SPEC_FIELDS[section]}
        return spec


# -------------------------------------------------------------------------------- dict conversion
def _to_plain(cfg: Any) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = _to_plain(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _from_plain(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping of its field names (nested sections as mappings)."""
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"must be an object, got {_show(data)}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise ConfigError(where, f"has unknown key(s) {unknown} (known: {names})")
    kwargs = {}
    for name in names:
        if name in data:
            hint = _hints(cls)[name]
            kwargs[name] = _from_plain(hint, data[name], name) if dataclasses.is_dataclass(hint) else data[name]
    return cls(**kwargs)


def _pick(section: Mapping, allowed: tuple[str, ...], where: str) -> dict:
    unknown = sorted(set(section) - set(allowed), key=str)
    if unknown:
        raise ConfigError(where, f"has unknown key(s) {unknown} (known: {list(allowed)})")
    return dict(section)


def _get(cfg: ModelConfig, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# upstream spec.json layout: top-level keys, and our section -> spec section with the keys it carries
_SPEC_TOP = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "num_register_tokens")
_SPEC_SECTIONS = {"patch_embed": "dino", "camera_head": "camera", "dpt": "dpt", "track_head": "track"}
_SPEC_KEYS = {ours: theirs for theirs, ours in _SPEC_SECTIONS.items()}
_SPEC_FIELDS = {
    "dino": ("embed_dim", "depth", "num_heads", "mlp_ratio"),
    "camera": ("trunk_depth", "num_heads"),
    "dpt": tuple(f.name for f in dataclasses.fields(DPTConfig)),
    "track": tuple(f.name for f in dataclasses.fields(TrackHeadConfig)),
}
_SPEC_IGNORED = {"patch_embed": ("tiny",)}  # the reference generator's switch for a small DINOv2: no field of ours
_SPEC_NAMES = re.compile(r"\b(dino|camera|track)\.")


def _unspecified_fields() -> list[str]:
    """Dotted names of the architecture fields upstream's spec.json cannot express."""
    names = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in _SPEC_FIELDS:
            names += [f"{f.name}.{g.name}" for g in dataclasses.fields(_hints(ModelConfig)[f.name])
                      if g.name not in _SPEC_FIELDS[f.name]]
        elif f.name not in _SPEC_TOP and f.name not in RUNTIME_FIELDS + IDENTITY_FIELDS:
            names.append(f.name)
    return names


# ------------------------------------------------------------------------------------------ presets
PRESETS: Mapping[str, ModelConfig] = MappingProxyType({
    # upstream StreamVGGT() defaults: the released checkpoint
    "published": ModelConfig(),
    # between tiny and published: 384 dims, 8 + 8 blocks, head dim 64 (so KCVT quantizes it, as the
    # published global blocks), a 6-block DINOv2 embedder and slim heads (benchmarks)
    "medium": ModelConfig(
        embed_dim=384, depth=8, num_heads=6,
        dino=DinoConfig(embed_dim=384, depth=6, num_heads=6),
        camera=CameraHeadConfig(trunk_depth=2, num_heads=8),
        dpt=DPTConfig(features=64, out_channels=(48, 96, 192, 384), intermediate_layer_idx=(1, 3, 5, 7)),
        track=TrackHeadConfig(features=64, hidden_size=128, depth=2)),
    # the reference test model (../shared/reference/tiny/spec.json): the published structure (head
    # dim 64, every head) at a small size, for demos, benchmarks and tests with random weights
    "tiny": ModelConfig(
        img_size=70, embed_dim=128, depth=4, num_heads=2,
        dino=DinoConfig(embed_dim=128, depth=2, num_heads=2),
        camera=CameraHeadConfig(trunk_depth=2, num_heads=8),
        dpt=DPTConfig(features=32, out_channels=(16, 32, 64, 64), intermediate_layer_idx=(0, 1, 2, 3)),
        track=TrackHeadConfig(features=32, corr_levels=3, corr_radius=2, hidden_size=64, depth=2,
                              max_scale=70.0, iters=2)),
    # the smallest useful model (28x28 frames = 2x2 patches): shape and trace tests
    "micro": ModelConfig(
        img_size=28, embed_dim=32, depth=2, num_heads=2,
        dino=DinoConfig(embed_dim=32, depth=1, num_heads=2),
        camera=CameraHeadConfig(trunk_depth=1, num_heads=2),
        dpt=DPTConfig(features=8, out_channels=(4, 8, 16, 16), intermediate_layer_idx=(0, 1, 1, 1)),
        track=TrackHeadConfig(features=8, corr_levels=2, corr_radius=1, hidden_size=16, depth=1,
                              max_scale=28.0, iters=1, num_heads=2, num_virtual_tracks=4)),
})


def compute_backend() -> str:
    """The backend that resolves dtype "auto": `jax.default_backend()` ("cpu", "gpu", "tpu")."""
    return jax.default_backend()


def check_frame_size(cfg: ModelConfig, height: int, width: int, *, tracks: bool = False) -> None:
    """Frames must be at least one patch and have sides that are multiples of the patch size. With
    `tracks` (query points given, so the track head runs), each side must also keep every level of
    the tracker's correlation pyramid at least one pixel: side // stride >= 2^(corr_levels - 1)."""
    p = cfg.patch_size
    if height < p or width < p or height % p or width % p:
        raise InputError(f"frame size {height}x{width} must be positive multiples of the patch size {p}")
    t = cfg.track
    need = t.stride * 2 ** (t.corr_levels - 1)
    if tracks and min(height, width) < need:
        raise InputError(f"frame size {height}x{width} is too small to track points: the track head's "
                         f"{t.corr_levels}-level correlation pyramid needs both sides >= {need} pixels "
                         f"(stride {t.stride} x 2^{t.corr_levels - 1}); give larger frames or no query points")
