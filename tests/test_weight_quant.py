"""Weight-only int8 / int4 (`xsvggt_jax.weights.quant`, `--weights`): the codec against an independent
numpy quantizer, a quantized params directory's round trip, the error of the tiny reference model
streamed with quantized weights (stated bounds), and the flag's errors."""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from conftest import rel_err, run_error
from xsvggt_jax.app.cli import main
from xsvggt_jax.weights.loading import load_model
from xsvggt_jax.weights.params import CHECKSUM_FILE, ParamsError, load_params, load_weight_format, save_params
from xsvggt_jax.weights.quant import (KEEP_FLOAT, WeightFormat, dequantize_params, describe, quantize_params,
                                      stored_shapes)

FRAMES = 3  # the first frames of the reference stream (frame t depends on frames <= t only)
# Relative error of the tiny reference model streamed with quantized weights against upstream's float
# run (stream_none), per output over the first FRAMES frames, float32 CPU. Measured (2026-12):
#   int8 (per channel):  depth 8.6e-3, points 3.75e-2, pose 2.3e-2, conf 6.8e-3, depth_conf 4.1e-3
#   int4 (groups of 64): depth 1.03e-1, points 7.4e-1, pose 3.5e-1, conf 1.1e-1, depth_conf 8.1e-2
# Each bound is 2x its measurement. The tiny model's weights are random ("every parameter a distinct
# random value"), so int4 moves it far (its points by 74%); the trained demo model moves far less
# (benchmarks/README.md, "Weights in int8 / int4"). FLOOR (10x the float port's parity tolerance 1e-5)
# shows the weights were quantized at all: the largest error must exceed it.
BOUNDS = {"int8": {"depth": 2e-2, "pts3d_in_other_view": 8e-2, "camera_pose": 5e-2, "conf": 1.5e-2,
                   "depth_conf": 1e-2},
          "int4": {"depth": 2.1e-1, "pts3d_in_other_view": 1.5, "camera_pose": 7.1e-1, "conf": 2.3e-1,
                   "depth_conf": 1.7e-1}}
FLOOR = 1e-4


