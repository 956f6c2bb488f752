"""Every entry point on 4 forced CPU devices, with parameters loaded from disk as users load them.

`load_params` commits the parameters to device 0; whatever builds a mesh must place them (and its
inputs) on it. One subprocess (XLA_FLAGS must be set before jax starts; this file is its script) saves
a micro model with `save_params`, then runs `xsvggt_jax.app.cli.main` in-process for: `reconstruct`
streaming, `--offline causal` and `full` (default --devices: all 4), `--attention ring` and `gather`,
`--offline causal --devices 1` (the reference of the sharded runs), `reconstruct-many` (slots on the
4 devices), `reconstruct-many --offline causal` (scenes of unequal length, the short ones batched along
`data`, the long one split along `seq`), `eval` (procedural), `train` (from the params dir) and
`view`'s scene building. Each entry point's outcome ("ok" or the exception) goes into one JSON
line that the tests below read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 4
FRAMES = 4                      # divisible by DEVICES: the offline default shards over all of them
HW = (28, 28)                   # micro: 2 x 2 patches
TOL = 1e-6                      # relative error of the sharded runs vs one device (as tests/test_seqpar.py)

ENTRY_POINTS = ("save-params", "stream", "offline-causal", "offline-full", "offline-ring", "offline-gather",
                "offline-one-device", "reconstruct-many", "offline-many", "eval", "train", "view")


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> dict:
    from conftest import child_xla_flags
    env = dict(os.environ, XLA_FLAGS=child_xla_flags(f"--xla_force_host_platform_device_count={DEVICES}"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), JAX_PLATFORMS="cpu")
    work = tmp_path_factory.mktemp("multidevice")
    done = subprocess.run([sys.executable, __file__, str(work)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == DEVICES
    return report


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_runs_on_several_devices(child, entry):
    assert child["runs"][entry] == "ok", child["runs"][entry]


@pytest.mark.parametrize("mode", ["offline-causal", "offline-full", "offline-ring", "offline-gather"])
def test_offline_default_shards_over_every_device(child, mode):
    """The default --devices is every device dividing the frame count: the runs did shard."""
    assert child["offline_devices"][mode] == DEVICES


@pytest.mark.parametrize("mode", ["offline-causal", "offline-ring", "offline-gather"])
def test_sharded_offline_equals_one_device(child, mode):
    errs = child["vs_one_device"][mode]
    assert {"depth", "camera_pose", "pts3d_in_other_view"} <= set(errs)
    assert max(errs.values()) <= TOL, errs


def test_offline_many_equals_single_scene_runs(child):
    """`reconstruct-many --offline causal --max-frames-per-device 3` over scenes of 2, 2 and 4 frames: the
    two 2-frame scenes share one forward (split along `data`), the 4-frame one is split along `seq` over
    the 4 devices; each scene equals its single-scene offline run on one device (the 4-frame one:
    `offline-one-device`)."""
    got = child["offline_many"]
    assert set(got["status"].values()) == {"done"}, got["status"]
    assert got["forwards"] == 2 and got["devices"] == {"short2a": 1, "short2b": 1, "scene0": DEVICES}
    assert set(got["modes"].values()) == {"offline_causal streamvggt"}, got["modes"]
    assert set(got["vs_single"]) == {"short2a", "short2b", "scene0"}
    for scene, errs in got["vs_single"].items():
        assert {"depth", "camera_pose", "pts3d_in_other_view"} <= set(errs)
        assert max(errs.values()) <= TOL, (scene, errs)


# ------------------------------------------------------------------------------------------- the child
def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _run(name: str, runs: dict, fn) -> None:
    try:
        fn()
        runs[name] = "ok"
    except BaseException as e:  # noqa: BLE001 - a SystemExit from the CLI, or a crash: recorded
        runs[name] = f"{type(e).__name__}: {e}"[:1500]
        traceback.print_exc()


def _main(work: Path) -> None:
    import jax

    from xsvggt_jax.app.cli import main
    from xsvggt_jax.app.view import build_scene
    from xsvggt_jax.config import ModelConfig
    from xsvggt_jax.nn.model import init_params
    from xsvggt_jax.weights.params import save_params

    assert jax.device_count() == DEVICES
    cfg = ModelConfig.preset("micro")
    params_dir = work / "params"
    runs: dict = {}
    _run("save-params", runs, lambda: save_params(init_params(cfg, jax.random.key(0)), params_dir, cfg))
    rng = np.random.default_rng(0)
    scenes = []
    for i, n in enumerate((FRAMES, FRAMES + 2)):
        scenes.append(work / f"scene{i}.npz")
        np.savez(scenes[-1], images=rng.uniform(size=(n, 3, *HW)).astype(np.float32))
    weights = ["--params", str(params_dir), "--quiet"]
    outs = {}

    def reconstruct(name: str, *flags: str):
        outs[name] = work / name
        _run(name, runs, lambda: main(["reconstruct", str(scenes[0]), *weights, "--out", str(outs[name]), *flags]))

    reconstruct("stream")
    reconstruct("offline-causal", "--offline", "causal")
    reconstruct("offline-full", "--offline", "full")
    reconstruct("offline-ring", "--offline", "causal", "--attention", "ring")
    reconstruct("offline-gather", "--offline", "causal", "--attention", "gather")
    reconstruct("offline-one-device", "--offline", "causal", "--devices", "1")
    _run("reconstruct-many", runs, lambda: main(["reconstruct-many", *map(str, scenes), *weights,
                                                 "--out", str(work / "many")]))
    short = {}
    for name in ("short2a", "short2b"):
        short[name] = work / f"{name}.npz"
        np.savez(short[name], images=rng.uniform(size=(2, 3, *HW)).astype(np.float32))
    offline_inputs = {**short, "scene0": scenes[0]}
    _run("offline-many", runs, lambda: main(["reconstruct-many", *map(str, offline_inputs.values()), *weights,
                                             "--offline", "causal", "--max-frames-per-device", "3",
                                             "--out", str(work / "offline-many")]))
    _run("eval", runs, lambda: main(["eval", "--dataset", "procedural", "--task", "pose", "--settings", "none",
                                     "--sequences", "1", "--frames-per-sequence", str(FRAMES), *weights,
                                     "--out", str(work / "eval")]))
    # the clip, loss and partition of tests/test_train_step.py's fixture: its program (device 0 of a data
    # mesh of one), so the run's compilation cache compiles it once for both
    _run("train", runs, lambda: main(["train", "--init", str(params_dir), "--steps", "2", "--size", "28x42",
                                      "--frames", "2", "--align", "none", "--freeze", "upstream",
                                      "--eval-scenes", "0", "--out", str(work / "train"), "--quiet"]))

    def view():
        import viser
        server = viser.ViserServer(host="127.0.0.1", port=0, verbose=False)
        try:
            build_scene(server, outs["stream"])
        finally:
            server.stop()

    _run("view", runs, view)

    def report(name: str) -> dict:
        path = outs[name] / "report.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def predictions(name: str) -> dict:
        path = outs[name] / "predictions.npz"
        return dict(np.load(path)) if path.exists() else {}

    ref = predictions("offline-one-device")
    result = {"devices": jax.device_count(), "runs": runs,
              "offline_devices": {m: report(m).get("devices") for m in
                                  ("offline-causal", "offline-full", "offline-ring", "offline-gather")},
              "vs_one_device": {}}
    for mode in ("offline-causal", "offline-ring", "offline-gather"):
        got = predictions(mode)
        result["vs_one_device"][mode] = {k: _rel(got[k], ref[k]) for k in
                                         ("depth", "depth_conf", "pts3d_in_other_view", "conf", "camera_pose")
                                         if k in got and k in ref}
    result["offline_many"] = _offline_many(work / "offline-many", short, params_dir, {"scene0": ref})
    print(json.dumps(result))


def _offline_many(root: Path, inputs: dict, params_dir: Path, refs: dict) -> dict:
    """The offline (causal) many-scene run's summary, and each scene against its single-scene run on one
    device: `refs` ({scene: predictions}) or `run_offline` of `inputs` ({scene: input path})."""
    from xsvggt_jax.io.sources import open_frames
    from xsvggt_jax.stream.offline import run_offline
    from xsvggt_jax.weights.params import load_params

    if not (root / "summary.json").exists():
        return {"status": {}}
    summary = json.loads((root / "summary.json").read_text())
    params, cfg = load_params(params_dir)
    out = {"status": {e["scene"]: e["status"] for e in summary["scenes"]},
           "forwards": sum(p["steps"] for p in summary["processes"]), "devices": {}, "modes": {}, "vs_single": {}}
    refs = {**{k: v for k, v in refs.items() if v}, **{name: run_offline(cfg, params, open_frames(path), None, causal=True, devices=1).predictions
                       for name, path in inputs.items()}}
    for name, ref in refs.items():
        report = json.loads((root / name / "report.json").read_text())
        out["devices"][name], out["modes"][name] = report["devices"], f"{report['mode']} {report['model']}"
        got = dict(np.load(root / name / "predictions.npz"))
        out["vs_single"][name] = {k: _rel(got[k], ref[k]) for k in
                                  ("depth", "depth_conf", "pts3d_in_other_view", "conf", "camera_pose")}
    return out


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
