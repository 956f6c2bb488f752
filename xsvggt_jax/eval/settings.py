"""Cache settings of an evaluation, written as short strings: `none,xstream:2048,xstream-int4:2048,...`.

Grammar of one setting (whitespace around it is ignored)::

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
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from xsvggt_jax.cache import quant
from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.cache.codec import LAYOUTS
from xsvggt_jax.cache.prune import POLICIES

#: Layout that `int<bits>` stands for (upstream XStreamVGGT's default KV_QUANT_MODE).
DEFAULT_LAYOUT = "kcvt"

_SUFFIX = re.compile(r"^(?P<policy>.+?)-(?P<layout>int|[a-z]+)(?P<bits>\d+)$")


class SettingsError(ValueError):
    """A cache setting string that does not follow the grammar (the message is one sentence)."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One named cache configuration of an evaluation. name: the text the user wrote (stripped)."""

    name: str
    cache: CacheConfig


def _grammar() -> str:
    return (f"<policy>[-<layout><bits>|-int<bits>][:<budget>] with policy in {', '.join(POLICIES)}, "
            f"layout in {', '.join(LAYOUTS)} and bits in {', '.join(map(str, quant.PACK_BITS))}")


def parse_setting(text: str, defaults: Mapping[str, object] | None = None) -> Setting:
    """One setting string -> Setting. `defaults`: CacheConfig fields for everything the string does
    not set (e.g. {"pool": 8, "scale_dtype": "float16"}). Raises SettingsError."""
    name = text.strip()
    if not name:
        raise SettingsError("an empty cache setting (two commas in a row, or a trailing comma?)")
    head, sep, budget_text = name.partition(":")
    fields: dict[str, object] = dict(defaults or {})
    if sep:
        if not re.fullmatch(r"\d+", budget_text) or int(budget_text) < 1:
            raise SettingsError(f"cache setting {name!r}: the budget after ':' must be a positive integer")
        fields["budget"] = int(budget_text)
    policy = head
    if head not in POLICIES:
        m = _SUFFIX.match(head)
        if m is None or m["policy"] not in POLICIES:
            raise SettingsError(f"cache setting {name!r} does not read as {_grammar()}")
        policy, layout, bits = m["policy"], m["layout"], int(m["bits"])
        layout = DEFAULT_LAYOUT if layout == "int" else layout
        if layout not in LAYOUTS:
            raise SettingsError(f"cache setting {name!r}: unknown quantization layout {layout!r} "
                                f"(choose from int, {', '.join(LAYOUTS)})")
        if bits not in quant.PACK_BITS:
            raise SettingsError(f"cache setting {name!r}: {bits}-bit codes are not supported "
                                f"(choose from {', '.join(map(str, quant.PACK_BITS))})")
        fields.update(quant=layout, bits=bits)
    try:
        return Setting(name, CacheConfig(prune=policy, **fields))
    except (TypeError, ValueError) as e:
        raise SettingsError(f"cache setting {name!r}: {e}") from None


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


__all__ = ["DEFAULT_LAYOUT", "Setting", "SettingsError", "as_settings", "parse_setting", "parse_settings"]
