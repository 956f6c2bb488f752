"""Process-level helpers of the command line: peak memory (host and device), memory available to a
device, accelerator memory on demand (JAX's preallocation off unless asked for), SIGTERM handled like
Ctrl-C (so every `finally` block cleans up when a cluster scheduler stops a run), and JAX's persistent
compilation cache."""

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

from xsvggt_jax.errors import ConfigError

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


def _memory_stats(device) -> dict | None:
    """The allocator's statistics of a JAX device (GPU/TPU), None where the backend keeps none (CPU)."""
    try:
        return device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):  # backends without memory stats
        return None


def device_available_bytes(device=None) -> int | None:
    """Bytes still allocatable on `device` (default: the first JAX device): the allocator's limit minus
    what is in use on accelerators (`bytes_limit - bytes_in_use` of its memory stats), the host's
    available memory on CPU; None when unknown."""
    import jax

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return host_available_bytes()
    stats = _memory_stats(device)
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def device_peak_bytes(device=None) -> int | None:
    """Peak bytes in use so far on `device` (default: the first JAX device), from its allocator's
    `peak_bytes_in_use`; None where the backend keeps no memory stats (CPU)."""
    import jax

    stats = _memory_stats(device or jax.devices()[0])
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# JAX's own variables for GPU memory (https://docs.jax.dev/en/latest/gpu_memory_allocation.html), read
# by jaxlib once, when the GPU backend starts. Only the command line's entry point sets them
# (`configure_device_memory`); nothing else in the package reads them.
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
MEM_FRACTION = "XLA_CLIENT_MEM_FRACTION"  # XLA_PYTHON_CLIENT_MEM_FRACTION is its deprecated name
JAX_MEMORY_VARIABLES = (PREALLOCATE, MEM_FRACTION, "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")


class MemoryConfigError(ConfigError):
    """A memory fraction out of (0, 1], or one given while JAX's memory variables are set."""


def configure_device_memory(fraction: float | None = None, environ=None) -> dict[str, str]:
    """Set how JAX takes accelerator memory, before its backend starts: on demand by default
    (XLA_PYTHON_CLIENT_PREALLOCATE=false, instead of JAX's 75% of the GPU reserved at start, so memory
    in use is what the run uses), or with `fraction` that share of the GPU preallocated
    (XLA_PYTHON_CLIENT_PREALLOCATE=true, XLA_CLIENT_MEM_FRACTION=fraction). JAX memory variables the
    user set are left alone (and a `fraction` beside them is a MemoryConfigError). `environ`: the
    process environment (os.environ) unless given. Returns the variables set. No effect on a backend
    that already started, nor on CPU."""
    environ = os.environ if environ is None else environ
    if fraction is not None and not 0 < fraction <= 1:
        raise MemoryConfigError(f"the memory fraction must be in (0, 1], got {fraction}")
    user = {k: environ[k] for k in JAX_MEMORY_VARIABLES if environ.get(k)}  # '' is unset, as for jaxlib
    if user:
        if fraction is not None:
            set_ = ", ".join(f"{k}={v}" for k, v in user.items())
            raise MemoryConfigError(f"a memory fraction was given while the environment sets {set_}: use one")
        log.debug("device memory: as the environment sets it (%s)", user)
        return {}
    settings = {PREALLOCATE: "false"} if fraction is None else {PREALLOCATE: "true", MEM_FRACTION: str(float(fraction))}
    environ.update(settings)
    log.debug("device memory: %s", settings)
    return settings


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

    def unraisable(info):
        # A signal that lands while Python runs a finalizer or a GC callback (e.g. jax's) raises
        # Terminated there, where Python prints "Exception ignored in ..." and carries on: deliver the
        # signal again from a helper thread, so it is raised in the main program.
        if isinstance(info.exc_value, Terminated):
            threading.Timer(0.05, os.kill, (os.getpid(), info.exc_value.signum)).start()
            return
        previous_hook(info)

    previous = {s: signal.signal(s, handler) for s in signums}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
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
