"""Scenes of a `reconstruct-many` run: their inputs, unique names, the split over processes, and
which are already complete (resume), plus the summary that lists them.

Each scene writes `ROOT/<name>/` through its own `io.outdir.OutputDir` (staged, published atomically
when complete), so a scene directory with xsvggt's manifest and a `report.json` is a finished scene.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from xsvggt_jax.io.frames import FrameSource
from xsvggt_jax.io.fsutil import PRODUCER
from xsvggt_jax.io.outdir import MANIFEST, OutputDir

SUMMARY = "summary.json"
REPORT = "report.json"


class SceneListError(ValueError):
    """A manifest that cannot be read, or no scenes at all."""


@dataclasses.dataclass(frozen=True)
class Scene:
    """One input (folder of images, video or .npz) and the name of its output directory ROOT/<name>."""
    name: str
    path: Path


@dataclasses.dataclass
class Job:
    """A scene ready to run: its opened source and its output directory (checked, not yet written)."""
    scene: Scene
    source: FrameSource
    out: OutputDir


def pool_key(source: FrameSource) -> tuple[int, int, int]:
    """(H, W, number of query points) of one scene."""
    qp = source.query_points
    return source.height, source.width, 0 if qp is None else len(qp)


def read_manifest(path: str | Path) -> list[Path]:
    """Inputs listed one per line in `path` (blank lines and `#` comments skipped); relative entries
    are relative to the manifest's folder."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SceneListError(f"cannot read the manifest {path}: {e}") from e
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, entries)]


def _base_name(path: Path) -> str:
    name = path.name if path.is_dir() else path.stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scene"
    return name


def name_scenes(inputs: Iterable[str | Path]) -> list[Scene]:
    """Scenes sorted by input path (duplicates of one path dropped), named after their input (folder
    name or file stem, unsafe characters replaced). Colliding names get `-2`, `-3`, ... in path order,
    so the naming is deterministic and the same on every process."""
    paths = sorted({Path(p).absolute() for p in inputs}, key=lambda p: p.as_posix())
    if not paths:
        raise SceneListError("no scenes given (INPUT... or --manifest FILE)")
    taken: dict[str, int] = {}
    scenes = []
    for p in paths:
        base = _base_name(p)
        n = taken.get(base.lower(), 0) + 1
        taken[base.lower()] = n
        name = base if n == 1 else f"{base}-{n}"
        while name.lower() in taken and n > 1:  # "a-2" may itself be an input's name
            n += 1
            name = f"{base}-{n}"
        taken.setdefault(name.lower(), 1)
        scenes.append(Scene(name, p))
    return scenes


def process_share(scenes: Sequence[Scene], num_processes: int, process_id: int) -> list[Scene]:
    """The scenes process `process_id` of `num_processes` runs: every num_processes-th of the sorted list."""
    return list(scenes[process_id::num_processes])


def completed_report(out_dir: Path) -> dict | None:
    """report.json of a scene directory that a completed xsvggt run published, else None."""
    if not (out_dir / MANIFEST).is_file():
        return None
    try:
        report = json.loads((out_dir / REPORT).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("producer") == PRODUCER else None


def summary_entry(scene: Scene, status: str, frames: int | None = None, seconds: float | None = None,
                  cache_bytes: int | None = None, error: str | None = None, **extra) -> dict:
    """One scene of summary.json. status: "done" (run now), "skipped" (complete from an earlier run)
    or "failed" (with `error`)."""
    return {"scene": scene.name, "input": str(scene.path), "status": status, "frames": frames,
            "seconds": seconds, "cache_bytes": cache_bytes, "error": error, **extra}
