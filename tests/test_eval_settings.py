"""The cache-settings grammar of `xsvggt eval --settings` (no model)."""

from __future__ import annotations

import pytest

from xsvggt_jax.cache import quant
from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.eval.settings import Setting, SettingsError, as_settings, parse_setting, parse_settings
from xsvggt_jax.cache.codec import LAYOUTS
from xsvggt_jax.cache.prune import POLICIES


def test_examples_of_the_issue():
    text = "none, xstream:2048,xstream-int4:2048,sliding:1024,xstream-kcvt8:512"
    got = {s.name: s.cache for s in parse_settings(text)}
    assert got == {
        "none": CacheConfig(prune="none"),
        "xstream:2048": CacheConfig(prune="xstream", budget=2048),
        "xstream-int4:2048": CacheConfig(prune="xstream", budget=2048, quant="kcvt", bits=4),
        "sliding:1024": CacheConfig(prune="sliding", budget=1024),
        "xstream-kcvt8:512": CacheConfig(prune="xstream", budget=512, quant="kcvt", bits=8),
    }
    assert list(got) == ["none", "xstream:2048", "xstream-int4:2048", "sliding:1024", "xstream-kcvt8:512"]


def test_every_registry_combination_parses():
    for policy in POLICIES:
        for layout in LAYOUTS:
            for bits in quant.PACK_BITS:
                budget = "" if policy == "none" else ":96"   # none keeps every token: no budget
                cfg = parse_setting(f"{policy}-{layout}{bits}{budget}").cache
                assert (cfg.prune, cfg.quant, cfg.bits) == (policy, layout, bits)
                assert cfg.budget == (CacheConfig().budget if policy == "none" else 96)
    assert parse_setting("random-int2").cache == CacheConfig(prune="random", quant="kcvt", bits=2)


def test_defaults_fill_the_other_fields():
    cfg = parse_setting("xstream-ktvc4:300", {"pool": 8, "group": 32, "scale_dtype": "float16", "seed": 3}).cache
    assert cfg == CacheConfig(prune="xstream", budget=300, quant="ktvc", bits=4, pool=8, group=32,
                              scale_dtype="float16", seed=3)


def test_a_registered_user_policy_with_a_hyphen(monkeypatch):
    monkeypatch.setitem(POLICIES, "keep-oldest", POLICIES["sliding"])
    assert parse_setting("keep-oldest-int4:128").cache == CacheConfig(prune="keep-oldest", budget=128, quant="kcvt")
    assert parse_setting("keep-oldest").cache.prune == "keep-oldest"


@pytest.mark.parametrize("text, words", [
    ("", "empty"), ("xstream,,sliding", "empty"), ("xstream:", "budget"), ("xstream:0", "budget"),
    ("xstream:2k", "budget"), ("bogus", "does not read as"), ("xstream-int3", "3-bit"),
    ("xstream-kxvx4", "layout 'kxvx'"), ("xstream-kcvt", "does not read as"), ("none,none", "twice"),
    ("xstream-int4:64:64", "budget"),
    ("xstream:4294967296", "budget must be at most 2147483647"), ("xstream-int4:2147483648", "32-bit"),
])
def test_bad_settings_are_one_sentence(text, words):
    with pytest.raises(SettingsError) as e:
        parse_settings(text)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and words in msg and "\n" not in msg


def test_as_settings_takes_strings_settings_and_cache_configs():
    mine = CacheConfig(prune="sliding", budget=77)
    out = as_settings(["none", Setting("short", mine), mine])
    assert [s.name for s in out] == ["none", "short", repr(mine)]
    assert out[1].cache is mine and out[2].cache is mine
    with pytest.raises(SettingsError):
        as_settings([])
    with pytest.raises(SettingsError):
        as_settings([42])


def test_token_counts_are_bounded_by_int32_in_cache_config():
    """Every entry point (eval --settings, reconstruct --cache-size, train --student-cache) builds a
    CacheConfig: the int32 bound is its own check."""
    from xsvggt_jax.errors import ConfigError

    assert CacheConfig(budget=2**31 - 1, camera_budget=2**31 - 1).budget == 2**31 - 1
    for field in ("budget", "pool", "group", "chunk", "camera_budget"):
        with pytest.raises(ConfigError, match=f"{field} must be at most 2147483647"):
            CacheConfig(**{field: 2**31})
    with pytest.raises(ConfigError, match="pool must be at most"):
        CacheConfig.from_text("xstream:64", {"pool": 2**32})


@pytest.mark.parametrize("text", ["none:64", "none-int4:64"])
def test_a_budget_on_the_none_policy_is_refused(text):
    """`none` keeps every token: a budget would be silently ignored (issue 22)."""
    with pytest.raises(SettingsError, match="policy 'none' keeps every token"):
        parse_setting(text)
    assert parse_setting("none").cache.prune == "none"
