"""The errors xsvggt-jax raises on purpose: one base, `XsvggtError`, and a few kinds under it.

Every error here (and every module's own error class, each a subclass of one of these) carries a
one-sentence message meant for the user; the command line (`xsvggt_jax.app.cli.main`) prints it as
one `xsvggt: error: ...` line and exits with code 2. Anything else that escapes is a bug and keeps its
traceback.

* `InputError`: an input that cannot be used: a file, folder, data set, array or value that is
  missing, damaged, foreign or out of range (`io.frames.FrameError`, `weights.params.ParamsError`,
  `data.base.DataError`, ...).
* `ConfigError`: an invalid setting, a kind of InputError: a configuration field, a flag, a cache
  setting string (`config.ModelConfig`, `cache.core.CacheConfig`, `eval.settings.SettingsError`, ...).
  Built as ``ConfigError(field, problem)`` ("budget must be positive, got 0") or
  ``ConfigError(message)``.
* `ResourceError`: not enough disk space or memory for what was asked, or a place xsvggt may not
  write (`io.fsutil.FsError`, `stream.pipeline.CacheMemoryError`).

They are ValueErrors too (as every error of this package was before this module), so code that
catches ValueError keeps working.
"""

from __future__ import annotations

__all__ = ["XsvggtError", "InputError", "ConfigError", "ResourceError"]


class XsvggtError(Exception):
    """Base of the errors xsvggt-jax raises on purpose; the message is one sentence for the user."""


class InputError(XsvggtError, ValueError):
    """An input (file, folder, data, array, value) that cannot be used."""


class ConfigError(InputError):
    """An invalid configuration value or setting. `ConfigError(field, problem)` names the field (its
    dotted name, e.g. ``dpt.features``) and reads "<field> <problem>"; `ConfigError(message)` is a
    whole sentence (then `field` and `problem` are None)."""

    def __init__(self, field: str, problem: str | None = None):
        if problem is None:
            super().__init__(field)
            self.field = self.problem = None
        else:
            super().__init__(f"{field} {problem}")
            self.field, self.problem = field, problem


class ResourceError(XsvggtError, ValueError):
    """Not enough disk space or memory, or a place xsvggt may not write."""
