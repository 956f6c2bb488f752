"""ModelConfig: lossless dict form, validation with one-sentence errors, presets, the spec adapter,
and the package's public names."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, run_error
from xsvggt_jax.config import (CONFIG_FORMAT, DTYPES, MODELS, PRECISIONS, PRESETS, ConfigError, DPTConfig,
                               ModelConfig)

ROOT = Path(__file__).resolve().parents[1]
# fields that only validate when changed together (the aggregator consumes DINOv2 tokens directly)
COUPLED = {"embed_dim": "dino.embed_dim", "dino.embed_dim": "embed_dim"}


def leaf_fields(cls=ModelConfig, prefix=""):
    """Dotted names of every scalar / tuple field of the config tree (derived from the dataclasses)."""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default):
            yield from leaf_fields(type(f.default), prefix + f.name + ".")
        else:
            yield prefix + f.name


def get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def put(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d[part]
    d[last] = value


def candidates(value):
    """Other values of the same type, most likely valid first."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value * 2, value + 4, value + 1, value - 1, value // 2]
    if isinstance(value, float):
        return [value * 2, value / 2]
    if isinstance(value, str):
        return [v for v in [*DTYPES, *PRECISIONS, *MODELS] if v != value]
    if isinstance(value, list):
        return [value[:i] + [v] + value[i + 1:] for i in reversed(range(len(value))) for v in candidates(value[i])]
    raise AssertionError(f"no perturbation for {value!r}")


def perturbed(base: dict, name: str) -> dict:
    """A valid copy of `base` (a to_dict) with field `name` (and what it is coupled to) changed."""
    for value in candidates(get(base, name)):
        d = json.loads(json.dumps(base))
        put(d, name, value)
        if name in COUPLED:
            put(d, COUPLED[name], value)
        try:
            ModelConfig.from_dict(d)
            return d
        except ConfigError:
            continue
    raise AssertionError(f"no valid perturbation of {name}: add one to this test")


# --------------------------------------------------------------------------------- lossless dict form
@pytest.mark.parametrize("preset", ["published", "micro"])
def test_every_field_survives_to_dict_json_from_dict(preset):
    base_cfg = ModelConfig.preset(preset)
    base = base_cfg.to_dict()
    names = list(leaf_fields())
    assert {"rope_freq", "qk_norm", "dino.layer_norm_eps", "camera.mlp_ratio", "camera.iterations"} <= set(names)
    for name in names:
        d = perturbed(base, name)
        cfg = ModelConfig.from_dict(d)
        assert cfg != base_cfg, name
        back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg, name
        assert get(back.to_dict(), name) == get(d, name), name


def test_to_dict_is_plain_json_with_format():
    d = ModelConfig.published().to_dict()
    assert d["format"] == CONFIG_FORMAT
    assert json.loads(json.dumps(d)) == d
    assert d["dpt"]["intermediate_layer_idx"] == [4, 11, 17, 23]


@pytest.mark.parametrize("change, field", [
    (lambda d: d.__setitem__("bogus", 1), "config has unknown key(s) ['bogus']"),
    (lambda d: d["camera"].__setitem__("heads", 8), "camera has unknown key(s) ['heads']"),
    (lambda d: d.pop("format"), "format must be"),
    (lambda d: d.__setitem__("format", "xsvggt-config/0"), "format must be"),
    (lambda d: d.__setitem__("depth", "24"), "depth must be an integer, got '24'"),
    (lambda d: d.__setitem__("depth", 24.0), "depth must be an integer, got 24.0"),
    (lambda d: d.__setitem__("num_heads", True), "num_heads must be an integer, got True"),
    (lambda d: d.__setitem__("qk_norm", 1), "qk_norm must be true or false, got 1"),
    (lambda d: d.__setitem__("rope_freq", "x"), "rope_freq must be a number, got 'x'"),
    (lambda d: d.__setitem__("dtype", "int8"), "dtype must be one of ['auto', 'bfloat16', 'float16', 'float32']"),
    (lambda d: d.__setitem__("precision", "max"), "precision must be one of"),
    (lambda d: d.__setitem__("model", "vggt2"), "model must be one of ['streamvggt', 'vggt'], got 'vggt2'"),
    (lambda d: d.__setitem__("dino", [1, 2]), "dino must be an object, got [1, 2]"),
    (lambda d: d.__setitem__("track", None), "track must be an object, got null"),
    (lambda d: d["dpt"].__setitem__("out_channels", 256), "dpt.out_channels must be a list, got 256"),
    (lambda d: d["dpt"].__setitem__("out_channels", [256, "x", 1, 1]), r"dpt.out_channels\[1\] must be an integer"),
])
def test_from_dict_rejects_naming_the_field(change, field):
    d = ModelConfig.published().to_dict()
    change(d)
    with pytest.raises(ConfigError, match=re.escape(field) if "\\" not in field else field):
        ModelConfig.from_dict(d)


