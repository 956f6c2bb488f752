"""Filesystem safety: atomic writes, free-space checks, ownership markers and leftover sweeping.

The rules every writer in xsvggt follows:

* a file is written to a temporary name beside its destination and renamed over it when complete
  (`atomic_write`), so a reader never sees a partial file;
* a directory xsvggt creates for its own work carries an ownership marker (`OWNER_FILE`: producer,
  purpose, host, pid and the pid's start time), so a later run can prove a leftover is ours and that
  the process that made it is gone before removing it (`sweep_leftovers`);
* nothing without that proof is deleted: it is named in a warning instead.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from xsvggt_jax.errors import ResourceError

log = logging.getLogger(__name__)

PRODUCER = "xsvggt-jax"
OWNER_FILE = ".xsvggt-owner.json"
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}


class FsError(ResourceError):
    """A filesystem problem the user must fix: no space, read-only, or a directory xsvggt may not touch."""


# ------------------------------------------------------------------------------------ atomic writes
def atomic_write(path: str | os.PathLike, writer: Callable[[IO[bytes]], None], mode: int = 0o644) -> Path:
    """Call `writer` on a binary temporary file beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_savez(path: str | os.PathLike, **arrays) -> Path:
    """`np.savez(path, **arrays)` through a temporary file."""
    import numpy as np
    return atomic_write(path, lambda f: np.savez(f, **arrays))


# ---------------------------------------------------------------------------------------- disk space
def existing_ancestor(path: Path) -> Path:
    """`path` or its nearest existing parent (where a not-yet-created path's bytes will land)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged user may still write on the filesystem holding `path`."""
    st = os.statvfs(existing_ancestor(Path(path)))
    return int(st.f_bavail * st.f_frsize)


def check_writable(path: str | os.PathLike) -> None:
    """Raise FsError (`disk_error_message`'s wording) when files cannot be created in `path`, or in its
    nearest existing parent when it does not exist yet: a read-only file system (EROFS) or no write
    permission (EACCES). Checked before any work; nothing is written."""
    where = existing_ancestor(Path(path))
    code = None
    try:
        if os.statvfs(where).f_flag & os.ST_RDONLY:
            code = errno.EROFS
    except OSError:
        pass
    if code is None and where.is_dir() and not os.access(where, os.W_OK | os.X_OK):
        code = errno.EACCES
    if code is not None:
        raise FsError(disk_error_message(OSError(code, os.strerror(code), str(where))))


def check_free_space(needs: Mapping[Path, int], margin: float = 1.1) -> None:
    """Raise FsError when a filesystem lacks room for what will be written to it, or cannot be
    written at all (`check_writable`: a read-only file system reports no free space).

    needs: destination path -> estimated bytes; paths on one filesystem are summed.
    """
    by_device: dict[int, tuple[Path, int]] = {}
    for path, nbytes in needs.items():
        check_writable(path)
        dev = os.stat(existing_ancestor(path)).st_dev
        first, total = by_device.get(dev, (path, 0))
        by_device[dev] = (first, total + int(nbytes))
    for path, total in by_device.values():
        need, have = int(total * margin), free_bytes(path)
        if need > have:
            raise FsError(f"not enough free disk space for {path}: about {format_bytes(need)} needed, "
                          f"{format_bytes(have)} free (free some space or write elsewhere)")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def disk_error_message(e: OSError) -> str | None:
    """One line for an OSError the user can fix (full disk, quota, read-only, permissions); else None.
    The one place that words these errors (`DISK_ERRNOS`): `check_writable` and every command use it."""
    if e.errno not in DISK_ERRNOS:
        return None
    where = f" ({e.filename})" if e.filename else ""
    return f"cannot write{where}: {DISK_ERRNOS[e.errno]}"


def chained_disk_error_message(e: BaseException) -> str | None:
    """`disk_error_message` of the first OSError in e's chain (e, its __cause__ / __context__, ...):
    libraries such as orbax re-raise a full disk from their writer threads wrapped in their own types."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and (msg := disk_error_message(e)):
            return msg
        e = e.__cause__ or e.__context__
    return None


def write_error(e: OSError) -> FsError | None:
    """`disk_error_message` of `e` as an FsError to raise from it, else None."""
    msg = disk_error_message(e)
    return None if msg is None else FsError(msg)


# ------------------------------------------------------------------------------------ symbolic links
def link_problem(path: str | os.PathLike) -> str | None:
    """Why `path` does not exist although a symbolic link is there ("a symbolic link loop", "a broken
    symbolic link to ..."), else None."""
    path = Path(path)
    if not path.is_symlink() or path.exists():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop so
        return "a symbolic link loop"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
    return f"a broken symbolic link to {os.readlink(path)}"


def resolved(path: str | os.PathLike) -> Path:
    """`path` made absolute with its symbolic links and `..` resolved as far as they go (a link loop
    stays as written; never raises)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def preallocate(path: Path) -> None:
    """Reserve the blocks of an (e.g. freshly created, sparse) file now: a full disk then raises
    OSError(ENOSPC) here instead of killing the process with SIGBUS when a memory map is written."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            os.posix_fallocate(f.fileno(), 0, size)


# ------------------------------------------------------------------------------- ownership markers
def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc; None elsewhere or when the pid is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def owner_record(purpose: str) -> dict:
    """Who is creating a directory: producer, purpose, host, pid and the pid's start time."""
    pid = os.getpid()
    return {"producer": PRODUCER, "purpose": purpose, "host": socket.gethostname(), "pid": pid,
            "pid_start": _process_start(pid), "created": time.time()}


def write_owner(directory: Path, purpose: str, **extra) -> dict:
    record = {**owner_record(purpose), **extra}
    atomic_write_json(Path(directory) / OWNER_FILE, record)
    return record


def read_owner(directory: Path) -> dict | None:
    """The ownership record of `directory`, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads((Path(directory) / OWNER_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("producer") == PRODUCER else None


def owner_status(record: Mapping) -> str:
    """"dead" only when provable (same host, and the pid is gone or now another process), "alive" when
    the process runs on this host, "unknown" otherwise (another host, no pid)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return "unknown"
    pid = record["pid"]
    if pid == os.getpid():
        return "alive"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:  # alive, another user's
        return "alive"
    start = _process_start(pid)
    reused = start is not None and record.get("pid_start") is not None and start != record["pid_start"]
    return "dead" if reused else "alive"


def sweep_leftovers(candidates: Iterable[Path]) -> list[Path]:
    """Remove the directories among `candidates` that carry our marker and whose process is dead.

    Returns those kept (no marker, or a live / unverifiable owner) so the caller can name them; this
    process's own directories are neither removed nor returned.
    """
    kept = []
    for path in candidates:
        if not path.is_dir() or path.is_symlink():
            kept.append(path)
            continue
        record = read_owner(path)
        if record is not None and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
            continue  # this process's own (e.g. the demo's parameters)
        if record is not None and owner_status(record) == "dead":
            log.warning("removing %s, left by an interrupted xsvggt run (pid %s)", path, record["pid"])
            shutil.rmtree(path, ignore_errors=True)
        else:
            kept.append(path)
    return kept


def owned_tempdir(parent: Path, prefix: str, purpose: str) -> Path:
    """A fresh hidden directory in `parent` (normal permissions) carrying our ownership marker."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700
    write_owner(tmp, purpose)
    return tmp
