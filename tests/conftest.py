"""Shared fixtures. The upstream reference data lives beside the repo in ../shared/reference.

On a user's fresh clone it is absent and the parity tests skip with a reason; CI sets
XSVGGT_REQUIRE_REFERENCE=1 so a missing reference fails instead of silently skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", False)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
TINY = REFERENCE / "tiny"


def require_reference(path: Path = REFERENCE) -> Path:
    if not path.exists():
        msg = f"upstream reference data not found at {path}"
        if os.environ.get("XSVGGT_REQUIRE_REFERENCE") == "1":
            pytest.fail(msg + " (XSVGGT_REQUIRE_REFERENCE=1)")
        pytest.skip(msg)
    return path


# XLA's CPU back end with LLVM's cheaper pipeline, for the whole run: this process (set before jax
# creates its backend, which reads XLA_FLAGS once) and, through the environment, every subprocess the
# tests start. It compiles this model's programs 40-45% faster (tests/test_cache.py +
# test_policies_new.py: 98 s of CPU against 177 s), and compile time is most of the suite's. The HLO
# programs are the same; only LLVM's code generation for them differs, so results move by rounding
# only: every parity test passes at its unchanged tolerance under both pipelines (e.g. the KTVT
# stream's whole-stream error is 1.3e-5 here and 6.7e-6 with XLA's defaults, against 5e-4). To run
# the suite with XLA's default pipeline: XSVGGT_TEST_XLA_DEFAULTS=1 python -m pytest.
CHILD_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
if os.environ.get("XSVGGT_TEST_XLA_DEFAULTS") != "1":
    _flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in CHILD_XLA_FLAGS if f not in _flags])


def child_xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a subprocess: this run's flags (above) and `extra` (e.g.
    --xla_force_host_platform_device_count=N)."""
    return " ".join(filter(None, [os.environ.get("XLA_FLAGS"), *extra]))


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def run_error(argv, capsys) -> str:
    """Run the CLI's main(argv), expect exit code 2 and one `xsvggt: error: ...` line; return it."""
    from xsvggt_jax.app.cli import main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xsvggt: error: ") and "\n" not in err, err
    return err


# The test files in descending order of their run time on a 2-core CPU (pytest --durations, summed per
# file: a clean-clone CI run of 2026-12-07, with the cheaper LLVM pipeline above). pyproject's addopts
# hand whole files to two xdist workers in collection order (--dist loadfile --no-loadscope-reorder): the
# longest files go first and the short ones fill in at the end (longest-processing-time scheduling), so
# the two workers finish close together instead of one starting a multi-minute file while the other is
# done. Files not named here follow, in name order.
HEAVIEST_FIRST = (
    "test_train_step.py", "test_many.py", "test_parity.py", "test_product.py", "test_notebooks.py",
    "test_multidevice.py", "test_step.py", "test_cache.py", "test_safety.py", "test_parallel.py", "test_quant.py",
    "test_benchmarks.py", "test_live.py", "test_weight_quant.py", "test_cli.py", "test_precision.py",
    "test_packed_attention.py", "test_params.py", "test_seqpar.py", "test_model_shapes.py", "test_attention.py",
    "test_view.py", "test_eval_runner.py", "test_policies_new.py", "test_policies.py", "test_quality_scale.py",
    "test_pretrained.py", "test_vggt.py", "test_train_losses.py", "test_track_mask.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Reorder the collected tests file by file as HEAVIEST_FIRST says (a stable sort: the tests of one
    file keep their order)."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


SESSION_COMPILE_CACHE_MIN_SECONDS = 0.3  # cache the model steps, not every tiny helper jit


@pytest.fixture(scope="session", autouse=True)
def user_cache_home(tmp_path_factory):
    """The CLI's per-user caches (converted checkpoints, JAX compilation cache) go to a test folder.

    The run also shares one JAX persistent compilation cache, in a folder created for this run (never
    a user's): tests, the subprocesses they start (through the environment) and, under pytest-xdist,
    the other workers (the folder sits in the run's temporary root) that compile the same program
    (same model, cache config, shapes and devices) compile it once. Set here only: the library and the
    CLI keep their own defaults."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp = <run root>/popen-gwN: one folder for all workers
        compile_dir = tmp_path_factory.getbasetemp().parent / "jax-compile"
        compile_dir.mkdir(exist_ok=True)
        compile_dir = str(compile_dir)
    else:
        compile_dir = str(tmp_path_factory.mktemp("jax-compile"))
    old = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir",
                                                        "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", compile_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", SESSION_COMPILE_CACHE_MIN_SECONDS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        mp.setenv("JAX_COMPILATION_CACHE_DIR", compile_dir)
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(SESSION_COMPILE_CACHE_MIN_SECONDS))
        yield
    for name, value in old.items():
        jax.config.update(name, value)


def micro_cfg():
    """A very small model (random weights) for shape / trace tests; 28x28 frames = 2x2 patches."""
    from xsvggt_jax.config import ModelConfig
    return ModelConfig.preset("micro")


def micro_frames(n: int, seed: int = 0, hw=(28, 28)) -> np.ndarray:
    """[n, 1, H, W, 3] float32 uniform frames in [0, 1] (a stream of batch-1 NHWC frames)."""
    return np.random.default_rng(seed).uniform(size=(n, 1, *hw, 3)).astype(np.float32)


def nhwc(images: np.ndarray):
    """Reference frames [S, 3, H, W] -> jnp [S, H, W, 3]."""
    import jax.numpy as jnp
    return jnp.asarray(images.transpose(0, 2, 3, 1))


@pytest.fixture(scope="session")
def micro():
    """(micro_cfg(), its random parameters, committed to the default device like loaded ones)."""
    from xsvggt_jax.nn.model import init_params
    cfg = micro_cfg()
    return cfg, jax.device_put(init_params(cfg, jax.random.PRNGKey(0)), jax.devices()[0])


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return require_reference(TINY)


@pytest.fixture(scope="session")
def tiny_cfg(tiny_dir):
    from xsvggt_jax.config import ModelConfig
    return ModelConfig.from_spec(tiny_dir / "spec.json", dtype="float32")  # parity: float32 on every backend


@pytest.fixture(scope="session")
def tiny_params(tiny_dir, tiny_cfg):
    """The reference weights, converted and committed to the default device, as `io.params.load_params`
    returns them: the tests then compile the programs the CLI compiles (a committed argument adds
    sharding annotations to the program), and share them through the run's compilation cache."""
    from xsvggt_jax.weights.convert import convert_state_dict
    from xsvggt_jax.weights.torch_reader import read_state_dict
    params = convert_state_dict(read_state_dict(tiny_dir / "weights.pth"), tiny_cfg, source="weights.pth")
    return jax.device_put(params, jax.devices()[0])


@pytest.fixture(scope="session")
def tiny_frames(tiny_dir):
    d = np.load(tiny_dir / "frames.npz")
    return d["images"], d["query_points"]
