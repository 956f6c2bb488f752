"""runtime.py's device memory: JAX's GPU preallocation off by default (set by the CLI's entry point
before the backend starts, never over the user's own JAX memory variables), `--memory-fraction`, the
device's peak and available bytes from its allocator's stats (faked here: the tests run on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from conftest import run_error
from xsvggt_jax import runtime
from xsvggt_jax.app.cli import main
from xsvggt_jax.runtime import (JAX_MEMORY_VARIABLES, MemoryConfigError, configure_device_memory,
                                device_available_bytes, device_peak_bytes)

ROOT = Path(__file__).resolve().parents[1]
GB = 1 << 30


# ------------------------------------------------------------------------------ configure_device_memory
def test_default_turns_preallocation_off():
    env = {"PATH": "/bin"}
    assert configure_device_memory(None, env) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert env == {"PATH": "/bin", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def test_fraction_preallocates_that_share():
    env = {}
    configure_device_memory(0.25, env)
    assert env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "XLA_CLIENT_MEM_FRACTION": "0.25"}


@pytest.mark.parametrize("name", JAX_MEMORY_VARIABLES)
def test_user_memory_variables_are_left_alone(name):
    env = {name: "0.5" if "FRACTION" in name else "true" if "PREALLOCATE" in name else "platform"}
    before = dict(env)
    assert configure_device_memory(None, env) == {} and env == before
    with pytest.raises(MemoryConfigError, match=name):  # a flag beside them: refused, not merged
        configure_device_memory(0.5, env)
    assert env == before


def test_empty_user_variable_counts_as_unset():
    """jaxlib ignores an empty XLA_PYTHON_CLIENT_PREALLOCATE, so preallocation would still be on."""
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": ""}
    configure_device_memory(None, env)
    assert env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan")])
def test_fraction_out_of_range(fraction):
    env = {}
    with pytest.raises(MemoryConfigError, match=r"\(0, 1\]"):
        configure_device_memory(fraction, env)
    assert env == {}


# ------------------------------------------------------------------------------------ the entry point
@pytest.fixture
def clean_env(monkeypatch):
    """No JAX memory variable set; what main sets is undone after the test (monkeypatch.delenv of an
    unset variable would not undo it)."""
    saved = {k: os.environ.pop(k) for k in JAX_MEMORY_VARIABLES if k in os.environ}
    yield monkeypatch
    for k in JAX_MEMORY_VARIABLES:
        os.environ.pop(k, None)
    os.environ.update(saved)


def _reconstruct_missing(tmp_path, *flags):
    """A `reconstruct` that fails fast (its input does not exist), after main configured the device."""
    return ["reconstruct", str(tmp_path / "missing.npz"), "--params", str(tmp_path / "params"),
            "--out", str(tmp_path / "out"), *flags]


@pytest.mark.parametrize("flags, expected", [
    ((), {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_CLIENT_MEM_FRACTION": None}),
    (("--memory-fraction", "0.4"), {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "XLA_CLIENT_MEM_FRACTION": "0.4"}),
])
def test_main_sets_memory_variables(flags, expected, clean_env, tmp_path, capsys):
    run_error(_reconstruct_missing(tmp_path, *flags), capsys)
    assert {k: os.environ.get(k) for k in expected} == expected


def test_main_keeps_user_memory_variables(clean_env, tmp_path, capsys):
    clean_env.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    run_error(_reconstruct_missing(tmp_path), capsys)
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true" and "XLA_CLIENT_MEM_FRACTION" not in os.environ
    clean_env.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".5")
    err = run_error(_reconstruct_missing(tmp_path, "--memory-fraction", "0.4"), capsys)
    assert "--memory-fraction" in err and "XLA_PYTHON_CLIENT_MEM_FRACTION=.5" in err, err
    assert "XLA_CLIENT_MEM_FRACTION" not in os.environ


@pytest.mark.parametrize("command", ["demo", "reconstruct", "reconstruct-many", "eval", "train"])
@pytest.mark.parametrize("value", ["0", "1.01", "-0.5", "nan", "half"])
def test_memory_fraction_validated(command, value, clean_env, tmp_path, capsys):
    err = run_error([command, "--memory-fraction", value, "--out", str(tmp_path / "out")], capsys)
    assert "--memory-fraction" in err and "(0, 1]" in err, err
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ  # refused before anything is set
    assert not (tmp_path / "out").exists()


# The entry point in a fresh process: record whether JAX's backend had started when main configured the
# device memory (it must not have: jaxlib reads the variables once, when the GPU backend starts).
ENTRY_DRIVER = """
import json, os, sys
from jax._src import xla_bridge
import xsvggt_jax.runtime as runtime

