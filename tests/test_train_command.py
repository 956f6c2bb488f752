"""`xsvggt train` failure paths that need no compile: a full disk inside orbax is one error line."""

from __future__ import annotations

import errno

import pytest

from conftest import run_error
import xsvggt_jax.train.loop as loop


class _FullDisk:
    """Orbax's CheckpointManager failing the way it does on a full disk: its own error type,
    with the OSError as the cause."""

    def __init__(self, directory, *a, **k):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        except OSError as e:
            raise RuntimeError("checkpoint manager: failed to create directory") from e


def test_full_disk_in_checkpointing_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(loop, "Checkpoints", _FullDisk)
    msg = run_error(["train", "--config", "micro", "--size", "28x42", "--steps", "1", "--eval-scenes", "0",
                     "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert "no space left on device" in msg and "--out to resume" in msg and "\n" not in msg.strip()


def test_other_errors_still_raise(monkeypatch, tmp_path):
    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("a bug, not the disk")

    monkeypatch.setattr(loop, "Checkpoints", Broken)
    from xsvggt_jax.app.cli import main
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--config", "micro", "--size", "28x42", "--steps", "1", "--eval-scenes", "0",
              "--out", str(tmp_path / "run"), "--quiet"])



def test_run_of_an_older_format_is_refused(tmp_path):
    """A run directory written before the optimizer's settings became arrays in its checkpointed state
    (format 1) cannot be resumed, its checkpoints having another tree: the same settings under format 1
    are refused, naming the format (the CLI prints RunError as one `xsvggt: error:` line)."""
    import json
    from xsvggt_jax.config import ModelConfig
    from xsvggt_jax.train.data import DataSource
    from xsvggt_jax.train.state import OptimConfig
    run = loop.RunConfig(model=ModelConfig.preset("micro"), data=DataSource(height=28, width=42), optim=OptimConfig())
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(run.to_json()))
    assert loop.check_out_dir(out, run) is True          # the same run resumes
    (out / "run.json").write_text(json.dumps({**run.to_json(), "format": "xsvggt-train/1"}))
    with pytest.raises(loop.RunError, match=r"other settings \(format\)"):
        loop.check_out_dir(out, run)


# ------------------------------------------------------------------------ --student-cache: typed fields
def _no_training(monkeypatch) -> dict:
    """Replace the training loop and the parameter init: record the RunConfig the command built."""
    import xsvggt_jax.train.command as command
    seen = {}

    def fake_train(run, out, params, teacher_params, quiet=False, clip_fn=None):
        seen["run"] = run
        return {"params": str(out / "params")}
    monkeypatch.setattr(command, "train", fake_train)
    monkeypatch.setattr(command, "init_params", lambda cfg, key: {})
    return seen


@pytest.mark.parametrize("cache, field, value", [
    ("prune=xstream,budget=64,protect_share=0.3", "protect_share", 0.3),
    ("prune=xstream,budget=64,camera_budget=32", "camera_budget", 32),
    ("xstream-int4:64,mass_decay=0.5", "mass_decay", 0.5),
])
def test_student_cache_fields_are_typed(cache, field, value, monkeypatch, tmp_path):
    """A float or optional field of --student-cache gives a valid run config (it was a TypeError
    traceback: only integer fields were converted)."""
    seen = _no_training(monkeypatch)
    from xsvggt_jax.app.cli import main
    assert main(["train", "--config", "micro", "--student-cache", cache, "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    run = seen["run"]
    assert run.student == "stream" and run.student_cache.budget == 64
    assert getattr(run.student_cache, field) == value and type(getattr(run.student_cache, field)) is type(value)


@pytest.mark.parametrize("cache, words", [
    ("prune=xstream,foo=1", "unknown key 'foo' (keys: prune, budget, "),
    ("prune=xstream,budget=abc", "budget must be an integer, got 'abc'"),
    ("protect_share=0.3x", "protect_share must be a number, got '0.3x'"),
    ("camera_budget=lots", "camera_budget must be an integer, got 'lots'"),
    ("protect_share=1.5", "protect_share must be in (0, 1]"),
    (",", "empty"), ("", "empty"),
])
def test_bad_student_cache_is_one_line(cache, words, monkeypatch, capsys, tmp_path):
    seen = _no_training(monkeypatch)
    msg = run_error(["train", "--config", "micro", "--student-cache", cache, "--out", str(tmp_path / "run"),
                     "--quiet"], capsys)
    assert msg.startswith("xsvggt: error: --student-cache: ") and words in msg, msg
    assert "invalid literal" not in msg and "int()" not in msg
    assert "run" not in seen and not (tmp_path / "run").exists()
