"""Scenes of a `reconstruct-many` run: their inputs, unique names, the split over processes, and
which are already complete (resume), plus the summary that lists them.

Each scene writes `ROOT/<name>/` through its own `io.outdir.OutputDir` (staged, published atomically
when complete), so a scene directory with xsvggt's manifest and a `report.json` is a finished scene.

A scene is its input, not its name: the input's resolved path (so one input reached through `..` or
a symbolic link is one scene) and a content fingerprint (`input_fingerprint`), recorded in the
scene's report.json (`IDENTITY`). A re-run skips a finished scene only while its recorded identity
matches, and keeps each input's folder: an input whose folder ROOT already holds gets that name again,
and a new input never takes the folder of another input's scene (so adding an input whose name
collides does not shift the `-2`, `-3` suffixes of the others).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from xsvggt_jax.errors import InputError
from xsvggt_jax.io.frames import FrameSource
from xsvggt_jax.io.fsutil import PRODUCER, FsError, atomic_write_json, resolved
from xsvggt_jax.io.image_files import list_images
from xsvggt_jax.io.outdir import MANIFEST, OutputDir

SUMMARY = "summary.json"
REPORT = "report.json"
RESERVED = frozenset({SUMMARY})  # ROOT's own files: never a scene's name
IDENTITY = "scene"  # report.json's record of the scene's input: {"input": resolved path, "fingerprint": ...}


class SceneListError(InputError):
    """A manifest that cannot be read, or no scenes at all."""


@dataclasses.dataclass(frozen=True)
class Scene:
    """One input (folder of images, video or .npz; its resolved path) and the name of its output
    directory ROOT/<name>. `fingerprint`: the input's content hash once it is planned (`input_fingerprint`)."""
    name: str
    path: Path
    fingerprint: str | None = None

    def identity(self) -> dict:
        """What report.json records of the input (`IDENTITY`)."""
        return {"input": str(self.path), "fingerprint": self.fingerprint}


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


def name_scenes(inputs: Iterable[str | Path], root: str | Path | None = None) -> list[Scene]:
    """Scenes sorted by resolved input path (an input given twice, through `..` or a symbolic link,
    is one scene), named after their input (folder name or file stem of the first path given for it,
    unsafe characters replaced). An input whose finished scene ROOT already holds (`root`; recorded
    in its report.json) keeps that folder's name; the others take, in path order, the first of
    `base`, `base-2`, `base-3`, ... that is neither taken by another input of this run, nor the folder
    of another input's scene in ROOT, nor `RESERVED`. Deterministic, and the same on every process
    (a scene another process publishes meanwhile records the name this naming gave it)."""
    given = sorted({Path(p).absolute() for p in inputs}, key=lambda p: p.as_posix())
    if not given:
        raise SceneListError("no scenes given (INPUT... or --manifest FILE)")
    first: dict[Path, Path] = {}  # resolved input -> the first path given for it (its name)
    for p in given:
        first.setdefault(resolved(p), p)
    paths = sorted(first, key=lambda p: p.as_posix())
    claims = _claims(Path(root)) if root is not None else {}
    taken = {n.lower() for n in RESERVED}
    names: dict[Path, str] = {}
    for p in paths:  # inputs whose scene ROOT holds keep its folder
        name = next((n for n in claims.get(str(p), ()) if n.lower() not in taken), None)
        if name is not None:
            names[p] = name
            taken.add(name.lower())
    taken |= {n.lower() for held in claims.values() for n in held}  # other inputs' scenes are not ours to take
    for p in paths:
        if p in names:
            continue
        base = name = _base_name(first[p])
        n = 1
        while name.lower() in taken:
            n += 1
            name = f"{base}-{n}"
        names[p] = name
        taken.add(name.lower())
    return [Scene(names[p], p) for p in paths]


def _claims(root: Path) -> dict[str, list[str]]:
    """{recorded input path: the names of ROOT's folders holding its finished scene}."""
    claims: dict[str, list[str]] = {}
    if not root.is_dir():
        return claims
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        ident = recorded_identity(completed_report(entry))
        if ident is not None:
            claims.setdefault(ident["input"], []).append(entry.name)
    return claims


def input_fingerprint(path: Path) -> str:
    """Content hash of what a scene reads: the input file (video, .npz, image) or a folder's images
    (`io.image_files.list_images`: their names, sizes and bytes). Reads the bytes once, decodes nothing.
    Raises FsError when the input cannot be read."""
    h = hashlib.blake2b(digest_size=16)
    try:
        for f in list_images(path) if path.is_dir() else [path]:
            with open(f, "rb") as fh:
                h.update(f"{f.name}|{fh.seek(0, 2)}|".encode())
                fh.seek(0)
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    except OSError as e:
        raise FsError(f"{path}: cannot read the input ({e.strerror or e})") from e
    return h.hexdigest()


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


def recorded_identity(report: dict | None) -> dict | None:
    """The input a scene's report.json records (`IDENTITY`), None when it records none (no report,
    or a scene written before identities were recorded)."""
    ident = None if report is None else report.get(IDENTITY)
    return ident if isinstance(ident, dict) and isinstance(ident.get("input"), str) else None


def record_identity(report_path: Path, scene: Scene) -> None:
    """Add the scene's identity to the report.json a scene's run wrote (in its staging directory)."""
    report = json.loads(report_path.read_text())
    atomic_write_json(report_path, {**report, IDENTITY: scene.identity()})


def summary_entry(scene: Scene, status: str, frames: int | None = None, seconds: float | None = None,
                  cache_bytes: int | None = None, error: str | None = None, **extra) -> dict:
    """One scene of summary.json. status: "done" (run now), "skipped" (complete from an earlier run)
    or "failed" (with `error`)."""
    return {"scene": scene.name, "input": str(scene.path), "status": status, "frames": frames,
            "seconds": seconds, "cache_bytes": cache_bytes, "error": error, **extra}
