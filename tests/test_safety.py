"""Data safety and failure modes of the command line (issue 9 §1): xsvggt deletes only its own files,
checks flags, disk space and memory before working, refuses a mismatched resume, reports NaN
predictions, damaged state and SIGTERM with one line, and leaves nothing half written."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import xsvggt_jax.stream.pipeline as pipeline
from conftest import run_error
from xsvggt_jax.cache.core import CacheConfig, init_cache, tree_bytes
from xsvggt_jax.app.cli import main
from xsvggt_jax.io.fsutil import OWNER_FILE, owner_record
from xsvggt_jax.weights.params import save_params
from xsvggt_jax.io.rgb import to_uint8_rgb

ROOT = Path(__file__).resolve().parents[1]


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def params_dir(tiny_params, tiny_cfg, tmp_path_factory):
    return save_params(tiny_params, tmp_path_factory.mktemp("params") / "tiny", tiny_cfg)


@pytest.fixture
def npz(tiny_frames, tmp_path):
    """Write the first `frames` reference frames (optionally changed) to an .npz; returns its path."""
    images, _ = tiny_frames

    def write(name="in.npz", frames=2, folder=None, change=False):
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        imgs = images[:frames].copy()
        if change:
            imgs[0, 0, 0, 0] = 1 - imgs[0, 0, 0, 0]
        np.savez(path, images=imgs)
        return path
    return write


def reconstruct(src, params_dir, out, *flags):
    return ["reconstruct", str(src), "--params", str(params_dir), "--out", str(out), "--quiet", *flags]


# ------------------------------------------------------------------------------ 1. state directory
def test_save_state_deletes_only_its_own_files(interrupted_state, params_dir, npz, tmp_path, capsys):
    src, state = interrupted_state
    cwd_like = tmp_path / "work"  # `--save-state .` used to remove the whole working directory
    cwd_like.mkdir()
    (cwd_like / "thesis.tex").write_text("precious")
    err = run_error(reconstruct(npz(), params_dir, tmp_path / "o1", "--save-state", str(cwd_like)), capsys)
    assert "not empty" in err and "not made by xsvggt" in err
    assert (cwd_like / "thesis.tex").read_text() == "precious" and not (tmp_path / "o1").exists()

    mine = tmp_path / "state"  # a state dir of ours into which the user dropped a file
    shutil.copytree(state, mine)
    (mine / "notes.txt").write_text("mine")
    assert main(reconstruct(src, params_dir, tmp_path / "o2", "--resume", str(mine))) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # checkpoint, outputs, marker: gone
    assert (mine / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- 2. output directory
def test_rerun_into_outdir_keeps_foreign_files_and_inputs(params_dir, npz, tmp_path):
    out = tmp_path / "out"
    assert main(reconstruct(npz(frames=2), params_dir, out)) == 0
    assert (out / "depth" / "depth_00001.png").is_file()
    (out / "notes.txt").write_text("my notes")
    src = npz(frames=1, folder=out / "inputs")  # the run's own input, stored inside OUTDIR
    assert main(reconstruct(src, params_dir, out)) == 0
    assert (out / "notes.txt").read_text() == "my notes" and src.is_file()
    assert np.load(out / "predictions.npz")["depth"].shape[0] == 1  # our outputs were replaced ...
    assert not (out / "depth" / "depth_00001.png").exists()  # ... and the stale one of ours removed
    assert json.loads((out / "report.json").read_text())["frames"] == 1
    assert leftovers(tmp_path, "out") == []


def test_symlinked_outdir_keeps_the_targets_foreign_files(params_dir, npz, tmp_path):
    target = tmp_path / "old-output"
    target.mkdir()
    (target / "report.json").write_text(json.dumps({"producer": "xsvggt-jax"}))  # an earlier xsvggt output
    (target / "keep.txt").write_text("foreign")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    assert main(reconstruct(npz(frames=1), params_dir, link)) == 0
    assert link.is_symlink() and (target / "keep.txt").read_text() == "foreign"
    assert np.load(target / "predictions.npz")["depth"].shape[0] == 1
    assert leftovers(tmp_path, "old-output") == [] and leftovers(tmp_path, "link") == []


def test_input_among_earlier_outputs_is_refused(params_dir, npz, tmp_path, capsys):
    out = tmp_path / "out"
    src = npz("predictions.npz", folder=out)  # the user feeds a file an earlier run wrote
    (out / ".xsvggt-manifest.json").write_text(json.dumps({"producer": "xsvggt-jax", "files": ["predictions.npz"]}))
    err = run_error(reconstruct(src, params_dir, out), capsys)
    assert "predictions.npz" in err and "input" in err
    assert src.is_file() and leftovers(tmp_path, "out") == []


def test_state_dir_of_a_live_run_is_refused(params_dir, npz, tmp_path, capsys):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / ".xsvggt-state.json").write_text(json.dumps({**owner_record("state"), "pid": live.pid,
                                                              "pid_start": None, "created_dir": True}))
        err = run_error(reconstruct(npz(), params_dir, tmp_path / "out", "--save-state", str(state)), capsys)
        assert "in use by another xsvggt run" in err and str(live.pid) in err
        assert not (tmp_path / "out").exists()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------- 3. disk space, leftovers, SIGTERM
def test_free_space_checked_before_work_and_query_points_outside_warn(params_dir, npz, tmp_path, capsys, caplog,
                                                                     monkeypatch):
    monkeypatch.setattr("xsvggt_jax.io.fsutil.free_bytes", lambda path: 4096)
    with caplog.at_level(logging.WARNING):
        err = run_error(reconstruct(npz(), params_dir, tmp_path / "out", "--query-points", "-5,3 10,10 100,2"),
                        capsys)
    assert "not enough free disk space" in err and "needed" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []
    warned = [r.getMessage() for r in caplog.records if "query points" in r.getMessage()]
    assert warned and "2 of 3" in warned[0] and "56x70" in warned[0]


def test_killed_run_leftovers_swept_and_enospc_is_one_line(params_dir, npz, tmp_path, capsys, caplog, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours = tmp_path / ".out.tmp-killed"  # a kill -9'd run's staging dir: marker, dead pid
    ours.mkdir()
    (ours / OWNER_FILE).write_text(json.dumps({**owner_record("staging"), "pid": dead.pid, "pid_start": None}))
    (ours / "big.npy").write_bytes(b"\0" * 1000)
    foreign = tmp_path / ".out.tmp-unknown"  # no marker: not provably ours
    foreign.mkdir()
    (foreign / "x").write_text("?")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with caplog.at_level(logging.WARNING):
        err = run_error(reconstruct(npz(), params_dir, tmp_path / "out"), capsys)
    assert "no space left on device" in err
    assert not ours.exists() and (foreign / "x").read_text() == "?"
    assert any(".out.tmp-unknown" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == [".out.tmp-unknown"]


def test_enospc_in_an_export_is_one_line(params_dir, npz, tmp_path, capsys, monkeypatch):
    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr("xsvggt_jax.io.exports.write_ply", full)
    err = run_error(reconstruct(npz(), params_dir, tmp_path / "out"), capsys)
    assert "no space left on device" in err and "points.ply" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


SIGTERM_DRIVER = """
import sys, time
from pathlib import Path
import xsvggt_jax.stream.pipeline as pipeline
from xsvggt_jax.app.cli import main
real, ready = pipeline.make_step, Path(sys.argv[1])