def numpy_quantize(x: np.ndarray, bits: int, group: int | None):
    """Symmetric absmax codes of a kernel [..., N] over groups of `group` flattened input rows: scale =
    absmax / (qmax + 1/2), codes = clip(round(x / scale), -qmax - 1, qmax). Returns (codes [K, N],
    scale [K / g, N], where x / scale lies within 1e-4 of a rounding tie [K, N]: there float rounding
    decides between two neighbouring codes)."""
    k, n = math.prod(x.shape[:-1]), x.shape[-1]
    g = group if group and group < k and k % group == 0 else k
    x2 = np.asarray(x, np.float32).reshape(k // g, g, n)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(x2).max(1) / np.float32(qmax + 0.5)
    ratio = x2 / scale[:, None]
    codes = np.clip(np.round(ratio), -qmax - 1, qmax).astype(np.int8)
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
    return codes.reshape(k, n), scale.astype(np.float32), tie.reshape(k, n)


@pytest.fixture(scope="module")
def quant_dirs(tiny_params, tiny_cfg, tmp_path_factory):
    """The reference weights (the session's converted `tiny_params`) as params directories: float
    (save_params), int8 (`xsvggt convert FLOAT_DIR --weights int8`) and int4 (save_params of
    quantize_params, as convert writes it)."""
    root = tmp_path_factory.mktemp("wq")
    save_params(tiny_params, root / "float", tiny_cfg)
    assert main(["convert", str(root / "float"), "--weights", "int8", "--out", str(root / "int8")]) == 0
    int4 = WeightFormat.from_text("int4")
    save_params(quantize_params(jax.device_get(tiny_params), int4), root / "int4", tiny_cfg, weights=int4)
    return root


def test_codec_equals_an_independent_quantizer():
    """Codes and scales of every kernel layout (Dense, conv, grouped, per channel, int4 packed two a
    byte) are those of the numpy quantizer above (itself held to qwix's `quantize`), and decoding in
    jit gives codes x scale."""
    rng = np.random.default_rng(0)
    tree = {"dense": {"kernel": rng.standard_normal((128, 48)).astype(np.float32),
                      "bias": rng.standard_normal(48).astype(np.float32)},
            "conv": {"kernel": rng.standard_normal((3, 3, 16, 8)).astype(np.float32)},
            "odd": {"kernel": rng.standard_normal((75, 6)).astype(np.float32)},       # 64 does not divide 75
            "depth_head": {"output_conv2_2": {"kernel": rng.standard_normal((1, 1, 8, 2)).astype(np.float32)}}}
    for text, bits in (("int8", 8), ("int4", 4), ("int4:16", 4), ("int8:32", 8)):
        fmt = WeightFormat.from_text(text)
        q = quantize_params(tree, fmt)
        assert q["dense"]["bias"] is tree["dense"]["bias"]
        assert q["depth_head"]["output_conv2_2"]["kernel"] is tree["depth_head"]["output_conv2_2"]["kernel"]  # KEEP_FLOAT
        assert jax.tree.map(lambda a: a.shape, stored_shapes(tree, fmt)) == jax.tree.map(lambda a: a.shape, q)
        deq = jax.jit(dequantize_params)(jax.device_put(q))
        for name in ("dense", "conv", "odd"):
            x, node = tree[name]["kernel"], q[name]["kernel"]
            codes, scale, _ = numpy_quantize(x, bits, fmt.group)
            stored = node[fmt.format]
            assert stored.dtype == np.int8
            if bits == 4:  # two codes a byte along the output axis: 2j low nibble, 2j+1 high nibble
                assert stored.shape == (*x.shape[:-1], x.shape[-1] // 2)
                byte = stored.view(np.uint8).astype(np.int16)
                lo, hi = byte & 0xF, byte >> 4
                unpacked = np.stack([lo - 16 * (lo > 7), hi - 16 * (hi > 7)], -1).reshape(x.shape)
            else:
                unpacked = stored
            unpacked = unpacked.reshape(codes.shape)
            np.testing.assert_array_equal(unpacked, codes, err_msg=f"{text} {name}")
            np.testing.assert_array_equal(node["scale"], scale, err_msg=f"{text} {name}")
            g = codes.shape[0] // scale.shape[0]
            want = (unpacked.reshape(scale.shape[0], g, -1) * scale[:, None]).reshape(x.shape)
            np.testing.assert_allclose(np.asarray(deq[name]["kernel"]), want, rtol=1e-6, atol=0)
            assert rel_err(deq[name]["kernel"], x) < (0.02 if bits == 8 else 0.2)
    assert describe(quantize_params(tree, "int4"))["groups"] == [64, "channel"]
    # the reference quantizer is qwix's: the same codes (where x / scale is not at a rounding tie) and scales
    import qwix
    x = tree["dense"]["kernel"]
    for qtype, bits, group in ((jnp.int8, 8, None), (jnp.int4, 4, 32)):
        q = qwix.quantize(jnp.asarray(x), qtype, channelwise_axes=[1], tiled_axes={0: group} if group else None)
        codes, scale, tie = numpy_quantize(x, bits, group)
        np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
        assert np.all(np.abs(np.asarray(q.qvalue).astype(int) - codes) <= tie), qtype
    with pytest.raises(ValueError, match="already quantized"):
        quantize_params(quantize_params(tree, "int8"), "int8")


def test_quantized_params_dir_round_trip(quant_dirs):
    """convert --weights writes the codes the one loader makes from float weights for --weights, bit for
    bit (int8: the float directory converted; the loader quantizing the float directory), records the
    format in config.json and checksum.json, and an edited format is refused."""
    flags = argparse.Namespace(params=str(quant_dirs / "float"), checkpoint=None, spec=None, cache_dir=None,
                               dtype="float32", weights=WeightFormat.from_text("int8"))
    loaded = flatten_dict(load_model(flags)[0])
    stored = flatten_dict(load_params(quant_dirs / "int8")[0])
    assert loaded.keys() == stored.keys() and any(k[-1] == "int8" for k in stored)
    for k, v in stored.items():
        assert v.dtype == loaded[k].dtype and np.array_equal(np.asarray(v), np.asarray(loaded[k])), k
    assert describe(unflatten_dict(stored))["bytes"] < 0.3 * describe(unflatten_dict(stored))["float32_bytes"]
    for text in ("int8", "int4"):
        d = quant_dirs / text
        assert load_weight_format(d) == WeightFormat.from_text(text)
        assert json.loads((d / "config.json").read_text())["weights"]["keep"] == list(KEEP_FLOAT)
        assert json.loads((d / CHECKSUM_FILE).read_text())["weights"]["format"] == text
    assert load_weight_format(quant_dirs / "float") == WeightFormat()
    assert "weights" not in json.loads((quant_dirs / "float" / "config.json").read_text())
    path = quant_dirs / "int8" / "config.json"
    cfg = json.loads(path.read_text())
    # edited after saving: arrays named or shaped otherwise (keep, format), or only checksum.json knows
    # (a pattern that matches nothing)
    for edit in ({"keep": []}, {"format": "int4"}, {"keep": [*KEEP_FLOAT, "no/such/layer/*"]}):
        path.write_text(json.dumps({**cfg, "weights": {**cfg["weights"], **edit}}))
        try:
            with pytest.raises(ParamsError):
                load_params(quant_dirs / "int8")
        finally:
            path.write_text(json.dumps(cfg, indent=1) + "\n")


@pytest.mark.parametrize("text", ["int8", "int4"])
def test_tiny_reference_streamed_with_quantized_weights(text, quant_dirs, tiny_dir, tmp_path):
    """`xsvggt reconstruct` with quantized weights (int8: the float directory quantized at load by
    --weights; int4: the directory convert wrote, as stored; either way the codes travel packed into
    the jitted step) stays within the stated bounds of upstream's float stream, and is not the float run."""
    frames = np.load(tiny_dir / "frames.npz")
    npz = tmp_path / "in.npz"
    np.savez(npz, images=frames["images"][:FRAMES])
    out = tmp_path / "out"
    weights = ["--params", str(quant_dirs / "float"), "--weights", "int8"] if text == "int8" else \
        ["--params", str(quant_dirs / "int4")]
    assert main(["reconstruct", str(npz), *weights, "--out", str(out), "--dtype", "float32"]) == 0
    preds, ref = np.load(out / "predictions.npz"), np.load(tiny_dir / "stream_none.npz")
    errs = {k: rel_err(preds[k], ref[k][:FRAMES]) for k in BOUNDS[text]}
    print(text, "vs upstream float:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) > FLOOR, errs
    assert all(errs[k] <= bound for k, bound in BOUNDS[text].items()), errs
    report = json.loads((out / "report.json").read_text())["weights"]
    assert report["format"] == text and report["groups"] == (["channel"] if text == "int8" else [64, "channel"])
    assert report["bytes"] < report["float32_bytes"] / (3 if text == "int8" else 5)


def test_weights_flag_errors(quant_dirs, tiny_dir, tmp_path, capsys):
    """A bad --weights value, re-quantizing quantized weights, and a quantized directory given to a
    command that needs float weights: one line each, nothing written."""
    npz = tmp_path / "in.npz"
    np.savez(npz, images=np.load(tiny_dir / "frames.npz")["images"][:1])
    out = tmp_path / "out"
    base = ["reconstruct", str(npz), "--out", str(out)]
    for bad in ("int3", "int4:0", "float:64", "int8:x"):
        err = run_error([*base, "--params", str(quant_dirs / "float"), "--weights", bad], capsys)
        assert "--weights" in err and bad in err, err
    err = run_error([*base, "--params", str(quant_dirs / "int8"), "--weights", "int4"], capsys)
    assert "holds int8:channel weights" in err, err
    err = run_error(["convert", str(quant_dirs / "int4"), "--weights", "int8", "--out", str(out)], capsys)
    assert "int4:64" in err and "float weights" in err, err
    err = run_error(["train", "--init", str(quant_dirs / "int8"), "--out", str(out), "--steps", "1"], capsys)
    assert "needs float weights" in err, err
    assert not out.exists()


def test_weights_flag_on_the_model_commands():
    """--weights is one flag (the loader's) on every command that runs a model from given weights, and
    on convert; train, which needs float weights, has none."""
    from xsvggt_jax.app.cli import _parser
    from xsvggt_jax.weights.loading import WEIGHTS_HELP

    commands = _parser()._subparsers._group_actions[0].choices
    for name in ("demo", "reconstruct", "reconstruct-many", "eval", "convert"):
        (flag,) = [a for a in commands[name]._actions if "--weights" in a.option_strings]
        assert flag.help == WEIGHTS_HELP and flag.default is None, name
    assert not [a for a in commands["train"]._actions if "--weights" in a.option_strings]