def test_from_dict_rejects_non_objects():
    for bad in ([], None, "x", 3):
        with pytest.raises(ConfigError, match="config must be an object"):
            ModelConfig.from_dict(bad)


def test_keys_left_out_take_defaults():
    assert ModelConfig.from_dict({"format": CONFIG_FORMAT, "camera": {}}) == ModelConfig.published()


def test_constructor_and_replace_validate_too():
    with pytest.raises(ConfigError, match=r"^patch_size must be positive, got 0$"):
        ModelConfig(patch_size=0)
    with pytest.raises(ConfigError, match=r"dpt.intermediate_layer_idx must list 4 entries"):
        DPTConfig(intermediate_layer_idx=(1, 2))
    with pytest.raises(ConfigError, match="dino must be a DinoConfig"):
        ModelConfig.tiny().replace(dino={"depth": 2})
    assert isinstance(ConfigError("x", "y"), ValueError)


# ------------------------------------------------------------------------------------ spec adapter
def test_reference_spec_is_the_tiny_preset():
    assert ModelConfig.from_spec(require(TINY / "spec.json")) == ModelConfig.tiny()


def require(path: Path) -> Path:
    from conftest import require_reference
    return require_reference(path)


def test_to_spec_round_trips_and_refuses_what_upstream_cannot_express():
    for name, cfg in PRESETS.items():
        assert ModelConfig.from_spec(json.loads(json.dumps(cfg.to_spec()))) == cfg, name
    for field, change in [("rope_freq", dict(rope_freq=10.0)), ("qk_norm", dict(qk_norm=False)),
                          ("camera.iterations", dict(camera=dataclasses.replace(ModelConfig().camera, iterations=2)))]:
        with pytest.raises(ConfigError, match=f"^{re.escape(field)} = .* cannot be expressed in upstream's spec.json"):
            ModelConfig.published().replace(**change).to_spec()


def tiny_spec() -> dict:
    return json.loads(require(TINY / "spec.json").read_text())


def set_key(path: str, value):
    def change(spec):
        *parents, last = path.split(".")
        d = spec
        for p in parents:
            d = d[p]
        d[last] = value
    return change


MALFORMED_SPECS = [
    (set_key("patch_embed", []), "patch_embed must be an object, got []"),
    (set_key("camera_head", None), "camera_head must be an object, got null"),
    (set_key("patch_size", 0), "patch_size must be positive, got 0"),
    (set_key("depth", -2), "depth must be positive, got -2"),
    (set_key("dpt.features", 0), "dpt.features must be positive, got 0"),
    (set_key("track_head.hidden_size", -64), "track_head.hidden_size must be positive, got -64"),
    (set_key("num_heads", 3), "embed_dim (128) must be divisible by num_heads (3)"),
    (set_key("patch_embed.num_heads", 3), "patch_embed.embed_dim (128) must be divisible by patch_embed.num_heads (3)"),
    (set_key("camera_head.num_heads", 3), "camera_head.num_heads (3) must divide the camera trunk width"),
    (set_key("dpt.intermediate_layer_idx", [0, 1, 2]), "dpt.intermediate_layer_idx must list 4 entries (one per DPT stage), got 3"),
    (set_key("dpt.intermediate_layer_idx", [0, 1, 2, 4]), "dpt.intermediate_layer_idx[3] is 4, out of range for depth 4"),
    (set_key("dpt.intermediate_layer_idx", [0, -1, 2, 3]), "dpt.intermediate_layer_idx[1] must be >= 0, got -1"),
    (set_key("embed_dim", "128"), "embed_dim must be an integer, got '128'"),
    (set_key("mlp_ratio", "four"), "mlp_ratio must be a number, got 'four'"),
    (set_key("dpt.out_channels", [16, 32, None, 64]), "dpt.out_channels[2] must be an integer, got null"),
    (set_key("track_head.max_scale", None), "track_head.max_scale must be a number, got null"),
    (set_key("patch_embed.layers", 2), "patch_embed has unknown key(s) ['layers']"),
    (set_key("rope_freq", 10), "spec has unknown key(s) ['rope_freq']"),
    (set_key("img_size", 7), "img_size (7) must be at least patch_size (14)"),
]


@pytest.mark.parametrize("change, message", MALFORMED_SPECS, ids=[m.split(" ")[0] for _, m in MALFORMED_SPECS])
def test_malformed_spec_raises_one_sentence_naming_the_field(change, message):
    spec = tiny_spec()
    change(spec)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_spec(spec)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "spec must be a JSON object, got [1, 2]"),
    ("null", "spec must be a JSON object, got null"),
    ('{"depth": 4,', "is not a readable JSON file"),
    (b"\xff\xfe", "is not a readable JSON file"),
])
def test_spec_file_not_an_object(tmp_path, text, message):
    path = tmp_path / "spec.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_spec(path)


