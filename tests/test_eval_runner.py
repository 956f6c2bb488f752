"""`evaluate` and `xsvggt eval` end to end on tiny procedural sequences with the reference tiny model.

Cost: one compile of the streaming step per setting (none, xstream-int4:64), shared by every test
here (the runner memoises its jitted steps), plus one `xsvggt reconstruct` subprocess that runs
while the in-process evaluation compiles.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_error
from xsvggt_jax.data import SceneConfig, procedural_dataset
from xsvggt_jax.eval.report import write_report
from xsvggt_jax.eval.runner import TASKS, EvalConfigError, PREDICTION_KEYS, evaluate

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = "none,xstream-int4:64"
SCENE = SceneConfig(frames=3, height=56, width=70, num_boxes=1, num_spheres=1)  # the tiny model's frame size


@pytest.fixture(scope="module")
def dataset():
    return procedural_dataset(config=SCENE, num_sequences=2, seed=0)


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory, tiny_params, tiny_cfg) -> Path:
    from xsvggt_jax.weights.params import save_params
    return save_params(tiny_params, tmp_path_factory.mktemp("eval") / "params", tiny_cfg)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, dataset, params_dir, tiny_params, tiny_cfg):
    """(recon EvalResults with predictions, reconstruct's predictions.npz of sequence 0)."""
    work = tmp_path_factory.mktemp("reconstruct")
    # 56x70: preprocessing at 70 px is the identity; an .npz input holds [S, 3, H, W]
    np.savez(work / "frames.npz", images=dataset[0].images().transpose(0, 3, 1, 2))
    proc = subprocess.Popen([sys.executable, "-m", "xsvggt_jax.app.cli", "reconstruct", str(work / "frames.npz"),
                             "--params", str(params_dir), "--out", str(work / "out"), "--quiet"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        results = evaluate(tiny_params, tiny_cfg, dataset, SETTINGS, "recon", keep_predictions=True)
    finally:
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return results, dict(np.load(work / "out" / "predictions.npz"))


def _finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_recon_end_to_end_writes_table_and_plot(evaluated, tmp_path):
    results, _ = evaluated
    assert [r.setting.name for r in results.settings] == ["none", "xstream-int4:64"]
    for r in results.settings:
        assert _finite(r.aggregate[c] for c in TASKS["recon"].columns), r.aggregate
        assert r.aggregate["sequences_scored"] == 2 and set(r.sequences) == {"eval-small-0000", "eval-small-0001"}
        assert r.ms_per_frame > 0 and r.peak_rss_bytes > 0
    none, int4 = results.settings
    assert int4.cache["cache_bytes"] < none.cache["cache_bytes"]
    assert results.frame_hw == {"eval-small-0000": (56, 70), "eval-small-0001": (56, 70)}

    paths = write_report(results, tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert doc["producer"] == "xsvggt-jax" and doc["kind"] == "eval" and doc["task"] == "recon"
    assert [s["name"] for s in doc["settings"]] == ["none", "xstream-int4:64"]
    assert doc["settings"][1]["cache"]["quant"] == "kcvt" and doc["settings"][1]["cache"]["budget"] == 64
    assert doc["settings"][0]["sequences"]["eval-small-0001"]["frames"] == 3
    table = paths["markdown"].read_text().splitlines()
    rows = [line for line in table if line.startswith("| `")]
    assert len(rows) == 2 and rows[1].startswith("| `xstream-int4:64` |")
    assert "acc" in table[[i for i, l in enumerate(table) if l.startswith("| setting")][0]]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_vs_bytes.png", "results.json", "results.md"]


def test_uncompressed_predictions_identical_to_reconstruct(evaluated):
    results, recon = evaluated
    ours = results.predictions["none"]["eval-small-0000"]
    for key in PREDICTION_KEYS:
        np.testing.assert_array_equal(ours[key], recon[key], err_msg=key)
    # the compressed setting really ran another cache: its predictions differ
    assert not np.array_equal(results.predictions["xstream-int4:64"]["eval-small-0000"]["depth"], ours["depth"])


@pytest.mark.parametrize("task", ["video-depth", "pose"])
def test_other_tasks_are_scored(evaluated, dataset, tiny_params, tiny_cfg, task):
    results = evaluate(tiny_params, tiny_cfg, dataset, SETTINGS, task)  # compiled steps are reused
    for r in results.settings:
        assert _finite(r.aggregate[c] for c in TASKS[task].columns), r.aggregate
        assert r.aggregate["sequences_scored"] == 2
    if task == "video-depth":
        assert results.settings[0].aggregate["valid_pixels"] == 2 * 3 * 56 * 70


def test_video_depth_is_scored_at_the_dataset_resolution(evaluated, tiny_params, tiny_cfg):
    """84x105 frames enter the model resized to 56x70 (whole image): as upstream, the predicted depth
    is resized back (OpenCV bicubic) and scored against the full-resolution ground truth."""
    from xsvggt_jax.eval.depth import evaluate_depth, resize_depth

    ds = procedural_dataset(config=SceneConfig(frames=3, height=84, width=105, num_boxes=1, num_spheres=1),
                            num_sequences=1, seed=5)
    results = evaluate(tiny_params, tiny_cfg, ds, "none", "video-depth", keep_predictions=True)
    got = results.settings[0].sequences["eval-small-0005"]
    assert results.frame_hw == {"eval-small-0005": (56, 70)} and got["valid_pixels"] == 3 * 84 * 105
    pred = results.predictions["none"]["eval-small-0005"]["depth"][..., 0]
    expected = evaluate_depth(resize_depth(pred, (84, 105)), ds[0].depths(), align="scale")
    assert got["abs_rel"] == expected["abs_rel"] and got["delta_1.25"] == expected["delta_1.25"]


def test_checks_come_before_model_work(dataset, tiny_cfg):
    with pytest.raises(EvalConfigError, match="unknown task"):
        evaluate({}, tiny_cfg, dataset, "none", "depth")
    with pytest.raises(EvalConfigError, match="multiple of the patch size"):
        evaluate({}, tiny_cfg, dataset, "none", "pose", frame_size=60)
    with pytest.raises(ValueError, match="int3"):
        evaluate({}, tiny_cfg, dataset, "none,xstream-int3", "pose")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_eval_procedural_matches_the_api(evaluated, params_dir, tiny_params, tiny_cfg, tmp_path, capsys):
    from xsvggt_jax.app.cli import main

    out = tmp_path / "ev"
    main(["eval", "--dataset", "procedural", "--task", "pose", "--params", str(params_dir), "--settings", SETTINGS,
          "--sequences", "2", "--frames-per-sequence", "3", "--out", str(out), "--quiet"])
    assert sorted(p.name for p in out.iterdir()) == [".xsvggt-manifest.json", "accuracy_vs_bytes.png", "results.json",
                                                     "results.md"]
    doc = json.loads((out / "results.json").read_text())
    # the CLI renders eval-small at the model's size: the same scenes through the API give the same numbers
    ds = procedural_dataset("eval-small", 2, 0, config=SceneConfig(frames=3, height=56, width=70))
    api = evaluate(tiny_params, tiny_cfg, ds, SETTINGS, "pose")
    for entry, r in zip(doc["settings"], api.settings):
        assert entry["name"] == r.setting.name
        for c in TASKS["pose"].columns:
            assert entry["aggregate"][c] == pytest.approx(r.aggregate[c], rel=1e-6, abs=1e-9), c
    # a second run replaces its own output directory
    main(["eval", "--dataset", "procedural", "--task", "pose", "--params", str(params_dir), "--settings", "none",
          "--sequences", "1", "--frames-per-sequence", "3", "--out", str(out), "--quiet"])
    assert [s["name"] for s in json.loads((out / "results.json").read_text())["settings"]] == ["none"]


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "kitty", "--task", "pose"], "unknown dataset 'kitty'"),
    (["--dataset", "procedural", "--task", "depth"], "unknown task 'depth'"),
    (["--dataset", "procedural", "--task", "pose", "--settings", "xstream-int4,xstream:x"], "xstream:x"),
    (["--dataset", "procedural", "--task", "pose", "--settings", "xstream:4294967296"], "32-bit"),
    (["--dataset", "7scenes", "--task", "recon", "--checkpoint", "w.pth"], "DATA"),
    (["missing-folder", "--dataset", "7scenes", "--task", "recon", "--checkpoint", "w.pth"], "not found"),
    (["--dataset", "tum", "--task", "pose"], "--params or --checkpoint"),
    (["--dataset", "procedural", "--task", "pose", "--sequences", "0"], "--sequences must be positive"),
    (["--dataset", "procedural", "--task", "pose", "--frame-size", "60"], "multiple of the patch size"),
])
def test_cli_errors_are_one_line(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = run_error(["eval", *argv, "--out", str(tmp_path / "ev"), "--quiet"], capsys)
    assert words in err
    assert not (tmp_path / "ev").exists() and not list(tmp_path.glob(".ev*"))


def test_cli_refuses_a_user_directory(params_dir, tmp_path, capsys):
    from xsvggt_jax.app.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["eval", "--dataset", "procedural", "--task", "pose", "--out", str(out), "--quiet"]
    err = run_error(argv, capsys)
    assert "was not written by xsvggt" in err and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    # the flag the message names is one eval has: it writes eval's files and keeps the user's
    main([*argv, "--overwrite", "--params", str(params_dir), "--settings", "none", "--sequences", "1",
          "--frames-per-sequence", "3"])
    assert sorted(p.name for p in out.iterdir()) == [".xsvggt-manifest.json", "accuracy_vs_bytes.png", "notes.txt",
                                                     "results.json", "results.md"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_video_depth_without_valid_ground_truth_is_na(dataset, tiny_params, tiny_cfg, tmp_path, caplog):
    """A sequence with no valid ground-truth depth pixel: a warning and n/a, as recon's too few points;
    the other sequences are still scored."""
    import dataclasses

    from xsvggt_jax.data import Dataset

    empty = dataclasses.replace(dataset[1], load_depth=_no_depth)
    ds = Dataset(info=dataset.info, sequences=(dataset[0], empty))
    with caplog.at_level("WARNING"):
        results = evaluate(tiny_params, tiny_cfg, ds, "none", "video-depth")
    r = results.settings[0]
    assert "no valid ground-truth depth pixel" in r.sequences["eval-small-0001"]["error"]
    assert "no valid ground-truth depth pixel" in caplog.text
    assert r.aggregate["sequences_scored"] == 1 and r.aggregate["valid_pixels"] == 3 * 56 * 70
    only = Dataset(info=dataset.info, sequences=(empty,))
    r = evaluate(tiny_params, tiny_cfg, only, "none", "video-depth").settings[0]
    assert r.aggregate == {"sequences_scored": 0}
    row = [line for line in write_report(evaluate(tiny_params, tiny_cfg, only, "none", "video-depth"), tmp_path)
           ["markdown"].read_text().splitlines() if line.startswith("| `none`")][0]
    assert row.split(" | ")[1:3] == ["n/a", "n/a"], row


def _no_depth(i: int) -> np.ndarray:
    return np.zeros((56, 70), np.float32)


def test_one_frame_sequences_report_no_ms_per_frame(dataset, tiny_cfg, tmp_path, monkeypatch):
    """The first frame of a sequence includes compilation: it is never timed as ms/frame, so a setting
    whose sequences all have one frame reports n/a (null in results.json)."""
    from xsvggt_jax.data import Dataset
    from xsvggt_jax.eval import runner
    from xsvggt_jax.eval.command import take_frames

    def fake_stream(params, cfg, cache_cfg, frames):  # first frame: "compile"; then 10 ms, 30 ms
        preds = {k: np.ones((len(frames), 56, 70, 1), np.float32) for k in ("depth",)}
        return preds, [5.0, 0.01, 0.03][:len(frames)], {"cache_bytes": 1}

    monkeypatch.setattr(runner, "stream_sequence", fake_stream)
    one = Dataset(info=dataset.info, sequences=(take_frames(dataset[0], 1),))
    results = evaluate({}, tiny_cfg, one, "none", "video-depth")
    r = results.settings[0]
    assert math.isnan(r.ms_per_frame) and math.isnan(r.sequences["eval-small-0000"]["ms_per_frame"])
    paths = write_report(results, tmp_path)
    assert json.loads(paths["json"].read_text())["settings"][0]["ms_per_frame"] is None
    row = [line for line in paths["markdown"].read_text().splitlines() if line.startswith("| `none`")][0]
    assert row.split(" | ")[-2] == "n/a", row
    mixed = Dataset(info=dataset.info, sequences=(take_frames(dataset[0], 1), dataset[1]))
    r = evaluate({}, tiny_cfg, mixed, "none", "video-depth").settings[0]
    assert r.ms_per_frame == pytest.approx(20.0)
    assert r.sequences["eval-small-0001"]["ms_per_frame"] == pytest.approx(20.0)
