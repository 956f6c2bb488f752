"""The product surface: `xsvggt demo`, image-folder / video / npz inputs, exports, resume, errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from plyfile import PlyData

import xsvggt_jax.stream.pipeline as pipeline
from conftest import require_reference, run_error
from xsvggt_jax.app.cli import main

OUTPUT_FILES = ("predictions.npz", "points.ply", "trajectory.txt", "colmap/sparse/0/cameras.txt",
                "colmap/sparse/0/images.txt", "colmap/sparse/0/points3D.txt", "depth/depth.npz",
                "depth/depth_00000.png", "depth/preview/depth_00000.png", "report.json", "stream.png")


def check_outputs(out: Path, frames: int, hw: tuple[int, int]) -> dict:
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    pred = np.load(out / "predictions.npz")
    assert pred["extrinsics"].shape == (frames, 3, 4) and pred["intrinsics"].shape == (frames, 3, 3)
    assert pred["depth"].shape == (frames, *hw, 1) and pred["camera_pose"].shape == (frames, 9)
    ply = PlyData.read(str(out / "points.ply"))
    assert {p.name for p in ply["vertex"].properties} == {"x", "y", "z", "red", "green", "blue"}
    rows = [l.split() for l in (out / "trajectory.txt").read_text().splitlines() if not l.startswith("#")]
    assert len(rows) == frames and all(len(r) == 8 for r in rows)
    q = np.array([[float(v) for v in r[4:]] for r in rows])
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert len(list((out / "depth").glob("depth_*.png"))) == frames
    report = json.loads((out / "report.json").read_text())
    assert report["frames"] == frames and report["producer"] == "xsvggt-jax"
    assert len(report["latency_s"]) == frames and len(report["cache_bytes_per_frame"]) == frames
    return report


@pytest.fixture(scope="module")
def tiny_params_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("params") / "tiny"
    assert main(["convert", str(tiny_dir / "weights.pth"), "--spec", str(tiny_dir / "spec.json"),
                 "--out", str(out)]) == 0
    return out


def test_demo_runs_end_to_end_with_one_compile_and_shows_the_scene(tmp_path, caplog, capsys):
    from xsvggt_jax import pretrained
    from xsvggt_jax.eval.depth import evaluate_depth

    out = tmp_path / "demo"
    frames, hw = 5, tuple(pretrained.card("demo")["frame_size"])
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        assert main(["demo", "--out", str(out), "--frames", str(frames), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "shipped `demo` model" in stdout and str(out) in stdout
    report = check_outputs(out, frames, hw)
    assert report["cache"]["prune"] == "xstream" and report["cache"]["quant"] == "kcvt"
    # every camera usable: a field of view <= 0 would drop the frame from the COLMAP export
    assert report["colmap_dropped_frames"] == [] and report["colmap_images"] == frames
    truth = np.load(out / "scene_ground_truth.npz")["depth"]
    assert truth.shape == (frames, *hw)
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(compiles) == 1
    # the trained model's depth follows the scene: far better than a constant map after the same
    # median scaling (random weights are not: see tests/test_pretrained.py for the held-out numbers)
    depth = np.load(out / "predictions.npz")["depth"][..., 0]
    model = evaluate_depth(depth.astype(np.float64), truth, align="median")["abs_rel"]
    constant = evaluate_depth(np.ones_like(truth, np.float64), truth, align="median")["abs_rel"]
    assert model < 0.6 * constant, (model, constant)


def test_reconstruct_image_folder(tiny_params_dir, tmp_path):
    photos = require_reference() / "photos"
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate(["0.jpg", "1.jpg", "10.jpg"]):  # natural order: 0, 1, 10
        shutil.copy(photos / f"{i}.jpg", folder / name)
    out = tmp_path / "out"
    assert main(["reconstruct", str(folder), "--params", str(tiny_params_dir), "--out", str(out), "--quiet",
                 "--prune", "xstream", "--cache-size", "3000", "--query-points", "10,20 100,200"]) == 0
    check_outputs(out, 3, (392, 518))
    report = json.loads((out / "report.json").read_text())  # the tiny random model's fields of view are
    kept = sorted({0, 1, 2} - set(report["colmap_dropped_frames"]))  # unusable for COLMAP: frames left out
    assert report["colmap_images"] == len(kept)
    names = [["0.jpg", "1.jpg", "10.jpg"][i] for i in kept]  # the inputs' own names
    assert sorted(p.name for p in (out / "colmap" / "images").iterdir()) == names
    assert np.load(out / "predictions.npz")["track"].shape == (3, 2, 2)


def test_reconstruct_video(tiny_params_dir, tmp_path):
    import imageio.v3 as iio
    video = tmp_path / "clip.mp4"
    rng = np.random.default_rng(0)
    frames = (rng.uniform(size=(6, 64, 96, 3)) * 255).astype(np.uint8)
    iio.imwrite(video, frames, plugin="pyav", codec="libx264", fps=10)
    out = tmp_path / "out"
    assert main(["reconstruct", str(video), "--params", str(tiny_params_dir), "--out", str(out), "--quiet",
                 "--stride", "2"]) == 0
    check_outputs(out, 3, (350, 518))


def test_resume_is_bit_identical(tiny_params_dir, tiny_dir, tmp_path, monkeypatch):
    src = tmp_path / "in.npz"
    d = np.load(tiny_dir / "frames.npz")
    np.savez(src, images=d["images"][:8], query_points=d["query_points"])
    args = ["reconstruct", str(src), "--params", str(tiny_params_dir), "--quiet", "--prune", "xstream",
            "--cache-size", "64", "--quant", "kcvt"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0

    real = pipeline.make_step
    calls = {"n": 0}

    def interrupted(*a, **kw):  # make_step's signature: options pass through
        fn = real(*a, **kw)

        def wrapped(*b):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt  # the user presses Ctrl-C during frame 6
            return fn(*b)
        return wrapped

    monkeypatch.setattr(pipeline, "make_step", interrupted)
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "resumed"), "--save-state", str(state), "--save-every", "2"])
    assert not (tmp_path / "resumed").exists()
    assert json.loads((state / "checkpoint" / "meta.json").read_text())["frames_done"] == 4
    monkeypatch.setattr(pipeline, "make_step", real)
    assert main(args + ["--out", str(tmp_path / "resumed"), "--resume", str(state)]) == 0
    a, b = np.load(tmp_path / "full" / "predictions.npz"), np.load(tmp_path / "resumed" / "predictions.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not state.exists()  # spent after a completed run


def _img(path: Path, size=(80, 60), mode="RGB"):
    Image.new(mode, size, 128).save(path)
    return path


def test_input_errors(tiny_params_dir, tiny_dir, tmp_path, capsys):
    p = ["--params", str(tiny_params_dir), "--quiet"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in run_error(["reconstruct", str(empty), "--out", str(tmp_path / "o1"), *p], capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0.jpg").write_bytes(b"not an image at all")
    assert "0.jpg" in run_error(["reconstruct", str(bad), "--out", str(tmp_path / "o2"), *p], capsys)
    (tmp_path / "v.mp4").write_bytes(b"\x00garbage" * 100)
    assert "v.mp4" in run_error(["reconstruct", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "o3"), *p], capsys)
    thin = tmp_path / "thin"
    thin.mkdir()
    _img(thin / "0.png", size=(600, 5))
    assert "0.png" in run_error(["reconstruct", str(thin), "--out", str(tmp_path / "o4"), *p], capsys)
    nan = tmp_path / "nan.npz"
    imgs = np.zeros((2, 3, 28, 28), np.float32)
    imgs[1, 0, 3, 3] = np.nan
    np.savez(nan, images=imgs)
    assert "non-finite" in run_error(["reconstruct", str(nan), "--out", str(tmp_path / "o5"), *p], capsys)
    for i in range(1, 6):
        assert not (tmp_path / f"o{i}").exists()


def test_mixed_sizes_are_padded_with_a_warning(tiny_params_dir, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _img(folder / "0.png", size=(140, 112))
    _img(folder / "1.png", size=(140, 84))
    with caplog.at_level(logging.WARNING):
        assert main(["reconstruct", str(folder), "--params", str(tiny_params_dir), "--out", str(tmp_path / "o"),
                     "--quiet"]) == 0
    assert any("pad" in r.getMessage().lower() for r in caplog.records)
    assert np.load(tmp_path / "o" / "predictions.npz")["depth"].shape == (2, 420, 518, 1)


def test_checkpoint_that_is_not_streamvggt(tiny_dir, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file
    sd = load_file(str(tiny_dir / "weights.safetensors"))
    del sd["camera_head.embed_pose.bias"]
    sd["classifier.weight"] = np.zeros((2, 2), np.float32)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    src = tmp_path / "in.npz"
    np.savez(src, images=np.zeros((1, 3, 28, 28), np.float32))
    err = run_error(["reconstruct", str(src), "--checkpoint", str(bad), "--spec", str(tiny_dir / "spec.json"),
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")], capsys)
    assert "classifier.weight" in err and "camera_head.embed_pose.bias" in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_converted_on_the_fly_and_cached(tiny_dir, tmp_path):
    src = tmp_path / "in.npz"
    np.savez(src, images=np.load(tiny_dir / "frames.npz")["images"][:2])
    base = ["reconstruct", str(src), "--checkpoint", str(tiny_dir / "weights.pth"), "--spec",
            str(tiny_dir / "spec.json"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert main(base + ["--out", str(tmp_path / "b")]) == 0  # second run reads the orbax cache
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "predictions.npz")["depth"],
                                  np.load(tmp_path / "b" / "predictions.npz")["depth"])


def test_refuses_foreign_outdir(tiny_params_dir, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    src = tmp_path / "in.npz"
    np.savez(src, images=np.zeros((1, 3, 28, 28), np.float32))
    err = run_error(["reconstruct", str(src), "--params", str(tiny_params_dir), "--out", str(out), "--quiet"], capsys)
    assert "precious" in err
    assert (out / "thesis.tex").read_text() == "do not delete"
    # --overwrite writes our outputs into the directory; the user's file stays
    assert main(["reconstruct", str(src), "--params", str(tiny_params_dir), "--out", str(out), "--quiet",
                 "--overwrite"]) == 0
    assert (out / "thesis.tex").read_text() == "do not delete" and (out / "predictions.npz").is_file()
    # an OUTDIR that xsvggt wrote is updated without --overwrite
    assert main(["reconstruct", str(src), "--params", str(tiny_params_dir), "--out", str(out), "--quiet"]) == 0
    assert (out / "thesis.tex").read_text() == "do not delete"
