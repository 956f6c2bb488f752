"""The shipped models (demo, stream8): they load, their cards' held-out metrics reproduce, and they beat the baselines."""

from __future__ import annotations

import json
from importlib import resources

import jax
import numpy as np
import pytest

from xsvggt_jax import pretrained
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.pretrained.build import heldout_metrics, model_card_markdown


@pytest.fixture(scope="module")
def demo():
    params, cfg = pretrained.load("demo")
    return params, cfg, pretrained.card("demo")


def _shipped_file_is_small_float16_and_matches(name: str, params, cfg, card) -> None:
    """A shipped model: float16 on disk (2 bytes a parameter + header), its card's config and text."""
    files = resources.files("xsvggt_jax.pretrained")
    size = len(files.joinpath(f"{name}.safetensors").read_bytes())
    n = sum(x.size for x in jax.tree.leaves(params))
    assert card["storage_dtype"] == "float16" and size < 2 * n + 64 * 1024
    assert cfg == ModelConfig.from_dict(card["config"])
    assert all(x.dtype == np.float32 and np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert files.joinpath(f"{name}.md").read_text() == model_card_markdown(card)


def test_shipped_file_is_small_float16_and_matches_its_config(demo):
    _shipped_file_is_small_float16_and_matches("demo", *demo)


def test_heldout_metrics_reproduce_the_card_within_1e_4(demo):
    params, cfg, card = demo
    h = card["heldout"]
    got = heldout_metrics(params, cfg, tuple(card["frame_size"]), h["frames"], h["scenes"])["model"]
    want = h["metrics"]["model"]
    for key in ("abs_rel", "delta_1.25", "ate", "focal_err"):
        assert abs(got[key] - want[key]) <= 1e-4, (key, got[key], want[key])


def test_trained_model_beats_the_baselines_on_held_out_scenes(demo):
    m = demo[2]["heldout"]["metrics"]
    assert m["model"]["abs_rel"] <= 0.5 * m["constant_depth"]["abs_rel"]     # the target
    assert m["model"]["abs_rel"] < m["random_weights"]["abs_rel"]
    assert m["model"]["ate"] < min(m["random_weights"]["ate"], m["identity_poses"]["ate"])
    # both fields of view learned (the first shipped model had a dead FoV_h channel: infinite fy)
    assert m["model"]["focal_err"] < 0.05 < m["random_weights"]["focal_err"]


def test_unknown_model_is_a_typed_error():
    with pytest.raises(pretrained.PretrainedError, match="unknown pretrained model 'nope'"):
        pretrained.load("nope")


# ---------------------------------------------------------------- stream8: the realistic-scale study's model
@pytest.fixture(scope="module")
def stream8():
    params, cfg = pretrained.load("stream8")
    return params, cfg, pretrained.card("stream8")


def test_stream8_is_small_float16_in_the_published_like_regime(stream8):
    params, cfg, card = stream8
    _shipped_file_is_small_float16_and_matches("stream8", *stream8)
    h, w = card["frame_size"]
    patches = (h // cfg.patch_size) * (w // cfg.patch_size)
    assert patches >= 108 and card["training"]["data"]["frames"] >= 8   # budgets of 1-4 frames cut into history


def test_stream8_check_row_reproduces_within_1e_4(stream8):
    params, cfg, card = stream8
    h, check = card["heldout"], card["heldout"]["check"]
    got = heldout_metrics(params, cfg, tuple(card["frame_size"]), h["frames"], check["scenes"])["model"]
    for key in ("abs_rel", "delta_1.25", "ate", "focal_err"):
        assert abs(got[key] - check["metrics"][key]) <= 1e-4, (key, got[key], check["metrics"][key])


def test_stream8_beats_the_baselines_on_held_out_scenes(stream8):
    m = stream8[2]["heldout"]["metrics"]
    assert m["model"]["abs_rel"] <= 0.5 * m["constant_depth"]["abs_rel"]
    assert m["model"]["abs_rel"] < m["random_weights"]["abs_rel"]
    assert m["model"]["ate"] < min(m["random_weights"]["ate"], m["identity_poses"]["ate"])
    assert m["model"]["focal_err"] < 0.05 < m["random_weights"]["focal_err"]
