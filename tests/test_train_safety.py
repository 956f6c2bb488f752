"""`xsvggt train` safety: divergence, damaged checkpoints, the run lock, full / read-only disks, and
flags checked before anything is written.

The runs here go through the real CLI, run directory, data, checkpoints (orbax) and logs, with two
stand-ins that keep them free of model compiles: tiny parameters instead of the micro model's, and a
train step (`loop.make_train_step`) that only counts steps and reports the losses a test plans.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from conftest import run_error
import xsvggt_jax.train.command as command
import xsvggt_jax.train.loop as loop
from xsvggt_jax.app.cli import main
from xsvggt_jax.cache.core import CacheConfig
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.weights.quant import WeightFormat
from xsvggt_jax.train.state import Checkpoints, OptimConfig, init_state, make_optimizer


def _params():
    return {"w": jnp.ones(3, jnp.float32), "b": jnp.zeros(2, jnp.float32)}


@pytest.fixture
def plan(monkeypatch):
    """What the stand-in train step reports: loss / grad_norm per step (default finite), a factor on
    the parameters per step (inf: an overflowing update), and hooks called at the start of a step."""
    plan = {"loss": {}, "grad": {}, "scale": {}, "hook": {}}
    monkeypatch.setattr(command, "init_params", lambda cfg, key: _params())

    def make_train_step(cfg, optimizer, labels, **kw):
        def step(state, batch):
            n = int(state.step) + 1
            if n in plan["hook"]:
                plan["hook"][n]()
            scale = plan["scale"].get(n, 1.0)
            params = jax.tree_util.tree_map(lambda x: x * scale + 1.0, state.params)
            new = state.replace(params=params, step=state.step + 1, data_pos=state.data_pos + 1)
            return new, {"loss": plan["loss"].get(n, 1.0 / n), "grad_norm": plan["grad"].get(n, 1.0), "lr": 1e-3}
        return step

    monkeypatch.setattr(loop, "make_train_step", make_train_step)
    return plan


def _argv(out, steps=3, *extra):
    return ["train", "--config", "micro", "--steps", str(steps), "--save-every", "1", "--eval-scenes", "0",
            "--out", str(out), "--quiet", *extra]


def _steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


# ------------------------------------------------------------------------------------ divergence

@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_loss_or_gradient_stops_and_keeps_last_checkpoint(plan, tmp_path, capsys, kind):
    """--lr 1e30 used to end with exit 0 and every parameter NaN: the first non-finite loss (or gradient
    norm) stops the run in one line naming the checkpoint that is kept; no params/ are written."""
    plan[kind][3] = math.nan if kind == "loss" else math.inf
    out = tmp_path / "run"
    msg = run_error(_argv(out, 5), capsys)
    assert "diverged at step 3" in msg and f"step 2 in {out / 'checkpoints'}" in msg and "--lr" in msg, msg
    assert _checkpoint_steps(out) == [1, 2] and not (out / "params").exists()


def test_non_finite_update_is_never_checkpointed(plan, tmp_path, capsys):
    """An update that overflows (loss and gradient still finite, as lr=1e30's first step) is caught before
    its state is saved."""
    plan["scale"][2] = math.inf
    out = tmp_path / "run"
    msg = run_error(_argv(out, 4), capsys)
    assert "diverged at step 2" in msg and "not finite" in msg and f"step 1 in {out / 'checkpoints'}" in msg, msg
    assert _checkpoint_steps(out) == [1]


# ------------------------------------------------------------------------------- damaged checkpoints

def _write_checkpoint(out: Path, step: int, transform, steps: int) -> None:
    """Replace checkpoint `step` of a stand-in run by transform(its state), bypassing every check (as a
    bit flip on disk would)."""
    params = _params()
    like = init_state(params, make_optimizer(OptimConfig(warmup=10, steps=steps, freeze=()), params))
    ckpt = Checkpoints(out / "checkpoints")
    state = ckpt.restore(like, step)
    ckpt.manager.delete(step)
    ckpt.manager.save(step, args=ocp.args.StandardSave(transform(state)))
    ckpt.manager.wait_until_finished()
    ckpt.close()


def _nan(state):
    return state.replace(params=jax.tree_util.tree_map(lambda x: x * jnp.nan, state.params))


def _truncate(out: Path, step: int) -> None:
    """Cut every data file of checkpoint `step` in half (as an interrupted copy leaves them)."""
    for p in (out / "checkpoints" / str(step)).rglob("*"):
        if p.is_file() and p.parent.name == "d":
            with open(p, "r+b") as f:
                f.truncate(p.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["nan", "truncated"])
def test_damaged_latest_checkpoint_resumes_from_previous_with_warning(plan, tmp_path, capsys, caplog, damage):
    """A bit-flipped (NaN) or truncated newest checkpoint: the re-run warns, moves it aside and resumes
    from the previous one, recomputing the steps after it."""
    out = tmp_path / "run"
    assert main(_argv(out, 2)) == 0
    if damage == "nan":
        _write_checkpoint(out, 2, _nan, steps=2)
    else:
        _truncate(out, 2)
    capsys.readouterr()
    assert main(_argv(out, 2)) == 0
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "resuming from step 1" in r.getMessage()]
    assert len(warnings) == 1 and str(out / "checkpoints" / "2") in warnings[0], caplog.text
    assert ("non-finite" if damage == "nan" else "cannot be read") in warnings[0]
    assert _steps_logged(out) == [1, 2] and _checkpoint_steps(out) == [1, 2]
    assert (out / "damaged-checkpoints" / "2").is_dir()


@pytest.mark.parametrize("damage", ["nan", "garbled"])
def test_no_intact_checkpoint_is_one_line_naming_it(plan, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert main(_argv(out, 1)) == 0
    if damage == "nan":
        _write_checkpoint(out, 1, _nan, steps=1)
    else:
        (out / "checkpoints" / "1" / "default" / "_METADATA").write_text("garbage")
    capsys.readouterr()
    msg = run_error(_argv(out, 1), capsys)
    assert str(out / "checkpoints" / "1") in msg and "another --out" in msg, msg
    assert _checkpoint_steps(out) == [1]            # nothing moved or removed


# ---------------------------------------------------------------------------------------- the lock

def test_second_run_into_the_same_out_is_refused_naming_the_live_one(plan, tmp_path, capsys):
    out = tmp_path / "run"
    seen = []

    def second_run():                      # while the first run is live (once: not in a second run that ran)
        del plan["hook"][2]
        seen.append(run_error(_argv(out, 3), capsys))
    plan["hook"][2] = second_run
    assert main(_argv(out, 3)) == 0
    assert len(seen) == 1 and "in use by another xsvggt train run" in seen[0] and f"pid {os.getpid()}" in seen[0], seen
    assert _steps_logged(out) == [1, 2, 3]
    # the lock went with the run: the same command runs again (nothing left to do) ...
    assert main(_argv(out, 3)) == 0
    # ... and a lock file left by a dead run (kill -9) does not block a new one
    dead = tmp_path / "fresh"
    dead.mkdir()
    (dead / ".xsvggt-train.lock").write_text(json.dumps({"producer": "xsvggt-jax", "pid": 2**22 + 7,
                                                         "host": os.uname().nodename}))
    assert main(_argv(dead, 1)) == 0


# ------------------------------------------------------------------------------- disk errors

TS_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing local file "{path}/_sharding": Failed to write 347134 bytes to '
             "file 11: No space left on device [os_error_code='28']")


@pytest.mark.parametrize("form", ["tensorstore", "oserror"])
def test_full_disk_while_saving_is_one_line_without_orbax_tracebacks(plan, tmp_path, capsys, caplog, form):
    """A full disk inside orbax's writer threads used to print ~1,150 lines of thread tracebacks (absl
    log records) and then tensorstore's text; now one line with the hint, and the same command resumes
    once there is space."""
    from orbax.checkpoint._src.serialization import serialization
    out = tmp_path / "run"

    async def full(*a, **k):
        if form == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "checkpoints"))
        raise ValueError(TS_ENOSPC.format(path=out / "checkpoints"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serialization, "async_serialize_from_host", full)
        msg = run_error(_argv(out, 2), capsys)
    assert "no space left on device" in msg and "free space and re-run with the same --out" in msg, msg
    orbax_errors = [r for r in caplog.records if r.name == "absl" and r.levelno >= 40]
    assert not orbax_errors, [r.getMessage()[:200] for r in orbax_errors]
    assert main(_argv(out, 2)) == 0                     # space freed: the same command completes
    assert _steps_logged(out) == [1, 2] and _checkpoint_steps(out) == [1, 2]
    assert not [p for p in (out / "checkpoints").iterdir() if "tmp" in p.name]


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
@pytest.mark.parametrize("exists", [False, True])
def test_unwritable_out_is_named_as_such(plan, tmp_path, capsys, monkeypatch, code, words, exists):
    """A read-only or forbidden --out is not a full disk: no advice to free space. (Tests run as root,
    which may write anywhere, so the OS error is simulated at the first write into --out.)"""
    out = tmp_path / "run"
    if exists:
        out.mkdir()
        real_open = os.open

        def deny_open(path, flags, *a, **k):
            if flags & os.O_CREAT and Path(path).parent == out:
                raise OSError(code, os.strerror(code), str(path))
            return real_open(path, flags, *a, **k)
        monkeypatch.setattr(os, "open", deny_open)
    else:
        real_mkdir = Path.mkdir

        def deny_mkdir(self, *a, **k):
            if self == out:
                raise OSError(code, os.strerror(code), str(self))
            return real_mkdir(self, *a, **k)
        monkeypatch.setattr(Path, "mkdir", deny_mkdir)
    msg = run_error(_argv(out, 1), capsys)
    assert words in msg and "another --out" in msg and "free space" not in msg, msg


# --------------------------------------------------------------------- checked before writing

def test_out_that_is_a_file_is_refused(plan, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert "not a directory" in run_error(_argv(f, 1), capsys)
    assert f.read_text() == "mine"


@pytest.mark.parametrize("flag", ["--steps", "--warmup", "--seed"])
def test_out_of_range_numbers_are_refused_before_anything_is_written(plan, tmp_path, capsys, flag):
    """--steps 3000000000 overflowed int32 after run.json was written, so the corrected command was then
    refused as another run."""
    out = tmp_path / "run"
    argv = _argv(out, 3000000000) if flag == "--steps" else _argv(out, 2, flag, "3000000000")
    assert flag in run_error(argv, capsys)
    assert not out.exists()
    assert main(_argv(out, 2)) == 0


def test_unrelated_run_json_is_not_a_training_run(plan, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"name": "my experiment", "lr": 0.1, "epochs": 3}))
    msg = run_error(_argv(out, 1), capsys)
    assert "not an xsvggt training run" in msg and len(msg) < 300, msg


def test_init_path_spellings_are_one_run(plan, tmp_path, capsys, monkeypatch):
    import xsvggt_jax.weights.params as params_dir
    monkeypatch.setattr(params_dir, "load_params", lambda path: (_params(), ModelConfig.preset("micro")))
    # config.json's reads (load_config and load_weight_format go through it): micro, float weights
    monkeypatch.setattr(params_dir, "load_stored", lambda path: (ModelConfig.preset("micro"), WeightFormat()))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p").mkdir()
    base = ["train", "--steps", "2", "--save-every", "1", "--eval-scenes", "0", "--out", "run", "--quiet"]
    assert main(base + ["--init", "p"]) == 0
    for spelling in ("p/", "./p", str(tmp_path / "p")):
        assert main(base + ["--init", spelling]) == 0, spelling
    assert "init" in run_error(base + ["--init", "q"], capsys)       # another folder is another run


@pytest.mark.parametrize("key, a, b", [("teacher", "t/", "./t"), ("root", "d/", "d")])
def test_path_settings_compare_resolved(tmp_path, monkeypatch, key, a, b):
    from xsvggt_jax.train.data import DataSource
    monkeypatch.chdir(tmp_path)

    def run(path):
        if key == "teacher":
            return loop.RunConfig(model=ModelConfig.preset("micro"), data=DataSource(), optim=OptimConfig(),
                                  teacher=path, teacher_mode="full")
        return loop.RunConfig(model=ModelConfig.preset("micro"), data=DataSource(dataset="scannet", root=path),
                              optim=OptimConfig())
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(run(a).to_json()))
    assert loop.check_out_dir(out, run(b)) is True


@pytest.mark.parametrize("text, words", [("budget=abc", "budget must be an integer"), (",", "empty"),
                                         ("", "empty"), ("prune=xstream,,budget=8", "empty item"),
                                         ("protect_share=x", "protect_share must be a number")])
def test_bad_student_cache_is_one_clean_line(plan, tmp_path, capsys, text, words):
    msg = run_error(_argv(tmp_path / "run", 1, "--student-cache", text), capsys)
    assert words in msg and "invalid literal" not in msg, msg
    assert not (tmp_path / "run").exists()


def test_student_cache_numbers_are_typed():
    cfg = CacheConfig.from_text("prune=xstream,budget=64,protect=budget,protect_share=0.25,camera_budget=none",
                                where="--student-cache")
    assert (cfg.budget, cfg.protect_share, cfg.camera_budget) == (64, 0.25, None)


def test_teacher_mode_without_teacher_is_refused(plan, tmp_path, capsys):
    assert "--teacher" in run_error(_argv(tmp_path / "run", 1, "--teacher-mode", "causal"), capsys)
    assert not (tmp_path / "run").exists()


def test_bad_data_is_refused_before_anything_is_written(plan, tmp_path, capsys):
    empty = tmp_path / "scannet"
    empty.mkdir()
    msg = run_error(_argv(tmp_path / "run", 1, "--data", f"scannet:{empty}"), capsys)
    assert "ScanNet" in msg and not (tmp_path / "run").exists(), msg


# ------------------------------------------------------------------------------------- SIGTERM

def test_sigterm_says_what_is_kept(plan, tmp_path, capsys):
    from xsvggt_jax.runtime import Terminated
    out = tmp_path / "run"

    def term():
        raise Terminated(signal.SIGTERM)
    plan["hook"][2] = term
    with pytest.raises(SystemExit) as exc:
        main(_argv(out, 3))
    assert exc.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip()
    assert err.startswith("xsvggt: error: stopped by SIGTERM") and "\n" not in err, err
    assert "re-run the same command to resume" in err and "removed" not in err, err
    del plan["hook"][2]
    assert main(_argv(out, 3)) == 0 and _steps_logged(out) == [1, 2, 3]