def slow(*a, **kw):  # make_step's signature: options pass through
    fn = real(*a, **kw)
    def step(*b):
        out = fn(*b)
        ready.touch()  # a frame went through: the stream is running
        time.sleep(0.5)
        return out
    return step
pipeline.make_step = slow
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_mid_stream_cleans_up_like_ctrl_c(params_dir, npz, tmp_path):
    ready, out = tmp_path / "ready", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_DRIVER, str(ready),
                             *reconstruct(npz(frames=20), params_dir, out)],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "no frame streamed in time"
    assert leftovers(tmp_path, "out")  # mid-stream: the staging dir with the memory maps exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("xsvggt: error: stopped by SIGTERM"), err
    assert not out.exists() and leftovers(tmp_path, "out") == []


# ----------------------------------------------------------------------------------------- 4. resume
@pytest.fixture(scope="module")
def interrupted_state(params_dir, tiny_frames, tmp_path_factory):
    """A state dir checkpointed after frame 1 of a 3-frame stream interrupted by Ctrl-C at frame 2."""
    root = tmp_path_factory.mktemp("interrupted")
    src = root / "in.npz"
    np.savez(src, images=tiny_frames[0][:3])
    real, calls = pipeline.make_step, {"n": 0}

    def interrupted(*a, **kw):  # make_step's signature: options pass through
        fn = real(*a, **kw)

        def wrapped(*b):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return fn(*b)
        return wrapped

    pipeline.make_step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            main(reconstruct(src, params_dir, root / "out", "--save-state", str(root / "state"), "--save-every", "1"))
    finally:
        pipeline.make_step = real
    assert json.loads((root / "state" / "checkpoint" / "meta.json").read_text())["frames_done"] == 1
    return src, root / "state"


