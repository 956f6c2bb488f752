"""Process-level helpers of the command line: peak memory, memory available to a device, SIGTERM
handled like Ctrl-C (so every `finally` block cleans up when a cluster scheduler stops a run), and
JAX's persistent compilation cache."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def host_available_bytes() -> int | None:
    """Memory the host can still give this process (Linux MemAvailable; else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def device_available_bytes(device=None) -> int | None:
    """Bytes still allocatable on `device` (default: the first JAX device): the allocator's limit minus
    what is in use on accelerators, the host's available memory on CPU; None when unknown."""
    import jax

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return host_available_bytes()
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (or SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_as_interrupt(signums=(signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise `Terminated` (a KeyboardInterrupt) in the main thread,
    so cleanup runs exactly as for Ctrl-C. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


COMPILE_CACHE_MIN_SECONDS = 1.0  # compilations faster than this are not worth a cache entry


def compile_cache_dir() -> Path:
    """Per-user persistent JAX compilation cache: $XDG_CACHE_HOME/xsvggt-jax/jax-compile."""
    from xsvggt_jax.weights.cached import default_cache_dir

    return default_cache_dir() / "jax-compile"


def configure_compile_cache(enabled: bool) -> None:
    """Turn JAX's persistent compilation cache on (in `compile_cache_dir`, unless the user configured
    one, e.g. with JAX_COMPILATION_CACHE_DIR) or off."""
    import jax

    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if jax.config.jax_compilation_cache_dir:
        return
    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)  # trusted content: the user's only
    except OSError as e:
        log.warning("compilation cache disabled: cannot create %s (%s)", path, e)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_SECONDS)
