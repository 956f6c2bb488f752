"""Params directories: device arrays, config/array agreement, older formats, clean exit; the
conversion cache of upstream checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, require_reference
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.weights.params import FORMAT_V1, ParamsError, load_config, load_params, save_params
from xsvggt_jax.nn.model import param_shapes

ROOT = Path(__file__).resolve().parents[1]


def random_params(cfg: ModelConfig) -> dict:
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), param_shapes(cfg))


@pytest.fixture(scope="module")
def micro():
    """The micro preset with random weights as numpy arrays (what the converter produces)."""
    cfg = ModelConfig.preset("micro")
    return cfg, random_params(cfg)


@pytest.fixture(scope="module")
def saved(micro, tmp_path_factory):
    cfg, params = micro
    return save_params(params, tmp_path_factory.mktemp("p") / "params", cfg)


def test_load_params_gives_device_arrays_usable_inside_jit(micro, saved):
    cfg, params = micro
    loaded, loaded_cfg = load_params(saved)
    assert loaded_cfg == cfg
    leaves = jax.tree.leaves(loaded)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(leaves, jax.tree.leaves(params)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)
    token = loaded["aggregator"]["camera_token"]

    @jax.jit
    def closed_over(x):  # numpy leaves here raise TracerArrayConversionError
        return x * jnp.sum(token) + jnp.sum(jnp.asarray(loaded["aggregator"]["register_token"]) * x)

    expected = 2.0 * (np.sum(params["aggregator"]["camera_token"]) + np.sum(params["aggregator"]["register_token"]))
    np.testing.assert_allclose(float(closed_over(2.0)), expected, rtol=1e-5)


def test_load_params_places_on_the_given_sharding(saved):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    loaded, _ = load_params(saved, sharding=sharding)
    assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(loaded))


def _edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    edit(data["model"])
    path.write_text(json.dumps(data))


def _no_restore(monkeypatch):
    """Make any attempt to read the arrays fail: mismatches must be found from the metadata."""
    import orbax.checkpoint as ocp

    def refuse(*args, **kwargs):
        raise AssertionError("arrays restored before the config/array check")
    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", refuse)


def test_config_disagreeing_with_arrays_names_the_first_array(micro, tmp_path, monkeypatch):
    cfg, params = micro
    d = save_params(params, tmp_path / "p", cfg)

    def wider(m):
        m["embed_dim"] = m["dino"]["embed_dim"] = 64
    _edit_config(d, wider)
    _no_restore(monkeypatch)
    with pytest.raises(ParamsError, match=r"params/ does not match config.json: array aggregator/camera_token has "
                                          r"shape \(1, 2, 1, 32\) where the configuration needs \(1, 2, 1, 64\)"):
        load_params(d)


@pytest.mark.parametrize("change, message", [
    (lambda p: p["camera_head"].pop("empty_pose_tokens"), r"it lacks array camera_head/empty_pose_tokens \(1, 1, 9\)"),
    (lambda p: p["camera_head"].__setitem__("extra", np.zeros(3, np.float32)), r"it has an extra array camera_head/extra \(3,\)"),
    (lambda p: p["camera_head"].__setitem__("empty_pose_tokens", np.zeros((1, 9), np.float32)),
     r"array camera_head/empty_pose_tokens has shape \(1, 9\) where the configuration needs \(1, 1, 9\)"),
])
def test_missing_extra_or_misshapen_array(micro, tmp_path, monkeypatch, change, message):
    cfg, params = micro
    params = jax.tree.map(lambda x: x, params)  # a copy of the nesting
    change(params)
    d = save_params(params, tmp_path / "p", cfg)
    _no_restore(monkeypatch)
    with pytest.raises(ParamsError, match=message):
        load_params(d)


def test_invalid_config_json_is_a_params_error(saved, tmp_path):
    import shutil
    d = Path(shutil.copytree(saved, tmp_path / "p"))
    _edit_config(d, lambda m: m.__setitem__("patch_size", 0))
    with pytest.raises(ParamsError, match="invalid configuration \\(patch_size must be positive, got 0\\)"):
        load_config(d)
    _edit_config(d, lambda m: m.__setitem__("patch_size", 14) or m.__setitem__("bogus", 1))
    with pytest.raises(ParamsError, match=r"config has unknown key\(s\) \['bogus'\]"):
        load_config(d)


def test_config_json_keeps_every_field(micro, saved):
    cfg, _ = micro
    data = json.loads((saved / "config.json").read_text())
    assert ModelConfig.from_dict(data["model"]) == cfg
    assert data["model"]["camera"]["iterations"] == cfg.camera.iterations and "rope_freq" in data["model"]


def test_format_1_directories_still_load(micro, saved, tmp_path):
    """Format 1 stored to_spec() + dtype + precision; it is read through the spec adapter."""
    import shutil
    cfg, _ = micro
    d = Path(shutil.copytree(saved, tmp_path / "old"))
    old = dict(cfg.to_spec(), dtype="bfloat16", precision="high", format=FORMAT_V1)
    (d / "config.json").write_text(json.dumps(old))
    loaded, loaded_cfg = load_params(d)
    assert loaded_cfg == cfg.replace(dtype="bfloat16", precision="high")
    assert isinstance(jax.tree.leaves(loaded)[0], jax.Array)


def test_save_and_load_in_a_subprocess_print_nothing(tmp_path):
    code = f"""