def test_resume_refuses_other_input_weights_dtype_queries(interrupted_state, params_dir, tiny_params, tiny_cfg,
                                                          npz, tmp_path, capsys):
    src, state = interrupted_state
    other_params = jax.tree_util.tree_map(np.copy, tiny_params)
    other_params["aggregator"]["camera_token"] = other_params["aggregator"]["camera_token"] + np.float32(1e-3)
    other = save_params(other_params, tmp_path / "other-params", tiny_cfg)
    cases = {
        "input": reconstruct(npz("other.npz", frames=3, change=True), params_dir, tmp_path / "o"),
        "weights": reconstruct(src, other, tmp_path / "o"),
        "dtype": reconstruct(src, params_dir, tmp_path / "o", "--dtype", "bfloat16"),
        "queries": reconstruct(src, params_dir, tmp_path / "o", "--query-points", "10,10"),
        "cache": reconstruct(src, params_dir, tmp_path / "o", "--prune", "sliding", "--cache-size", "64"),
    }
    for what, argv in cases.items():
        err = run_error(argv + ["--resume", str(state)], capsys)
        assert "cannot resume" in err and what in err, (what, err)
        assert not (tmp_path / "o").exists()
    assert (state / "checkpoint" / "meta.json").is_file()  # a refused resume keeps the checkpoint


def _damage(state: Path, how: str) -> None:
    if how == "meta":
        (state / "checkpoint" / "meta.json").write_text("{not json")
    elif how == "outputs":
        (state / "outputs" / "depth.npy").unlink()
    else:  # truncate every file of the orbax checkpoint
        for f in (state / "checkpoint" / "cache").rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


@pytest.mark.parametrize("how", ["meta", "outputs", "orbax"])
def test_damaged_state_dir_is_one_error_line(how, interrupted_state, params_dir, tmp_path, capsys):
    src, state = interrupted_state
    copy = tmp_path / "state"
    shutil.copytree(state, copy)
    _damage(copy, how)
    err = run_error(reconstruct(src, params_dir, tmp_path / "o", "--resume", str(copy)), capsys)
    assert str(copy) in err
    assert not (tmp_path / "o").exists() and leftovers(tmp_path, "o") == []


