"""A training run's directory (`xsvggt train --out`): its identity, the lock that admits one live run,
and the one-line messages for filesystem errors while it is written.

* Identity: `run.json` holds the settings that determine the run's numbers (`RunConfig.to_json`, format
  `RUN_FORMAT`). A re-run into the same directory must carry the same settings and resumes; path-valued
  settings (`PATH_KEYS`) are compared as resolved absolute paths, so `--init p/` and `--init ./p` are
  the same run. A `run.json` that is not an xsvggt training run's, or a non-empty directory without one,
  is refused, as is an --out that is not a directory.
* Lock: a live run holds an exclusive `flock` on `LOCK_FILE` in the directory, and the file carries its
  owner record (`fsutil.owner_record`: host, pid, the pid's start time), so a second run into the same
  directory is refused naming the live one. The kernel drops the lock when the process ends, however it
  ends: a crashed run leaves no stale lock (the record left behind is only information). On a filesystem
  without `flock`, the record's liveness (`fsutil.owner_status`) decides instead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

from xsvggt_jax.errors import InputError
from xsvggt_jax.io.fsutil import DISK_ERRNOS, disk_error_message, owner_record, owner_status

log = logging.getLogger(__name__)

RUN_FORMAT = "xsvggt-train/2"  # 2: optimizer settings are arrays in the checkpointed state
RUN_FILE = "run.json"
LOCK_FILE = ".xsvggt-train.lock"
#: flattened run.json keys that hold paths (compared resolved; "init" may be "random")
PATH_KEYS = ("init", "teacher", "data.root")
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EBADF}


class RunError(InputError):
    """The output directory holds another run (different settings), files that are not ours, or is
    not a directory."""


class RunInUseError(RunError):
    """Another live `xsvggt train` run holds the output directory."""


def normalise_path(value: Optional[str]) -> Optional[str]:
    """A path setting as stored in run.json: resolved and absolute ("random" and None unchanged)."""
    if value is None or value == "random":
        return value
    return str(Path(value).expanduser().resolve())


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested JSON objects -> {"optim.steps": 3, ...}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def _settings(run_json: dict) -> dict[str, Any]:
    flat = _flatten(json.loads(json.dumps(run_json)))  # tuples -> lists, as read back from the file
    return {k: normalise_path(v) if k in PATH_KEYS and isinstance(v, str) else v for k, v in flat.items()}


def check_out_path(out: Path) -> None:
    """RunError when `out` exists and is not a directory."""
    if Path(out).exists() and not Path(out).is_dir():
        raise RunError(f"--out {out} exists and is not a directory: give a run directory (new, or one to resume)")


def check_out_dir(out: Path, run, locked: bool = False) -> bool:
    """True when `out` holds this run to resume; False when it is new or empty. Raises RunError for an
    --out that is not a directory, another run, a non-empty directory that is not a training run, and
    RunInUseError when a live run holds it (unless `locked`: this process holds the lock). Writes
    nothing. run: a `loop.RunConfig`."""
    out = Path(out)
    check_out_path(out)
    if not locked and (out / LOCK_FILE).exists():
        _probe_lock(out)
    marker = out / RUN_FILE
    if marker.exists():
        try:
            stored = json.loads(marker.read_text())
        except (IsADirectoryError, UnicodeDecodeError, ValueError) as e:
            raise RunError(f"{marker} is not an xsvggt training run's ({e}); use another --out") from e
        if not isinstance(stored, dict) or not str(stored.get("format", "")).startswith("xsvggt-train/"):
            raise RunError(f"{out} holds a {RUN_FILE} that is not an xsvggt training run's "
                           f"(no \"format\": \"{RUN_FORMAT}\"); use another --out")
        old, current = _settings(stored), _settings(run.to_json())
        if old != current:
            diff = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
            raise RunError(f"{out} holds a training run with other settings ({', '.join(diff)}); "
                           "use another --out")
        return True
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise RunError(f"{out} exists and is not an xsvggt training run; use another --out")
    return False


# ------------------------------------------------------------------------------------------- lock
def _read_record(fd: int) -> Optional[dict]:
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _in_use(out: Path, record: Optional[dict]) -> RunInUseError:
    who = (f"pid {record.get('pid')} on host {record.get('host')}" if record else "no owner record yet")
    return RunInUseError(f"{out} is in use by another xsvggt train run ({who}): wait for it to end or stop it, "
                         "or use another --out")


def _probe_lock(out: Path) -> None:
    """Raise RunInUseError when a live run holds `out`'s lock (takes and drops the lock otherwise)."""
    try:   # read-write: flock over NFS is emulated with fcntl locks, whose write locks need it
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return
    except OSError:                        # not ours to write (read-only, permissions): read it only
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    try:
        if _lock(fd) is False:
            raise _in_use(out, _read_record(fd))
    finally:
        os.close(fd)                       # closing drops a lock taken here