def test_cli_reports_a_malformed_spec_in_one_line(tmp_path, capsys):
    spec = tiny_spec()
    spec["dpt"]["intermediate_layer_idx"] = [0, 1]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    err = run_error(["convert", str(require(TINY / "weights.pth")), "--spec", str(path),
                     "--out", str(tmp_path / "out")], capsys)
    assert "dpt.intermediate_layer_idx must list 4 entries" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ presets
def test_presets_are_registered_and_validated():
    assert set(PRESETS) >= {"published", "medium", "tiny", "micro"}
    assert ModelConfig.preset("published") == ModelConfig() == ModelConfig.published()
    assert ModelConfig.preset("tiny") is ModelConfig.tiny()
    with pytest.raises(ConfigError, match=r"preset must be one of \['medium', 'micro', 'published', 'tiny'\]"):
        ModelConfig.preset("huge")
    with pytest.raises(TypeError):
        PRESETS["mine"] = ModelConfig()  # read-only registry


# ------------------------------------------------------------------------------------ public package
def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_import_is_light_and_has_a_version():
    r = _python("import sys, xsvggt_jax; print(xsvggt_jax.__version__, xsvggt_jax.__file__, 'jax' in sys.modules)")
    assert r.returncode == 0, r.stderr
    version, path, jax_loaded = r.stdout.split()
    assert re.match(r"^\d+\.\d+", version) and jax_loaded == "False"
    assert Path(path).parent == ROOT / "xsvggt_jax"


def test_readme_library_names_are_exported():
    import importlib

    import xsvggt_jax
    text = (ROOT / "README.md").read_text()
    imports = re.findall(r"^from (xsvggt_jax[\w.]*) import ([\w, ]+)$", text, flags=re.M)
    names = {n.strip(): mod for mod, group in imports for n in group.split(",")}
    names.update({n: None for n in re.findall(r"`xsvggt_jax\.(?:\w+\.)+(\w+)`", text)})
    assert {"ModelConfig", "CacheConfig", "init_cache", "make_step", "load_params", "run_stream"} <= set(names)
    for name, mod in names.items():
        assert name in xsvggt_jax.__all__, name
        if mod is not None:
            assert getattr(xsvggt_jax, name) is getattr(importlib.import_module(mod), name), name
    assert set(xsvggt_jax.__all__) <= set(dir(xsvggt_jax))
    for name in xsvggt_jax.__all__:
        getattr(xsvggt_jax, name)
    with pytest.raises(AttributeError):
        xsvggt_jax.not_a_name


def test_no_top_level_convert_package():
    r = _python("import importlib.util; s = importlib.util.find_spec('convert'); print(s and s.origin)")
    assert r.returncode == 0, r.stderr
    assert not r.stdout.strip().startswith(str(ROOT)), "this tree still has a top-level `convert` package"
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'include = \["xsvggt_jax\*"\]', text)


def test_frame_size_for_tracking_keeps_every_pyramid_level():
    """medium / published: stride 2, 7 correlation levels, so tracking needs both sides >= 128 px."""
    from xsvggt_jax.config import check_frame_size
    cfg = ModelConfig.preset("medium")
    assert (cfg.track.stride, cfg.track.corr_levels) == (2, 7)
    check_frame_size(cfg, 112, 154)                      # no query points: any multiple of the patch
    check_frame_size(cfg, 140, 154, tracks=True)
    with pytest.raises(ValueError, match="112x154 is too small to track points.*>= 128 pixels"):
        check_frame_size(cfg, 112, 154, tracks=True)
    with pytest.raises(ValueError, match="patch size 14"):
        check_frame_size(cfg, 100, 154, tracks=True)


# ---------------------------------------------------------------- text -> configuration: one parser
def test_value_from_text_reads_a_field_by_its_annotation():
    from typing import Literal, Optional
    from xsvggt_jax.config import value_from_text
    assert value_from_text("n", int, " 64 ") == 64 and type(value_from_text("n", int, "64")) is int
    assert value_from_text("x", float, "0.3") == 0.3 and value_from_text("x", float, "2") == 2.0
    assert value_from_text("b", bool, "True") is True and value_from_text("b", bool, "false") is False
    assert value_from_text("s", str, "kcvt") == "kcvt"
    assert value_from_text("o", Optional[int], "none") is None and value_from_text("o", Optional[int], "7") == 7
    assert value_from_text("q", Optional[str], "none") == "none"  # a layout called "none", not None
    assert value_from_text("m", Literal["a", "b"], "b") == "b"
    for hint, text, words in [(int, "abc", "n must be an integer, got 'abc'"), (int, "1.5", "an integer"),
                              (float, "x", "a number"), (float, "nan", "a number"), (float, "inf", "a number"),
                              (bool, "yes", "true or false"), (Optional[int], "many", "an integer"),
                              (Literal["a", "b"], "c", "one of a, b, got 'c'")]:
        with pytest.raises(ConfigError) as e:
            value_from_text("n", hint, text)
        assert words in str(e.value) and "invalid literal" not in str(e.value)


