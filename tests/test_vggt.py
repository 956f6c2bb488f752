"""VGGT-1B as a model (`--model vggt`): its checkpoint as VGGT ships it, its default mode, the warning
when it streams, and its evaluation protocol (`eval.settings.PROTOCOLS`).

The reference `offline_full` run is upstream XStreamVGGT's mask-less batch forward, i.e. VGGT's forward
(../shared/reference/README.md), so the reference weights saved as a VGGT `model.pt` and run with
`--model vggt` (offline full by default) must reproduce it.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from _refs import OFFLINE_TRACK_SCORE_TOL, OUTPUTS, TOL, write_state_dict_pt
from conftest import micro_frames, rel_err, run_error
from xsvggt_jax.app.cli import main
from xsvggt_jax.config import MODELS, ModelConfig

WARNING = "trained with full attention"


@pytest.fixture(scope="module")
def micro_dir(micro, tmp_path_factory):
    """The micro model saved as a params directory (StreamVGGT, as `save_params` records by default)."""
    from xsvggt_jax.weights.params import save_params

    cfg, params = micro
    return save_params(params, tmp_path_factory.mktemp("micro") / "params", cfg)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]


def test_model_is_an_identity_not_an_architecture():
    published = ModelConfig.published()
    vggt = published.replace(model="vggt")
    assert vggt.architecture() == published.architecture()  # same parameters: checksums, conversion cache
    assert vggt.to_spec() == published.to_spec()
    assert ModelConfig.from_dict(json.loads(json.dumps(vggt.to_dict()))) == vggt
    assert vggt.model_info.offline == "full" and published.model_info.offline is None
    assert MODELS["streamvggt"].stream_warning() is None and WARNING in MODELS["vggt"].stream_warning()


def test_vggt_checkpoint_converts_and_runs_offline_full(tiny_dir, tmp_path, caplog):
    """The reference weights written as VGGT ships `model.pt` (a raw state_dict in torch.save's zip
    layout), converted with --model vggt: the params directory records the model, and `reconstruct`
    runs it offline full without being told (no warning) and matches upstream's mask-less forward."""
    from xsvggt_jax.weights.torch_reader import read_state_dict

    ckpt = write_state_dict_pt(tmp_path / "model.pt", read_state_dict(tiny_dir / "weights.pth"))
    params = tmp_path / "params"
    assert main(["convert", str(ckpt), "--spec", str(tiny_dir / "spec.json"), "--model", "vggt",
                 "--out", str(params)]) == 0
    assert json.loads((params / "config.json").read_text())["model"]["model"] == "vggt"
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["reconstruct", str(tiny_dir / "frames.npz"), "--params", str(params), "--out", str(out),
                     "--dtype", "float32"]) == 0
    assert warnings_of(caplog) == []
    report = json.loads((out / "report.json").read_text())
    assert (report["mode"], report["model"], report["frames"]) == ("offline_full", "vggt", 20)
    preds, ref = np.load(out / "predictions.npz"), np.load(tiny_dir / "offline_full.npz")
    assert np.abs(ref["track"][1:] - ref["track"][:1]).max() > 1.0  # full attention moves the tracks: checked
    errs = {k: rel_err(preds[k], ref[k]) for k in OUTPUTS}
    print("--model vggt vs offline_full rel err:", {k: f"{v:.2e}" for k, v in errs.items()})
    for k, e in errs.items():  # vis / track_conf: upstream's own float32 noise floor (see _refs.py)
        assert e <= (OFFLINE_TRACK_SCORE_TOL if k in ("vis", "track_conf") else TOL), (k, e)


