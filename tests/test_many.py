"""`xsvggt reconstruct-many`: continuous batching over scenes of unequal lengths, bad scenes, resume,
and two processes on one coordinator (CPU, the tiny reference model)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_frames, run_error
from xsvggt_jax.many.scenes import IDENTITY
from xsvggt_jax.app.cli import main
from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.stream.pool import init_pool, make_pool_step
from xsvggt_jax.stream.step import make_step
from xsvggt_jax.weights.params import save_params
from xsvggt_jax.many import name_scenes, process_share

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = {"s2a": 2, "s4": 4, "s3": 3, "s7": 7, "s2b": 2}  # sorted names: s2a s2b s3 s4 s7
FLAGS = ["--quiet", "--slots", "2"]  # --slot-compute auto: sequential on this CPU, bit-identical at any B


@pytest.fixture(scope="module")
def inputs(tiny_cfg, tiny_params, tiny_frames, tmp_path_factory):
    """params dir, five good scenes (slices of the reference frames), one with an out-of-range frame 1
    (fails mid-run) and one truncated file (fails when opened)."""
    base = tmp_path_factory.mktemp("many")
    params = save_params(tiny_params, base / "params", tiny_cfg)
    images, qp = tiny_frames
    scenes, start = {}, 0
    for name, n in LENGTHS.items():
        scenes[name] = base / f"{name}.npz"
        np.savez(scenes[name], images=images[start:start + n], query_points=qp)
        start = (start + n) % (len(images) - 9)
    bad = images[:3].copy()
    bad[1] *= 4.0  # values up to 4: the frame check refuses it when the scene reaches frame 1
    np.savez(base / "badrange.npz", images=bad, query_points=qp)
    (base / "truncated.npz").write_bytes((scenes["s3"]).read_bytes()[:5000])
    return params, scenes, [base / "badrange.npz", base / "truncated.npz"]


def predictions(out: Path) -> dict:
    with np.load(out / "predictions.npz") as d:
        return {k: d[k] for k in d.files}


def files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def many_run(inputs, tmp_path_factory):
    params, scenes, bad = inputs
    root = tmp_path_factory.mktemp("root") / "out"
    argv = ["reconstruct-many", *map(str, [*scenes.values(), *bad]), "--params", str(params), "--out", str(root),
            *FLAGS]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return root, argv


def test_many_matches_single_runs_and_reports_bad_scenes(inputs, many_run, tmp_path):
    params, scenes, bad = inputs
    root, _ = many_run
    summary = json.loads((root / "summary.json").read_text())
    status = {e["scene"]: e["status"] for e in summary["scenes"]}
    assert status == {**{n: "done" for n in LENGTHS}, "badrange": "failed", "truncated": "failed"}
    errors = {e["scene"]: e["error"] for e in summary["scenes"] if e["error"]}
    assert "[0, 1]" in errors["badrange"] and "truncated" in errors["truncated"]
    for e in summary["scenes"]:
        if e["status"] == "done":
            assert e["frames"] == LENGTHS[e["scene"]] and e["cache_bytes"] > 0
    assert 0.0 <= summary["device_idle_fraction"] < 1.0
    # nothing of the failed scenes, no staging leftovers
    assert sorted(p.name for p in root.iterdir()) == sorted([*LENGTHS, "summary.json"])
    for name, n in LENGTHS.items():
        assert predictions(root / name)["depth"].shape == (n, 56, 70, 1)
    # s7 starts in a reset slot (four scenes ran before it in the pool of B = 2) and is the pool's
    # longest scene; s2a is its shortest, its uncompressed cache sized for s7 (the attention chunks are
    # not, `cache.prefix_chunk`): both bit-identical to their single runs
    for name in ("s7", "s2a"):
        single = tmp_path / name
        assert main(["reconstruct", str(scenes[name]), "--params", str(params), "--out", str(single), "--quiet"]) == 0
        ours, ref = predictions(root / name), predictions(single)
        assert sorted(ours) == sorted(ref)
        for k in ref:
            np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{name}: {k}")
        assert files(root / name) == files(single)
        report, ref_report = (json.loads((d / "report.json").read_text()) for d in (root / name, single))
        assert report["cache_bytes"] == ref_report["cache_bytes"] and report["frames"] == ref_report["frames"]
        # the same writer (io.scene.write_scene): the single run's keys in its order, less the cache's
        # fill per frame (a pool does not measure it), then the scene's identity (its input); and its
        # values but the timings
        assert list(report) == [k for k in ref_report if k != "cache_filled_bytes_per_frame"] + [IDENTITY]
        timed = {"compile_seconds", "seconds_per_frame", "total_seconds", "latency_s", "peak_memory_bytes"}
        assert {k: v for k, v in report.items() if k not in timed | {IDENTITY}} == \
            {k: v for k, v in ref_report.items() if k in report and k not in timed}


def test_a_short_scene_keeps_its_chunks_in_a_pool_sized_for_a_long_one(micro):
    """The runs above cannot see an attention chunk sized to the cache's capacity: at 56x70 a 2- and a
    7-frame cache both round up to one 2,048-slot chunk. Here chunk = 9 (one micro frame: 4 patches + 5
    special tokens) and the 3-frame scene's own cache holds 27 slots, the pool's (sized for 40 frames)
    360: a capacity-sized chunk would be 27 vs 360, `cache.prefix_chunk` is 9 in both. The scene's pool
    slot (sequential, as reconstruct-many on CPU) must be bit-identical to its own run. No query
    points: the chunks are upstream of every head, and the track head would double the compile time."""
    cfg, params = micro
    cc = CacheConfig(prune="none", chunk=9)
    hw = (28, 28)
    frames = jnp.asarray(micro_frames(3, seed=4))                                   # [3, 1, H, W, 3]
    own, run = init_cache(cfg, cc, 1, hw, max_frames=3), make_step(cfg, cc)
    pool = init_pool(init_cache(cfg, cc, 1, hw, max_frames=40), 2)
    assert (own.global_kv[0].k.shape[2], pool.global_kv[0].k.shape[3]) == (27, 360)
    pool_run = make_pool_step(cfg, cc, slot_compute="sequential")
    other = jnp.asarray(micro_frames(3, seed=5))                   # slot 1: another scene, same pool
    for t in range(3):
        own, ref = run(params, own, frames[t])
        pool, out = pool_run(params, pool, jnp.concatenate([frames[t], other[t]]))
        for k in ref:
            np.testing.assert_array_equal(np.asarray(out[k][:1]), np.asarray(ref[k]), err_msg=f"frame {t}: {k}")


def test_scenes_with_different_query_counts_share_a_pool(inputs, tiny_frames, tmp_path):
    """--query-pools shared: a 3-point and an 8-point scene run in one pool of 8 points a slot (the
    3 points padded and masked); each scene keeps its own points, within 1e-5 of its single run (the
    padded shapes change the last bits). split: one pool per point count."""
    params, scenes, _ = inputs
    images, qp = tiny_frames
    few = tmp_path / "few.npz"
    np.savez(few, images=images[:3], query_points=qp[:3])
    argv = [str(few), str(scenes["s4"]), "--params", str(params), "--quiet", "--slots", "2"]
    pools = {}
    for mode in ("shared", "split"):
        root = tmp_path / mode
        assert main(["reconstruct-many", *argv, "--out", str(root), "--query-pools", mode]) == 0
        pools[mode] = json.loads((root / "summary.json").read_text())["processes"][0]["pools"]
    assert pools == {"shared": 1, "split": 2}
    single = tmp_path / "single"
    assert main(["reconstruct", str(few), "--params", str(params), "--out", str(single), "--quiet"]) == 0
    ours, ref = predictions(tmp_path / "shared" / "few"), predictions(single)
    assert sorted(ours) == sorted(ref) and ours["vis"].shape == ref["vis"].shape == (3, 3)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert predictions(tmp_path / "shared" / "s4")["track"].shape == (4, len(qp), 2)


def test_many_error_line(many_run, capsys):
    root, argv = many_run
    msg = run_error(argv, capsys)
    assert msg == f"xsvggt: error: 2 of 7 scenes failed (see {root / 'summary.json'})"


_RESUMED: dict = {}


def resumed_root(inputs, tmp_path_factory) -> Path:
    """ROOT of one process with one slot over s2a, s2b, s3, resumed after a run that completed s2a
    only (an interrupted run: s2a published, the others not). Cached for the module."""
    if "root" in _RESUMED:
        return _RESUMED["root"]
    params, scenes, _ = inputs
    root = tmp_path_factory.mktemp("resumed") / "out"
    argv = ["reconstruct-many", "--params", str(params), "--out", str(root), "--quiet", "--slots", "1"]
    assert main(argv + [str(scenes["s2a"])]) == 0
    _RESUMED["s2a_mtime"] = (root / "s2a" / "predictions.npz").stat().st_mtime_ns
    assert main(argv + [str(scenes[n]) for n in ("s2a", "s2b", "s3")]) == 0
    _RESUMED["root"] = root
    return root


def test_many_resumes_without_redoing_finished_scenes(inputs, many_run, tmp_path_factory):
    root = resumed_root(inputs, tmp_path_factory)
    summary = json.loads((root / "summary.json").read_text())
    assert {e["scene"]: e["status"] for e in summary["scenes"]} == {"s2a": "skipped", "s2b": "done", "s3": "done"}
    assert (root / "s2a" / "predictions.npz").stat().st_mtime_ns == _RESUMED["s2a_mtime"]
    assert summary["processes"][0]["frames"] == LENGTHS["s2b"] + LENGTHS["s3"]  # s2a was not stepped again


def test_scene_names_are_unique_and_split_deterministically(tmp_path):
    paths = [tmp_path / "a" / "x.npz", tmp_path / "b" / "x.npz", tmp_path / "x-2.npz", tmp_path / "y"]
    scenes = name_scenes(paths + paths[:1])
    names = [s.name for s in scenes]
    assert len(set(n.lower() for n in names)) == len(names) == 4
    assert {"x", "y", "x-2"} <= set(names)
    assert name_scenes(reversed(paths)) == scenes
    shares = [process_share(scenes, 3, i) for i in range(3)]
    assert sorted((s for share in shares for s in share), key=lambda s: s.path.as_posix()) == scenes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_same_root_as_one(inputs, tmp_path):
    """xstream keeps the cache's shapes independent of the pool's longest scene (an uncompressed cache
    is sized for it), so the processes' pools (s2a + s3, and s2b) compile the same shapes as the
    one-process pool of all three."""
    params, scenes, _ = inputs
    names = ["s2a", "s2b", "s3"]
    common = [*(str(scenes[n]) for n in names), "--params", str(params), "--quiet", "--slots", "1",
              "--prune", "xstream", "--cache-size", "64"]
    one = tmp_path / "one"
    assert main(["reconstruct-many", *common, "--out", str(one)]) == 0
    root = tmp_path / "out"
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "xsvggt_jax.app.cli", "reconstruct-many", *common, "--out", str(root),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    summary = json.loads((root / "summary.json").read_text())
    assert [(e["scene"], e["status"]) for e in summary["scenes"]] == [(n, "done") for n in names]
    assert sorted(p["process"] for p in summary["processes"]) == [0, 1]
    assert sorted(p.name for p in root.iterdir()) == sorted([*names, "summary.json"])
    for n in names:
        assert files(root / n) == files(one / n)
        ours, ref = predictions(root / n), predictions(one / n)
        for k in ref:
            np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{n}: {k}")


# ------------------------------------------------------------------------------- issue 22
def many(params: Path, root: Path, *inputs: Path) -> list[str]:
    return ["reconstruct-many", *map(str, inputs), "--params", str(params), "--out", str(root), "--quiet",
            "--slots", "1"]


def summary_of(root: Path) -> dict:
    return {e["scene"]: e for e in json.loads((root / "summary.json").read_text())["scenes"]}


def test_foreign_summary_is_refused_and_an_input_named_summary_json_runs_beside_ours(inputs, tmp_path, capsys):
    """ROOT/summary.json is an output like any other: a file xsvggt did not write there is refused
    before any work and kept; an input whose name is summary.json gets a folder of its own."""
    params, scenes, _ = inputs
    root = tmp_path / "root"
    root.mkdir()
    (root / "summary.json").write_text("my own summary")
    err = run_error(many(params, root, scenes["s2a"]), capsys)
    assert str(root / "summary.json") in err and "not written by xsvggt" in err, err
    assert (root / "summary.json").read_text() == "my own summary"
    assert sorted(p.name for p in root.iterdir()) == ["summary.json"]

    named = tmp_path / "in" / "summary.json.npz"  # a scene called summary.json (the file's stem)
    named.parent.mkdir()
    named.write_bytes(scenes["s2a"].read_bytes())
    root = tmp_path / "root2"
    assert main(many(params, root, named)) == 0
    assert (root / "summary.json").is_file() and list(summary_of(root)) == ["summary.json-2"]
    assert predictions(root / "summary.json-2")["depth"].shape[0] == LENGTHS["s2a"]


def test_an_input_folder_named_summary_json_is_not_named_so(tmp_path):
    folder = tmp_path / "summary.json"
    folder.mkdir()
    assert [s.name for s in name_scenes([folder])] == ["summary.json-2"]


def test_a_scene_is_its_input_not_its_name(inputs, tiny_frames, tmp_path):
    """A scene's identity is its input (resolved path + content): adding an input whose name collides
    keeps the earlier scene's folder (no -2/-3 shift), a completed scene is skipped only while its
    input is unchanged, and one input reached through `..` or a symlink is one scene."""
    params, _, _ = inputs
    images, qp = tiny_frames
    a, b = tmp_path / "a" / "x.npz", tmp_path / "b" / "x.npz"  # a sorts first
    for path, frames in ((a, images[:3]), (b, images[3:5])):
        path.parent.mkdir()
        np.savez(path, images=frames, query_points=qp)
    link = tmp_path / "link.npz"
    link.symlink_to(b)
    root = tmp_path / "root"
    assert main(many(params, root, b)) == 0
    assert {n: e["status"] for n, e in summary_of(root).items()} == {"x": "done"}
    b_depth = predictions(root / "x")["depth"]
    mtime = (root / "x" / "predictions.npz").stat().st_mtime_ns

    assert main(many(params, root, a, b, tmp_path / "a" / ".." / "b" / "x.npz", link)) == 0
    summary = summary_of(root)
    assert {n: (e["status"], e["input"]) for n, e in summary.items()} == {
        "x": ("skipped", str(b.resolve())), "x-2": ("done", str(a.resolve()))}
    assert (root / "x" / "predictions.npz").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(predictions(root / "x")["depth"], b_depth)
    assert predictions(root / "x-2")["depth"].shape[0] == 3  # a's three frames, not b's two

    np.savez(b, images=images[5:7], query_points=qp)  # b changes: its scene is run again, in its folder
    assert main(many(params, root, a, b)) == 0
    assert {n: e["status"] for n, e in summary_of(root).items()} == {"x": "done", "x-2": "skipped"}
    assert not np.array_equal(predictions(root / "x")["depth"], b_depth)


def test_a_symlink_loop_input_fails_alone(inputs, tmp_path):
    params, scenes, _ = inputs
    loop = tmp_path / "loop.npz"
    loop.symlink_to(tmp_path / "other.npz")
    (tmp_path / "other.npz").symlink_to(loop)
    root = tmp_path / "root"
    with pytest.raises(SystemExit) as e:
        main(many(params, root, loop, scenes["s2a"]))
    assert e.value.code == 2
    summary = summary_of(root)
    assert summary["s2a"]["status"] == "done"
    assert summary["loop"]["status"] == "failed" and "symbolic link loop" in summary["loop"]["error"]
    assert sorted(p.name for p in root.iterdir()) == ["s2a", "summary.json"]