# ------------------------------------------------------------------------------------- 5. flags
@pytest.mark.parametrize("flags,expect", [
    (["--conf-percentile", "150"], "--conf-percentile"),
    (["--ply-max-pixels", "0"], "--ply-max-pixels"),
    (["--save-every", "-5"], "--save-every"),
    (["--save-state", "{out}"], "must not contain each other"),
    (["--save-state", "{out}/state"], "must not contain each other"),
    (["--spec", "spec.json"], "--spec"),
    (["--cache-size", "0"], "--cache-size"),
    (["--group", "0"], "--group"),
    (["--pool", "-1"], "--pool"),
    (["--bits", "3"], "--bits"),
    (["--prune", "bogus"], "--prune"),
    (["--quant", "kxvx"], "--quant"),
    (["--stride", "0"], "--stride"),
    (["--fps", "0"], "--fps"),
    (["--fps", "-2.5"], "--fps"),
    (["--keep-state"], "--keep-state"),
])
def test_flags_validated_before_any_work(flags, expect, params_dir, npz, tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started before the flags were checked")
    monkeypatch.setattr("xsvggt_jax.app.cli.load_model", no_work)
    monkeypatch.setattr("xsvggt_jax.io.sources.open_frames", no_work)
    out = tmp_path / "out"
    flags = [f.format(out=out) for f in flags]
    err = run_error(reconstruct(npz(), params_dir, out, *flags), capsys)
    assert expect in err
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_demo_zero_frames_is_one_line(tmp_path, capsys):
    assert "--frames" in run_error(["demo", "--frames", "0", "--out", str(tmp_path / "d")], capsys)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ 6. memory
@pytest.mark.parametrize("cache_cfg", [CacheConfig.uncompressed(),
                                       CacheConfig(prune="xstream", budget=64, quant="kcvt")])
def test_cache_memory_estimate_matches_the_allocation(cache_cfg, tiny_cfg):
    hw, queries = (56, 70), np.zeros((1, 3, 2), np.float32)
    cache = init_cache(tiny_cfg, cache_cfg, 1, hw, max_frames=7, query_points=queries)
    assert pipeline.cache_memory_bytes(tiny_cfg, cache_cfg, hw, 7, 3) == tree_bytes(cache)


def test_uncompressed_cache_too_big_is_refused_before_allocation(params_dir, npz, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "device_available_bytes", lambda: 1 << 16)
    err = run_error(reconstruct(npz(), params_dir, tmp_path / "out"), capsys)
    assert "uncompressed cache for 2 frames" in err and "--prune xstream --cache-size" in err
    assert "needs" in err and "64.0 KiB" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- 7. NaN
def test_nan_weight_is_an_error(tiny_params, tiny_cfg, npz, tmp_path, capsys):
    bad = jax.tree_util.tree_map(np.copy, tiny_params)
    bad["aggregator"]["camera_token"][..., 0] = np.nan
    params = save_params(bad, tmp_path / "nan-params", tiny_cfg)
    err = run_error(reconstruct(npz(), params, tmp_path / "out"), capsys)
    assert "NaN/Inf" in err and "frame 0" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------------------- 8. compilation cache
COMPILE_DRIVER = ("import sys, xsvggt_jax.runtime as r, xsvggt_jax.app.cli as c\n"
                  "r.COMPILE_CACHE_MIN_SECONDS = 0  # cache even the tiny model's quick compiles\n"
                  "sys.exit(c.main(sys.argv[1:]))")


@pytest.mark.parametrize("flag", [[], ["--no-compile-cache"]])
def test_persistent_compile_cache_default_on(flag, params_dir, npz, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", COMPILE_DRIVER,
                           *reconstruct(npz(frames=1), params_dir, tmp_path / "out", *flag)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    cache = tmp_path / "xdg" / "xsvggt-jax" / "jax-compile"
    if flag:
        assert not cache.exists()
    else:
        assert any(cache.iterdir()) and (cache.stat().st_mode & 0o077) == 0


# --------------------------------------------------------------------------------- 10. shared helpers
def test_to_uint8_rgb():
    x = np.array([[[0.0, 0.5, -1.0], [1.0, np.nan, 2.0]]], np.float32)  # [1, 2, 3]
    np.testing.assert_array_equal(to_uint8_rgb(x), [[[0, 128, 0], [255, 0, 255]]])
    assert to_uint8_rgb(np.zeros((4, 2, 5, 3))).shape == (4, 2, 5, 3)


# ------------------------------------------------ 4. read-only outputs, symlink-loop inputs (issue 22)
def _read_only(monkeypatch, folder: Path, code: int) -> None:
    """Make `folder` behave, for this process, as on a read-only file system (EROFS: statvfs shows
    the read-only flag and no free blocks, as a squashfs or a full read-only mount does) or as a
    folder without write permission (EACCES): creating anything under it fails with `code` and
    os.access(W_OK) says no. (The tests run as root, which a chmod would not stop.)"""
    folder = folder.absolute()
    real = {name: getattr(os, name) for name in ("mkdir", "open", "statvfs", "access")}

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        p = Path(os.fsdecode(path)).absolute()
        return p == folder or folder in p.parents

    def refuse(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    def mkdir(path, *a, **k):
        return refuse(path) if inside(path) else real["mkdir"](path, *a, **k)

    def open_(path, flags, *a, **k):
        if inside(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            refuse(path)
        return real["open"](path, flags, *a, **k)

    def statvfs(path):
        st = real["statvfs"](path)
        if code == errno.EROFS and inside(path):
            st = os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files, 0, 0,
                                    st.f_flag | os.ST_RDONLY, st.f_namemax))
        return st

    def access(path, mode, *a, **k):
        return False if inside(path) and mode & os.W_OK else real["access"](path, mode, *a, **k)

    for name, fn in (("mkdir", mkdir), ("open", open_), ("statvfs", statvfs), ("access", access)):
        monkeypatch.setattr(os, name, fn)


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
@pytest.mark.parametrize("command", ["reconstruct", "reconstruct-many", "eval"])
def test_read_only_output_is_one_line_saying_so(command, code, words, params_dir, npz, tmp_path, capsys,
                                                monkeypatch):
    """A read-only (or not writable) OUTDIR / ROOT: one line naming the cause, before any work, for
    every command that writes one (reconstruct used to blame the free space, eval and reconstruct-many
    ended in an OSError traceback)."""
    src, ro = npz(), tmp_path / "ro"
    ro.mkdir()
    out = ro / "out"
    argv = {"reconstruct": reconstruct(src, params_dir, out),
            "reconstruct-many": ["reconstruct-many", str(src), "--params", str(params_dir), "--out", str(out),
                                 "--quiet"],
            "eval": ["eval", "--dataset", "procedural", "--task", "pose", "--out", str(out), "--quiet"]}[command]
    _read_only(monkeypatch, ro, code)
    err = run_error(argv, capsys)
    assert words in err and str(ro) in err and "free disk space" not in err, err
    monkeypatch.undo()
    assert list(ro.iterdir()) == []


def test_symlink_loop_input_is_one_line(params_dir, tmp_path, capsys):
    loop = tmp_path / "loop.npz"
    loop.symlink_to(tmp_path / "other.npz")
    (tmp_path / "other.npz").symlink_to(loop)
    err = run_error(reconstruct(loop, params_dir, tmp_path / "out"), capsys)
    assert str(loop) in err and "symbolic link loop" in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []
