"""End-to-end tests of the `xsvggt` command line (in-process) and of the params directory format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from _refs import OFFLINE_TRACK_SCORE_TOL, TOL, assert_ktvt_parity
from _refs import OUTPUTS as ALL_KEYS
from conftest import rel_err, run_error
from xsvggt_jax.app.cli import main
from xsvggt_jax.cache.core import BUILT_FOR_BYTES
from xsvggt_jax.weights.params import ParamsError, load_params

F32 = ("--dtype", "float32")  # parity with upstream: float32 on every backend (the default "auto" is bf16 on GPU)
REPORT_FIELDS = ("mode", "frames", "height", "width", "seconds_per_frame", "compile_seconds", "cache_bytes",
                 "peak_memory_bytes", "backend", "device", "device_kind", "device_peak_bytes")


def no_leftovers(parent: Path, name: str) -> None:
    """Neither the output directory nor any of its temporary siblings exist."""
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def params_dirs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("params")
    out = {}
    for ext in ("pth", "safetensors"):
        assert main(["convert", str(tiny_dir / f"weights.{ext}"), "--spec", str(tiny_dir / "spec.json"),
                     "--out", str(root / ext)]) == 0
        out[ext] = root / ext
    return out


@pytest.fixture(scope="module")
def stream_run(tiny_dir, params_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "out"
    assert main(["reconstruct", str(tiny_dir / "frames.npz"), "--params", str(params_dirs["pth"]),
                 "--out", str(out), *F32]) == 0
    return out


@pytest.fixture
def small_input(tiny_frames, tmp_path):
    """Write an .npz from (images, query_points) variants of the first 2 reference frames."""
    images, qp = tiny_frames

    def write(name="in.npz", **arrays):
        arrays = {"images": images[:2], "query_points": qp, **arrays}
        path = tmp_path / name
        np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
        return path
    return write


# ------------------------------------------------------------------------------------------- convert
def test_convert_roundtrip_bit_identical(params_dirs, tiny_params, tiny_cfg):
    p_pth, cfg_pth = load_params(params_dirs["pth"])
    p_st, cfg_st = load_params(params_dirs["safetensors"])
    auto = tiny_cfg.replace(dtype="auto")  # a converted model computes by the default precision policy
    assert cfg_pth == auto and cfg_st == auto
    ref = flatten_dict(tiny_params)
    for loaded in (flatten_dict(p_pth), flatten_dict(p_st)):
        assert loaded.keys() == ref.keys()
        for k, v in ref.items():
            got = np.asarray(loaded[k])
            assert got.dtype == v.dtype and got.shape == v.shape, k
            assert np.array_equal(got, v), k


def test_convert_overwrite_replaces_only_our_params_dir(tiny_dir, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    args = ["convert", str(tiny_dir / "weights.safetensors"), "--spec", str(tiny_dir / "spec.json"),
            "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert (out / "old.txt").read_text() == "keep me"
    with pytest.raises(SystemExit) as exc:  # --overwrite replaces only a params dir xsvggt wrote
        main(args + ["--overwrite"])
    assert exc.value.code == 2
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and (out / "old.txt").read_text() == "keep me"
    ours = tmp_path / "q"
    ours_args = args[:-1] + [str(ours)]
    assert main(ours_args) == 0
    before = (ours / "config.json").stat().st_mtime_ns
    assert main(ours_args + ["--overwrite"]) == 0
    assert (ours / "config.json").stat().st_mtime_ns >= before
    assert sorted(p.name for p in ours.iterdir()) == ["checksum.json", "config.json", "params"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "q"]  # no temporary siblings left


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_convert_bad_state_dict(change, tiny_dir, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file
    state = load_file(str(tiny_dir / "weights.safetensors"))
    if change == "extra":
        key = "aggregator.bogus_extra.weight"
        state[key] = np.zeros((3,), np.float32)
    else:
        key = "aggregator.camera_token"  # same name on both sides of the key map
        del state[key]
    src = tmp_path / f"{change}.safetensors"
    save_file(state, str(src))
    err = run_error(["convert", str(src), "--spec", str(tiny_dir / "spec.json"), "--out", str(tmp_path / "p")],
                    capsys)
    assert key in err
    assert ("unused" if change == "extra" else "not filled") in err
    no_leftovers(tmp_path, "p")


def test_convert_bad_inputs(tiny_dir, tmp_path, capsys):
    err = run_error(["convert", str(tmp_path / "nope.pth"), "--spec", str(tiny_dir / "spec.json"),
                     "--out", str(tmp_path / "p")], capsys)
    assert "nope.pth" in err and "not found" in err
    bad_spec = tmp_path / "spec.json"
    bad_spec.write_text('{"depth": 4, "bogus": 1}')
    err = run_error(["convert", str(tiny_dir / "weights.pth"), "--spec", str(bad_spec),
                     "--out", str(tmp_path / "p")], capsys)
    assert "bogus" in err
    no_leftovers(tmp_path, "p")


def test_load_params_rejects_foreign_dir(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent")
    with pytest.raises(ParamsError, match="config.json"):
        load_params(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "xsvggt-params/1", "depth": 4, '
                                          '"dpt": {"intermediate_layer_idx": [0, 1, 2, 3]}}')
    with pytest.raises(ParamsError, match="params/"):
        load_params(tmp_path)


# --------------------------------------------------------------------------------------- reconstruct
def test_reconstruct_stream_matches_upstream(stream_run, tiny_dir):
    preds = np.load(stream_run / "predictions.npz")
    ref = np.load(tiny_dir / "stream_none.npz")
    assert sorted(preds.files) == sorted(ALL_KEYS + ("extrinsics", "intrinsics", "timestamps"))
    errs = {}
    for k in ALL_KEYS:
        assert preds[k].dtype == np.float32
        errs[k] = rel_err(preds[k], ref[k])
    print("stream vs stream_none rel err:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert all(v < 1e-5 for v in errs.values()), errs

    report = json.loads((stream_run / "report.json").read_text())
    assert all(f in report for f in REPORT_FIELDS), report
    assert report["mode"] == "stream" and report["frames"] == 20
    assert (report["height"], report["width"]) == (56, 70)
    assert report["cache_bytes"] > 0 and report["peak_memory_bytes"] > 0
    assert (report["device_peak_bytes"] is None) == (report["backend"] == "cpu")  # no allocator stats on CPU
    assert report["seconds_per_frame"] > 0 and report["compile_seconds"] > 0
    assert report["dtype"] == "float32" and report["compute_dtype"] == {"trunk": "float32", "heads": "float32"}
    assert report["weights"]["format"] == "float" and report["weights"]["bytes"] == report["weights"]["float32_bytes"]


def test_report_records_the_precision_policy(params_dirs, small_input, tmp_path):
    """Without --dtype: the policy "auto" and what it resolved to on this backend (upstream's autocast on
    an accelerator: a bfloat16 aggregator, float32 heads)."""
    out = tmp_path / "out"
    assert main(["reconstruct", str(small_input()), "--params", str(params_dirs["pth"]), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    trunk = "float32" if report["backend"] == "cpu" else "bfloat16"
    assert report["dtype"] == "auto" and report["compute_dtype"] == {"trunk": trunk, "heads": "float32"}


def test_reconstruct_offline_causal_matches_upstream(tiny_dir, params_dirs, tmp_path):
    out = tmp_path / "out"
    assert main(["reconstruct", str(tiny_dir / "frames.npz"), "--params", str(params_dirs["safetensors"]),
                 "--out", str(out), "--offline", "causal", *F32]) == 0
    preds = np.load(out / "predictions.npz")
    ref = np.load(tiny_dir / "offline_causal.npz")
    errs = {k: rel_err(preds[k], ref[k]) for k in ALL_KEYS}
    print("offline causal vs offline_causal rel err:", {k: f"{v:.2e}" for k, v in errs.items()})
    # vis / track_conf of the batch forward sit at upstream's float32 noise floor (see test_parity)
    loose = {"vis": OFFLINE_TRACK_SCORE_TOL, "track_conf": OFFLINE_TRACK_SCORE_TOL}
    assert all(v < loose.get(k, 1e-5) for k, v in errs.items()), errs
    report = json.loads((out / "report.json").read_text())
    assert all(f in report for f in REPORT_FIELDS), report
    assert report["mode"] == "offline_causal" and report["frames"] == 20 and report["cache_bytes"] == 0


def test_reconstruct_input_errors(params_dirs, small_input, tiny_frames, tmp_path, capsys):
    images, qp = tiny_frames
    params = str(params_dirs["pth"])

    def check(path, *expect):
        err = run_error(["reconstruct", str(path), "--params", params, "--out", str(tmp_path / "out")], capsys)
        for e in expect:
            assert e in err, (e, err)
        no_leftovers(tmp_path, "out")

    check(tmp_path / "missing.npz", "missing.npz", "not found")
    np.savez(tmp_path / "noimg.npz", frames=images[:2])
    check(tmp_path / "noimg.npz", "noimg.npz", "'images'")
    check(small_input("ndim.npz", images=images[0]), "ndim.npz", "'images'", "[3, 56, 70]")
    check(small_input("h.npz", images=images[:2, :, :50]), "h.npz", "50x70", "patch size 14")
    bad = images[:2].copy()
    bad[1, 0, 3, 4] = np.nan
    check(small_input("nan.npz", images=bad), "nan.npz", "non-finite")
    check(small_input("qp.npz", query_points=qp[:, :1]), "qp.npz", "'query_points'", "[8, 1]")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    check(tmp_path / "junk.npz", "junk.npz", "not a readable")


def test_reconstruct_refuses_existing_outdir(params_dirs, small_input, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    err = run_error(["reconstruct", str(small_input()), "--params", str(params_dirs["pth"]), "--out", str(out)],
                    capsys)
    assert str(out) in err and "exists" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"


def test_reconstruct_bad_params_dir(small_input, tmp_path, capsys):
    err = run_error(["reconstruct", str(small_input()), "--params", str(tmp_path), "--out", str(tmp_path / "out")],
                    capsys)
    assert "config.json" in err
    no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("flags,run", [
    (["--prune", "xstream", "--cache-size", "64", "--pool", "16"], "stream_xs_c64_p16"),
    # the library's check for this layout (tests/test_parity.py): the CLI runs the same program
    (["--prune", "xstream", "--cache-size", "64", "--pool", "16", "--quant", "ktvt"], "stream_xs_c64_p16_KTVT"),
])
def test_reconstruct_compressed_stream(flags, run, tiny_dir, params_dirs, tmp_path):
    out = tmp_path / "out"
    assert main(["reconstruct", str(tiny_dir / "frames.npz"), "--params", str(params_dirs["pth"]),
                 "--out", str(out), *flags, *F32]) == 0
    preds, ref = np.load(out / "predictions.npz"), np.load(tiny_dir / f"{run}.npz")
    if "ktvt" in flags:
        assert_ktvt_parity(preds, ref)
    else:
        errs = {k: rel_err(preds[k], ref[k]) for k in ALL_KEYS}
        print(run, errs)
        assert max(errs.values()) <= TOL, errs
    report = json.loads((out / "report.json").read_text())
    for field in ("cache_bytes", "cache_bytes_global", "cache_bytes_camera", "packed_floor_bytes"):
        assert report[field] > 0, field
    assert report["cache_bytes"] == (report["cache_bytes_global"] + report["cache_bytes_camera"] + 8 * 2 * 4 + 12 + 8
                                     + BUILT_FOR_BYTES)  # + tracks, counters, rng key, configuration record
    assert report["cache"]["prune"] == "xstream" and report["cache"]["budget"] == 64


# ------------------------------------------------------------------ typed errors, one loader, one --dtype
def test_every_error_class_of_the_package_is_typed():
    """Library errors derive from xsvggt_jax.errors.XsvggtError (and stay ValueErrors); the CLI defines
    none of its own."""
    import importlib
    import inspect
    import pkgutil

    import xsvggt_jax
    from xsvggt_jax.app import cli
    from xsvggt_jax.errors import XsvggtError

    classes = []
    for m in pkgutil.walk_packages(xsvggt_jax.__path__, "xsvggt_jax."):
        module = importlib.import_module(m.name)
        classes += [c for c in vars(module).values()
                    if inspect.isclass(c) and issubclass(c, BaseException) and c.__module__ == m.name]
    untyped = sorted(f"{c.__module__}.{c.__name__}" for c in classes if not issubclass(c, XsvggtError))
    # Ctrl-C's twin, and a guard against recompiling (a bug, not an input problem)
    assert untyped == ["xsvggt_jax.runtime.Terminated", "xsvggt_jax.train.step.TraceCountError"]
    typed = [c for c in classes if issubclass(c, XsvggtError) and c is not XsvggtError]
    assert len(typed) > 25 and all(issubclass(c, ValueError) for c in typed)  # as before: except ValueError holds
    assert not hasattr(cli, "UsageError")


def test_commands_raise_typed_errors_without_handed_down_classes():
    import inspect

    from xsvggt_jax.eval import command as eval_command
    from xsvggt_jax.train import command as train_command
    assert list(inspect.signature(eval_command.run).parameters) == ["args"]
    assert list(inspect.signature(train_command.run_train_command).parameters) == ["args"]


@pytest.mark.parametrize("kind", ["InputError", "ConfigError", "ResourceError", "XsvggtError"])
def test_main_prints_any_library_error_as_one_line(kind, monkeypatch, capsys, tmp_path):
    import xsvggt_jax.errors as errors
    from xsvggt_jax.app import cli

    def fail(args):
        raise getattr(errors, kind)("something the user can fix")
    monkeypatch.setattr(cli, "_convert", fail)
    err = run_error(["convert", str(tmp_path / "x.pth"), "--out", str(tmp_path / "out")], capsys)
    assert err == "xsvggt: error: something the user can fix"

    def bug(args):
        raise ValueError("a bug keeps its traceback")
    monkeypatch.setattr(cli, "_convert", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["convert", str(tmp_path / "x.pth"), "--out", str(tmp_path / "out")])


def test_dtype_is_one_flag_on_every_command():
    from xsvggt_jax.app.cli import _parser
    from xsvggt_jax.config import DTYPES
    from xsvggt_jax.weights.loading import DTYPE_HELP

    commands = _parser()._subparsers._group_actions[0].choices
    for name in ("demo", "reconstruct", "reconstruct-many", "eval", "train", "live"):
        (flag,) = [a for a in commands[name]._actions if "--dtype" in a.option_strings]
        assert tuple(flag.choices) == ("auto", *DTYPES) and flag.help == DTYPE_HELP, name
        assert flag.default == "auto", name  # the precision policy is every command's default


def test_one_loader_applies_dtype(params_dirs, tmp_path):
    """reconstruct / eval / train read weights and apply --dtype through weights.loading."""
    import argparse

    import jax

    from xsvggt_jax.app.cli import _parser
    from xsvggt_jax.eval.command import _model_config
    from xsvggt_jax.train.command import run_config
    from xsvggt_jax.weights.loading import load_model, model_config

    flags = argparse.Namespace(params=str(params_dirs["pth"]), checkpoint=None, spec=None, cache_dir=None,
                               dtype="bfloat16")
    params, cfg = load_model(flags)
    assert cfg.dtype == "bfloat16" and model_config(flags) == cfg
    assert jax.tree.leaves(params)[0].dtype == np.float32  # the compute dtype only
    p = _parser()
    ev = p.parse_args(["eval", "--dataset", "procedural", "--task", "recon", "--out", str(tmp_path / "e"),
                       "--dtype", "bfloat16"])
    assert _model_config(ev)[0].dtype == "bfloat16"
    tr = p.parse_args(["train", "--init", str(params_dirs["pth"]), "--out", str(tmp_path / "t"), "--dtype",
                       "float16"])
    assert run_config(tr).model == cfg.replace(dtype="float16")
