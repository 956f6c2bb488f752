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
