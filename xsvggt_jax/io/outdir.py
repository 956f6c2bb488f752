"""An output directory that xsvggt writes into without ever deleting what it did not write.

A run is built in a hidden staging sibling `.NAME.tmp-XXXX` (carrying an ownership marker, see
`fsutil`). When it completes:

* a new (or empty) OUTDIR receives the staged files;
* an existing OUTDIR written by xsvggt (it holds `MANIFEST`, the list of files the last run wrote)
  gets the new files renamed over the old ones, and only the files the manifest lists and the new
  run no longer writes are removed. Anything else in it (notes, an input folder, ...) is kept;
* an existing non-empty OUTDIR without a manifest is refused unless `overwrite`, which then replaces
  only the files whose names the run writes: nothing else is removed.

An OUTDIR that is a symbolic link is followed: the link target is treated exactly as above (its
foreign files are kept) and the link itself stays. A dangling link (or a link loop) is refused, and so
is an OUTDIR on a read-only file system or without write permission (`fsutil.check_writable`), before
any work.

Staging directories left by a killed run are removed by the next run into the same OUTDIR when their
marker proves the process is dead, and named otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from xsvggt_jax.io.fsutil import (OWNER_FILE, PRODUCER, FsError, atomic_write_json, check_writable, link_problem,
                                  owned_tempdir, resolved, sweep_leftovers, write_error)

log = logging.getLogger(__name__)

MANIFEST = ".xsvggt-manifest.json"
LEGACY_REPORT = "report.json"  # outputs of xsvggt before manifests: report.json["producer"]


def _files(root: Path) -> list[str]:
    """Relative paths of the regular files under `root` (sorted; markers excluded)."""
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = (Path(dirpath) / n).relative_to(root).as_posix()
            if rel not in (OWNER_FILE, MANIFEST):
                out.append(rel)
    return sorted(out)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class OutputDir:
    """OUTDIR for one run. `protect`: inputs of the run, never replaced or removed."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, protect: Iterable[str | os.PathLike] = ()):
        given = Path(path).absolute()
        if given.is_symlink() and not given.exists():
            raise FsError(f"{given} is {link_problem(given)}")
        self.given = given
        self.final = given.resolve() if given.is_symlink() else given
        self.overwrite = overwrite
        self.protect = [resolved(p) for p in protect]  # an input that is a link loop protects nothing
        self.check()

    # -------------------------------------------------------------------------------- checks
    def previous(self) -> set[str] | None:
        """Files the last xsvggt run wrote here (its manifest); None when OUTDIR is not ours."""
        try:
            data = json.loads((self.final / MANIFEST).read_text())
            if isinstance(data, dict) and data.get("producer") == PRODUCER and isinstance(data.get("files"), list):
                return {str(f) for f in data["files"]}
        except (OSError, UnicodeDecodeError, ValueError):
            pass
        try:
            if json.loads((self.final / LEGACY_REPORT).read_text()).get("producer") == PRODUCER:
                return set()  # ours, from before manifests: same-named files may be replaced, none removed
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            pass
        return None

    def check(self) -> None:
        """Refuse before any work: a file in the way, a read-only or not writable place, a foreign
        non-empty directory, an input at risk."""
        final = self.final
        if final.exists() and not final.is_dir():
            raise FsError(f"{final} exists and is not a directory")
        check_writable(final.parent)  # the staging sibling, and the rename that publishes it
        if final.is_dir():
            check_writable(final)
        if not final.is_dir() or not any(final.iterdir()):
            return
        previous = self.previous()
        if previous is None and not self.overwrite:
            raise FsError(f"{final} already exists, is not empty and was not written by xsvggt "
                          "(use --overwrite to write into it: files with xsvggt's output names are replaced, "
                          "others are kept)")
        for rel in previous or ():
            if any(_inside(p, (final / rel).resolve()) or _inside((final / rel).resolve(), p) for p in self.protect):
                raise FsError(f"the input {rel} lies among the outputs of an earlier run in {final}; "
                              "move it or write to another OUTDIR")

    def leftovers(self) -> list[Path]:
        """Staging directories of earlier runs into this OUTDIR: removed when provably ours and dead;
        the others are returned (to be named)."""
        parent, name = self.final.parent, self.final.name
        if not parent.is_dir():
            return []
        found = sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-"))
        return sweep_leftovers(found)

    # ------------------------------------------------------------------------------- staging
    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """Yield an empty staging directory; publish it into OUTDIR on normal exit, remove it on any
        exception (Ctrl-C and SIGTERM included)."""
        for p in self.leftovers():
            log.warning("%s looks like the leftover of another xsvggt run (still running, from another host, "
                        "or not ours): not removed", p)
        try:
            tmp = owned_tempdir(self.final.parent, f".{self.final.name}.tmp-", "staging")
        except OSError as e:
            if (err := write_error(e)) is None:
                raise
            raise err from e
        try:
            yield tmp
            self._publish(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path) -> None:
        final = self.final
        new = _files(tmp)
        if not final.exists():
            atomic_write_json(tmp / MANIFEST, {"producer": PRODUCER, "files": new})
            (tmp / OWNER_FILE).unlink()
            os.replace(tmp, final)
            return
        self.check()  # again: the directory may have changed during the run
        previous = self.previous() or set()
        for rel in new:
            dest = final / rel
            if any(_inside(dest.resolve(), p) or _inside(p, dest.resolve()) for p in self.protect):
                raise FsError(f"writing {dest} would replace an input of this run; write to another OUTDIR")
            for a in reversed(dest.relative_to(final).parents[:-1]):  # directories on the way
                if (final / a).is_symlink() or ((final / a).exists() and not (final / a).is_dir()):
                    raise FsError(f"{final / a} is in the way of xsvggt's {rel} (a file or a link where a "
                                  "directory is written); move it away")
            if dest.is_dir() and not dest.is_symlink():
                raise FsError(f"{dest} is a directory where xsvggt writes a file; move it away")
        # the manifest first lists old and new files, so an interruption never orphans a file of ours
        atomic_write_json(final / MANIFEST, {"producer": PRODUCER, "files": sorted(previous | set(new))})
        for rel in new:
            (final / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, final / rel)
        for rel in sorted(previous - set(new)):
            stale = final / rel
            if stale.is_file() or stale.is_symlink():
                stale.unlink()
                for parent in stale.parents:  # directories the old run made and that are now empty
                    if parent == final or not _inside(parent, final) or any(parent.iterdir()):
                        break
                    parent.rmdir()
        atomic_write_json(final / MANIFEST, {"producer": PRODUCER, "files": new})