def test_streaming_vggt_warns_in_one_line(micro_dir, tmp_path, caplog, capsys):
    scene = tmp_path / "scene.npz"
    np.savez(scene, images=micro_frames(2)[:, 0].transpose(0, 3, 1, 2))
    weights = ["--params", str(micro_dir), "--model", "vggt"]
    err = run_error(["reconstruct", str(scene), *weights, "--save-state", str(tmp_path / "st"),
                     "--out", str(tmp_path / "no")], capsys)
    assert "VGGT-1B runs --offline full by default: add --stream" in err, err
    with caplog.at_level(logging.WARNING):
        assert main(["reconstruct", str(scene), *weights, "--stream", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    (line,) = warnings_of(caplog)
    assert line.startswith("VGGT-1B was trained with full attention") and "\n" not in line
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert (report["mode"], report["model"]) == ("stream", "vggt")


def test_eval_vggt_runs_its_protocol(micro_dir, tmp_path, caplog):
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "--dataset", "procedural", "--task", "pose", "--params", str(micro_dir), "--model",
                     "vggt", "--sequences", "2", "--frames-per-sequence", "3", "--out", str(out), "--quiet"]) == 0
    assert warnings_of(caplog) == []  # offline: as trained
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"]["model"] == "vggt" and doc["protocol"] == {"points": "depth", "pose_pairs": "pooled"}
    (setting,) = doc["settings"]
    assert (setting["name"], setting["offline"], setting["cache"], setting["cache_bytes"]) == \
        ("offline-full", "full", None, 0)
    assert setting["aggregate"]["sequences_scored"] == 2


def test_depth_points_are_unprojected_with_the_predicted_cameras():
    """VGGT's recon points: depth * K^-1 [u, v, 1] in each predicted camera, moved to the world (frame 0's
    camera); StreamVGGT's: the point map as predicted."""
    from xsvggt_jax.eval.runner import predicted_points

    h, w, fov = 4, 6, 1.2
    depth = np.random.default_rng(0).uniform(1, 2, (2, h, w, 1)).astype(np.float32)
    t1 = np.array([0.5, -0.25, 2.0], np.float32)
    pose = np.array([[0, 0, 0, 0, 0, 0, 1, fov, fov], [*t1, 0, 0, 0, 1, fov, fov]], np.float32)  # R = I
    preds = {"depth": depth, "camera_pose": pose, "pts3d_in_other_view": np.zeros((2, h, w, 3), np.float32)}
    v, u = np.mgrid[:h, :w].astype(np.float64)
    fx, fy = (w / 2) / np.tan(fov / 2), (h / 2) / np.tan(fov / 2)
    cam = np.stack([(u - w / 2) / fx, (v - h / 2) / fy, np.ones_like(u)], -1) * depth
    np.testing.assert_allclose(predicted_points(preds, "depth"), np.stack([cam[0], cam[1] - t1]), rtol=1e-5, atol=1e-6)
    assert predicted_points(preds, "pointmap") is preds["pts3d_in_other_view"]


def test_pooled_pose_pairs_score_every_pair_together():
    """VGGT's AUC: over the pairs of all sequences at once, not the mean of per-sequence AUCs."""
    from xsvggt_jax.eval.runner import _aggregate, pair_metrics

    exact, lost = (np.zeros(1), np.zeros(1)), (np.full(3, 90.0), np.full(3, 90.0))
    per_seq = [{"ate": 1.0, **pair_metrics(*exact)}, {"ate": 3.0, **pair_metrics(*lost)}]
    mean = _aggregate("pose", per_seq)
    pooled = _aggregate("pose", per_seq, [exact, lost])
    assert mean["auc@30"] == pytest.approx(0.5) and mean["ate"] == pooled["ate"] == 2.0
    assert (pooled["auc@30"], pooled["rra@30"], pooled["rta@30"]) == (0.25, 0.25, 0.25)


def test_random_frames_keep_their_ground_truth():
    """VGGT's sampling (`RandomState(seed).choice`, in the drawn order): frames, ids and poses stay together."""
    from xsvggt_jax.data.base import DatasetInfo, Sequence
    from xsvggt_jax.eval.command import take_frames

    info = DatasetInfo("toy", None, None, ("pose",), "all")
    extr = np.tile(np.eye(4, dtype=np.float32), (10, 1, 1))
    extr[:, 0, 3] = np.arange(10)
    seq = Sequence("s", tuple(f"f{i}" for i in range(10)), lambda i: np.full((2, 2, 3), i, np.uint8), None, None,
                   extr, info)
    picked = take_frames(seq, 4, np.random.RandomState(0))
    drawn = np.random.RandomState(0).choice(10, 4, replace=False)
    assert picked.frame_ids == tuple(f"f{i}" for i in drawn) and list(picked.extrinsics[:, 0, 3]) == list(drawn)
    assert [int(picked.rgb(k)[0, 0, 0]) for k in range(4)] == list(drawn)
    assert take_frames(seq, 4).frame_ids == ("f0", "f1", "f2", "f3")