import jax, numpy as np
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.weights.params import save_params, load_params
from xsvggt_jax.nn.model import param_shapes
cfg = ModelConfig.preset("micro")
params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), param_shapes(cfg))
save_params(params, {str(tmp_path / "p")!r}, cfg)
loaded, _ = load_params({str(tmp_path / "p")!r})
save_params(loaded, {str(tmp_path / "q")!r}, cfg)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""


# ------------------------------------------------------------------------------ upstream checkpoints
def test_conversion_cache_keeps_the_requested_dtype(tmp_path):
    """The cache key is the architecture; a second run with another dtype reuses the conversion but
    returns the configuration asked for (the cached directory's dtype used to win)."""
    from xsvggt_jax.weights.cached import params_from_checkpoint

    pth = require_reference(TINY) / "weights.pth"
    cfg = ModelConfig.tiny()
    p32, c32 = params_from_checkpoint(pth, cfg, cache_dir=tmp_path)
    entries = sorted(tmp_path.iterdir())
    p16, c16 = params_from_checkpoint(pth, cfg.replace(dtype="bfloat16"), cache_dir=tmp_path)
    assert c32 == cfg and c16 == cfg.replace(dtype="bfloat16")
    assert sorted(tmp_path.iterdir()) == entries and len(entries) == 1  # one conversion shared
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(p32) + jax.tree.leaves(p16))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), p32, p16))


def test_forgotten_spec_says_so_in_one_line():
    from xsvggt_jax.weights.convert import ConversionError
    from xsvggt_jax.weights.convert import check_coverage
    from xsvggt_jax.weights.torch_reader import read_state_dict

    shapes = {k: v.shape for k, v in read_state_dict(require_reference(TINY) / "weights.safetensors").items()}
    with pytest.raises(ConversionError) as e:
        check_coverage(shapes, ModelConfig.published(), "weights.safetensors")
    msg = str(e.value)
    assert msg.startswith("weights.safetensors looks like a non-published configuration (1755 of 1797 expected "
                          "tensors missing/mismatched, e.g. aggregator.camera_token is (1, 2, 1, 128), expected "
                          "(1, 2, 1, 1024);")
    assert msg.endswith("): pass --spec") and "\n" not in msg and len(msg) < 500


# ------------------------------------------------------------------------------------- checksums
def _flip_one_bit(params: dict) -> dict:
    params = jax.tree.map(np.array, params)  # own copies
    token = params["aggregator"]["camera_token"]
    token.view(np.uint32).reshape(-1)[3] ^= 1 << 7
    return params


def test_bit_flipped_arrays_are_refused_naming_the_array(micro, tmp_path):
    """A params/ checkpoint that orbax still reads but whose bytes changed since `save_params` (a bit
    flipped on disk or in transit; simulated by swapping in the checkpoint of a one-bit-different
    tree) used to load silently."""
    import shutil
    cfg, params = micro
    d = save_params(params, tmp_path / "p", cfg)
    other = save_params(_flip_one_bit(params), tmp_path / "q", cfg)
    shutil.rmtree(d / "params")
    shutil.copytree(other / "params", d / "params")
    with pytest.raises(ParamsError) as e:
        load_params(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg and "checksum.json" in msg
    assert "aggregator/camera_token" in msg and "register_token" not in msg


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.__setitem__("rope_freq", m["rope_freq"] * 2), "rope_freq"),
    (lambda m: m["dino"].__setitem__("layer_norm_eps", 1e-3), "dino.layer_norm_eps"),
])
def test_config_edits_that_keep_shapes_are_refused(micro, saved, tmp_path, edit, field):
    """config.json edited after saving in a way that keeps every array's shape (so the shape check
    passes) used to load the arrays under a configuration they were not trained with."""
    import shutil
    d = Path(shutil.copytree(saved, tmp_path / "p"))
    _edit_config(d, edit)
    with pytest.raises(ParamsError, match=rf"config.json .*checksum.json.*{field} "):
        load_params(d)


def test_directory_without_checksum_loads_with_a_debug_log(micro, saved, tmp_path, caplog):
    """Directories written before checksums were stored still load (checksum unchecked, said at debug)."""
    import logging
    import shutil
    cfg, params = micro
    d = Path(shutil.copytree(saved, tmp_path / "p"))
    assert (d / "checksum.json").is_file()
    (d / "checksum.json").unlink()
    with caplog.at_level(logging.DEBUG, logger="xsvggt_jax.weights.params"):
        loaded, loaded_cfg = load_params(d)
    assert loaded_cfg == cfg
    assert any("checksum" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), b)