def _lock(fd: int) -> Optional[bool]:
    """flock(fd) without waiting: True taken, False held by another open file, None when the
    filesystem has no flock (then a live owner record counts as held)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
    record = _read_record(fd)
    alive = record is not None and record.get("pid") != os.getpid() and owner_status(record) == "alive"
    return False if alive else None


class RunLock:
    """The held lock of a run directory (`claim_run_dir`); `release()` (or leaving the `with` block)
    drops it, and removes the directory again when this claim created it and nothing else was written."""

    def __init__(self, out: Path, fd: int, created: bool):
        self.out, self.fd, self.created = out, fd, created

    def release(self) -> None:
        if self.fd is None:
            return
        path = self.out / LOCK_FILE
        try:
            if self.created and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
                path.unlink()
                self.out.rmdir()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_dir(out: Path) -> RunLock:
    """Create `out` if needed and take its lock for this process; RunInUseError when a live run holds
    it. The lock file then carries this process's owner record."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if _lock(fd) is False:
                raise _in_use(out, _read_record(fd))
            # the file may have been replaced between open() and flock(): the lock must be on the file
            # the path names now
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        data = json.dumps(owner_record("train")).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        RunLock(out, fd, created).release()
        raise
    return RunLock(out, fd, created)


# ------------------------------------------------------------------------------ filesystem errors
_HINTS = {errno.ENOSPC: "free space and re-run with the same --out to resume from the last checkpoint",
          errno.EDQUOT: "free space (or raise the quota) and re-run with the same --out to resume from the "
                        "last checkpoint",
          errno.EROFS: "--out must be on a writable file system: remount it read-write and re-run with the same "
                       "--out, or use another --out",
          errno.EACCES: "give write permission there and re-run with the same --out, or use another --out",
          errno.EPERM: "give write permission there and re-run with the same --out, or use another --out"}


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_QUOTED_FILE = re.compile(r'(?:local file|Failed writing:) "([^"]+)"')


def os_error_in(e: Optional[BaseException], errnos: set[int]) -> Optional[OSError]:
    """The first OSError with an errno in `errnos` in e's chain (e, its __cause__ / __context__, ...),
    or one rebuilt from an error's text: tensorstore (orbax's array writer) raises a ValueError
    "... local file \"PATH\" ... [os_error_code='28']". None when there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in errnos:
            return e
        code = _OS_ERROR_CODE.search(str(e))
        if code and int(code.group(1)) in errnos:
            where = _QUOTED_FILE.search(str(e))
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))), where.group(1) if where else None)
        e = e.__cause__ or e.__context__
    return None


def disk_error_line(e: BaseException) -> Optional[str]:
    """One line (what failed and what to do) for a full disk / quota / read-only / permission error in
    e's chain (`os_error_in`); None for any other error."""
    err = os_error_in(e, set(DISK_ERRNOS))
    return None if err is None else f"{disk_error_message(err)}; {_HINTS[err.errno]}"