def test_cache_config_from_text_types_every_field():
    from xsvggt_jax.cache.core import CacheConfig
    c = CacheConfig.from_text("prune=xstream,budget=64,protect_share=0.3,camera_budget=32,quant_head_dim=none,"
                              "camera_quant=none,mass_decay=1,scale_dtype=float16")
    assert c == CacheConfig(prune="xstream", budget=64, protect_share=0.3, camera_budget=32, quant_head_dim=None,
                            camera_quant="none", mass_decay=1.0, scale_dtype="float16")
    assert type(c.budget) is int and type(c.protect_share) is float and type(c.mass_decay) is float
    # the short form of `xsvggt eval`, then fields, over `defaults`, over the dataclass defaults
    assert CacheConfig.from_text("xstream-int2:128, protect=budget", {"pool": 8, "budget": 5}) == \
        CacheConfig(prune="xstream", budget=128, quant="kcvt", bits=2, protect="budget", pool=8)
    assert CacheConfig.from_text("none") == CacheConfig.uncompressed()
    assert CacheConfig.from_text("sliding:32/seed=3", sep="/") == CacheConfig(prune="sliding", budget=32, seed=3)
    for c in (CacheConfig(), CacheConfig(prune="frame", quant="ktvc", bits=8, camera_bits=2, camera_quant="kcvt")):
        text = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(c).items() if v is not None)
        assert CacheConfig.from_text(text) == c  # every field's text form reads back (None: left out)


@pytest.mark.parametrize("text, words", [
    ("prune=xstream,foo=1", "unknown key 'foo' (keys: prune, budget, pool, seed, quant, bits, group, "),
    ("budget=abc", "budget must be an integer, got 'abc'"),
    ("budget=1.5", "budget must be an integer, got '1.5'"),
    ("protect_share=0.3x", "protect_share must be a number, got '0.3x'"),
    ("camera_budget=many", "camera_budget must be an integer, got 'many'"),
    ("protect_share=2", "protect_share must be in (0, 1], got 2.0"),
    ("prune=bogus", "prune must be one of ("),
    ("camera_quant=kxvx", "camera_quant must be one of ("),
    ("", "empty"), (" ", "empty"), (",", "an empty item"), ("prune=xstream,", "an empty item"),
    ("prune=xstream,,budget=2", "an empty item"),
    ("prune=xstream,budget", "expected KEY=VALUE, got 'budget'"),
    ("budget=1,budget=2", "budget is given twice"), ("xstream:64,budget=2", "budget is given twice"),
    ("bogus", "does not read as"), ("xstream-int3", "3-bit"), ("xstream:0", "budget after ':'"),
])
def test_cache_config_from_text_errors_are_one_sentence(text, words):
    from xsvggt_jax.cache.core import CacheConfig
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_text(text, where="--student-cache")
    msg = str(e.value)
    assert msg.startswith("--student-cache: ") and words in msg and "\n" not in msg, msg
    assert "invalid literal" not in msg and "could not convert" not in msg and "TypeError" not in msg


def test_every_cache_setting_parser_is_cache_config_from_text(monkeypatch, tmp_path):
    """eval --settings, train --student-cache and the benchmarks' settings all read text with
    CacheConfig.from_text (the one parser), and get what it returns."""
    from benchmarks import quality, stream
    from xsvggt_jax.app.cli import _parser
    from xsvggt_jax.cache.core import CacheConfig
    from xsvggt_jax.eval.settings import parse_settings
    from xsvggt_jax.train.command import run_config

    real, calls = CacheConfig.from_text.__func__, []

    def spy(cls, text, *args, **kwargs):
        calls.append(text)
        return dataclasses.replace(real(cls, text, *args, **kwargs), chunk=7)  # marks what it built

    monkeypatch.setattr(CacheConfig, "from_text", classmethod(spy))
    got = [parse_settings("xstream-int4:64")[0].cache, quality.study_setting("sliding:32/protect=budget").cache,
           stream.cache_setting("xstream-int4", 48, 8)]
    args = _parser().parse_args(["train", "--config", "micro", "--student-cache", "prune=sliding,budget=16",
                                 "--out", str(tmp_path / "run")])
    got.append(run_config(args).student_cache)
    assert calls == ["xstream-int4:64", "sliding:32/protect=budget", "xstream-int8:48", "prune=sliding,budget=16"]
    assert [c.chunk for c in got] == [7, 7, 7, 7]
