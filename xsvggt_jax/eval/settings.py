"""Cache settings of an evaluation, written as short strings: `none,xstream:2048,xstream-int4:2048,...`.

Grammar of one setting (whitespace around it is ignored), the short form that
`xsvggt_jax.cache.core.CacheConfig.from_text` (the one parser of cache settings) reads::

    <policy>[-<layout><bits>|-int<bits>][:<budget>]

* policy: a key of `xsvggt_jax.cache.prune.POLICIES` ("none", "xstream", "sliding", "random", or a policy the
  user registered there; a registered name may itself contain "-");
* layout: a key of `xsvggt_jax.cache.codec.LAYOUTS` ("kcvt", "ktvt", "kcvc", "ktvc"), bits one of
  `xsvggt_jax.cache.quant.PACK_BITS`; `int<bits>` is upstream's default layout `kcvt`. No suffix: an
  unquantized cache;
* budget: tokens kept per attention layer (`CacheConfig.budget`; default the CacheConfig default).

Every `CacheConfig` field the suffix does not set (pool, group, scale_dtype, seed, ...) comes from the
`defaults` passed to `parse_settings`, so any configuration `xsvggt reconstruct` accepts can be written.
Examples: `none` (plain StreamVGGT), `xstream:2048`, `xstream-int4:2048` (= `xstream-kcvt4:2048`),
`sliding:1024`, `xstream-kcvt8:512`, `none-ktvt2` (full cache, 2-bit codes).

Two settings are not caches: `offline-full` and `offline-causal` run each sequence through the batch
forward (every frame at once, full or frame-causal attention; no cache), as `reconstruct --offline`.

`PROTOCOLS`: how each model's authors evaluate it, where that differs (`config.MODELS` names):

* StreamVGGT (and XStreamVGGT): streamed, cache settings `none,xstream:2048,xstream-int4:2048`; the
  recon task scores the point head's map (`pts3d_in_other_view`); pose metrics per sequence, averaged;
  `--frames-per-sequence N` takes the first N frames.
* VGGT: `offline-full`; recon scores depth unprojected with the predicted cameras (its paper and code
  find these more accurate than its point head); RRA / RTA / AUC@30 over the pairs of every sequence
  pooled (its CO3D evaluation: errors of all pairs of a category, then the AUC); N random frames a
  sequence (`numpy.random.RandomState(--seed)`, drawn in sequence order, kept in the drawn order: its
  CO3D evaluation draws 10 with `np.random.seed(0)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Optional

from xsvggt_jax.cache.core import DEFAULT_LAYOUT, CacheConfig  # DEFAULT_LAYOUT: importable from here as before
from xsvggt_jax.errors import ConfigError


class SettingsError(ConfigError):
    """A cache setting string that does not follow the grammar (the message is one sentence)."""


OFFLINE_SETTINGS = {"offline-full": "full", "offline-causal": "causal"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One named cache configuration of an evaluation. name: the text the user wrote (stripped);
    offline: "full" or "causal" for an `OFFLINE_SETTINGS` setting (then no cache: `cache` None)."""

    name: str
    cache: Optional[CacheConfig]
    offline: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a model is evaluated where its authors' evaluations differ (module docstring). settings: the
    default settings string; points: the recon task's points, "pointmap" (`pts3d_in_other_view`) or
    "depth" (depth unprojected with the predicted cameras); pose_pairs: "sequence" (pose metrics per
    sequence, then the mean) or "pooled" (RRA / RTA / AUC over every sequence's pairs together);
    sampling: which N frames `--frames-per-sequence N` keeps, "first" or "random"."""

    settings: str
    points: str
    pose_pairs: str
    sampling: str


POINTS = ("pointmap", "depth")
PROTOCOLS: Mapping[str, Protocol] = MappingProxyType({
    "streamvggt": Protocol("none,xstream:2048,xstream-int4:2048", "pointmap", "sequence", "first"),
    "vggt": Protocol("offline-full", "depth", "pooled", "random"),
})


def parse_setting(text: str, defaults: Mapping[str, object] | None = None) -> Setting:
    """One setting string -> Setting (`CacheConfig.from_text`, which reads the grammar). `defaults`:
    CacheConfig fields for everything the string does not set (e.g. {"pool": 8, "scale_dtype":
    "float16"}). Raises SettingsError."""
    name = text.strip()
    if not name:
        raise SettingsError("an empty cache setting (two commas in a row, or a trailing comma?)")
    if name in OFFLINE_SETTINGS:
        return Setting(name, None, OFFLINE_SETTINGS[name])
    try:
        return Setting(name, CacheConfig.from_text(name, defaults))
    except ConfigError as e:
        raise SettingsError(str(e)) from None


def parse_settings(text: str | Iterable[str], defaults: Mapping[str, object] | None = None) -> tuple[Setting, ...]:
    """A comma-separated string (or an iterable of setting strings) -> Settings in order. Raises
    SettingsError for a malformed or repeated setting, or for none at all."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return _distinct(tuple(parse_setting(t, defaults) for t in items))


def as_settings(settings: str | Iterable[str | Setting | CacheConfig]) -> tuple[Setting, ...]:
    """What `evaluate` accepts -> Settings: a settings string, or an iterable mixing setting strings,
    `Setting`s and `CacheConfig`s (a bare CacheConfig is named by its repr; wrap it in a Setting to
    give it a short name). Raises SettingsError."""
    if isinstance(settings, str):
        return parse_settings(settings)
    out = []
    for item in settings:
        if isinstance(item, Setting):
            out.append(item)
        elif isinstance(item, CacheConfig):
            out.append(Setting(repr(item), item))
        elif isinstance(item, str):
            out.append(parse_setting(item))
        else:
            raise SettingsError(f"a cache setting must be a string, a Setting or a CacheConfig, got {item!r}")
    return _distinct(tuple(out))


def _distinct(settings: tuple[Setting, ...]) -> tuple[Setting, ...]:
    if not settings:
        raise SettingsError("no cache settings given")
    names = [s.name for s in settings]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SettingsError(f"cache setting {repeated[0]!r} is given twice")
    return settings


__all__ = ["DEFAULT_LAYOUT", "OFFLINE_SETTINGS", "POINTS", "PROTOCOLS", "Protocol", "Setting", "SettingsError",
           "as_settings", "parse_setting", "parse_settings"]