started = []
real = runtime.configure_device_memory
def spy(*args, **kwargs):
    started.append(xla_bridge.backends_are_initialized())
    return real(*args, **kwargs)
runtime.configure_device_memory = spy

from xsvggt_jax.app.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps({"started": started, "env": {k: os.environ.get(k) for k in runtime.JAX_MEMORY_VARIABLES}}))
"""


def test_entry_point_configures_before_the_backend_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in JAX_MEMORY_VARIABLES}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", ENTRY_DRIVER, *_reconstruct_missing(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["started"] == [False], got
    assert got["env"] == {k: "false" if k == "XLA_PYTHON_CLIENT_PREALLOCATE" else None
                          for k in JAX_MEMORY_VARIABLES}, got


# ------------------------------------------------------------------------------ device peak / available
class FakeDevice:
    """A JAX device as runtime.py reads it: `platform` and `memory_stats()`."""

    def __init__(self, platform="gpu", stats=None, error=None):
        self.platform, self.stats, self.error = platform, stats, error

    def memory_stats(self):
        if self.error:
            raise self.error
        return self.stats


GPU_STATS = {"bytes_in_use": 3 * GB, "peak_bytes_in_use": 5 * GB, "bytes_limit": 60 * GB,
             "largest_alloc_size": GB, "num_allocs": 12}


def test_device_peak_bytes_on_this_backend():
    peak = device_peak_bytes()
    if jax.default_backend() == "cpu":
        assert peak is None  # the CPU backend keeps no allocator stats
    else:
        assert isinstance(peak, int) and peak >= 0


def test_device_peak_bytes_reads_the_allocator():
    assert device_peak_bytes(FakeDevice(stats=GPU_STATS)) == 5 * GB
    assert device_peak_bytes(FakeDevice(stats=None)) is None
    assert device_peak_bytes(FakeDevice(stats={"bytes_in_use": GB})) is None
    assert device_peak_bytes(FakeDevice(error=NotImplementedError("no stats"))) is None


def test_device_available_bytes_on_accelerators():
    assert device_available_bytes(FakeDevice("gpu", GPU_STATS)) == 57 * GB  # limit - in use
    assert device_available_bytes(FakeDevice("tpu", {"bytes_limit": 16 * GB})) == 16 * GB
    assert device_available_bytes(FakeDevice("gpu", None)) is None
    assert device_available_bytes(FakeDevice("gpu", {"bytes_in_use": GB})) is None
    assert device_available_bytes(FakeDevice("gpu", error=RuntimeError("UNIMPLEMENTED"))) is None


def test_device_available_bytes_on_cpu_is_the_hosts(monkeypatch):
    monkeypatch.setattr(runtime, "host_available_bytes", lambda: 7 * GB)
    assert device_available_bytes(FakeDevice("cpu", GPU_STATS)) == 7 * GB
    if jax.default_backend() == "cpu":
        assert device_available_bytes() == 7 * GB


def test_sigterm_inside_a_finalizer_is_not_lost():
    """A SIGTERM handled while Python runs a finalizer (as jax's GC callback is) raises Terminated
    there, where Python ignores it: the signal is delivered again and stops the program."""
    import signal
    import time

    from xsvggt_jax.runtime import Terminated, signals_as_interrupt

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs here, inside the finalizer
                pass

    started = time.monotonic()
    with pytest.raises(Terminated):
        with signals_as_interrupt():
            Finalized()
            time.sleep(5)
    assert time.monotonic() - started < 4
