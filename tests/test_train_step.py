"""Train step, targets, checkpoints and `xsvggt train` on the micro config (28x42 frames, 2 frames).

One jitted supervised train step is compiled for the module and reused by the overfit, frozen,
trace, resume and distillation tests (a compile costs minutes on a loaded 2-core CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.data.procedural import SceneConfig, make_scene
from xsvggt_jax.nn.model import init_params
from xsvggt_jax.geometry import pose_encoding_to_extri_intri
from xsvggt_jax.train.config import LossConfig
from xsvggt_jax.train.data import DataSource, batch_at, make_clip_fn
from xsvggt_jax.train.state import (UPSTREAM_FROZEN, Checkpoints, OptimConfig, init_state, learning_rate_at,
                                    make_optimizer, param_labels, set_hyperparams)
from xsvggt_jax.train.step import TraceCountError, make_teacher, make_train_step, place_state, shard_batch
from xsvggt_jax.train.targets import supervised_targets

ROOT = Path(__file__).resolve().parents[1]
STEPS = 80
SOURCE = DataSource(batch=1, frames=2, height=28, width=42, seed=3)
OPTIM = OptimConfig(lr=3e-3, warmup=3, steps=STEPS, freeze=UPSTREAM_FROZEN)
# `xsvggt train`'s loss from random weights (test_cli_train_end_to_end_and_resume): with the same model,
# clip shape and loss, the CLI's train step is this fixture's program (the optimizer's settings are
# arrays in the state), so the run's compilation cache compiles it once
LOSS = LossConfig(dense_alignment="none")


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.preset("micro")
    params = init_params(cfg, jax.random.key(0))
    optimizer = make_optimizer(OPTIM, params)
    labels = param_labels(params, OPTIM.freeze)
    step = make_train_step(cfg, optimizer, labels, loss_cfg=LOSS)
    batch = batch_at(make_clip_fn(SOURCE), SOURCE, 0)
    return cfg, params, optimizer, labels, step, batch


@pytest.fixture(scope="module")
def overfit(setup):
    """STEPS steps on one fixed batch: (final state, per-step metrics)."""
    cfg, params, optimizer, _, step, batch = setup
    state = place_state(init_state(_copy(params), optimizer))
    device_batch = shard_batch(batch)
    history = []
    for _ in range(STEPS):
        state, m = step(state, device_batch)
        history.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state, history


# ------------------------------------------------------------------------------------ targets

def test_targets_first_camera_identity_and_consistent_geometry():
    scene = make_scene(SceneConfig(frames=3, height=28, width=42), seed=5, num_queries=0)
    t = supervised_targets(scene.images, scene.depth, scene.extrinsics, scene.intrinsics)
    np.testing.assert_allclose(t["camera_pose"][0, :7], [0, 0, 0, 0, 0, 0, 1], atol=1e-6)
    # the points' mean distance from camera 0 is 1 after normalisation
    assert abs(np.mean(np.linalg.norm(t["pts3d_in_other_view"].reshape(-1, 3), axis=-1)) - 1) < 1e-5
    # frame i's points mapped back into camera i by the encoded (normalised) pose give its depth
    extr, intr = pose_encoding_to_extri_intri(jnp.asarray(t["camera_pose"]), (28, 42))
    extr, intr = np.asarray(extr, np.float64), np.asarray(intr, np.float64)
    np.testing.assert_allclose(intr, scene.intrinsics, rtol=1e-5)
    for i in range(3):
        cam = t["pts3d_in_other_view"][i] @ extr[i, :, :3].T + extr[i, :, 3]
        np.testing.assert_allclose(cam[..., 2], t["depth"][i, ..., 0], rtol=1e-4, atol=1e-5)
    # the scale is the one divisor of depth
    np.testing.assert_allclose(t["depth"][..., 0] * t["scale"], scene.depth, rtol=1e-5)


# ------------------------------------------------------------------------------------ train step

def test_overfit_one_batch_finite_and_one_trace(setup, overfit):
    *_, step, _ = setup
    _, history = overfit
    fit = [h["depth_conf_l1"] + h["camera"] for h in history]
    assert fit[-1] < 0.1 * fit[0], fit
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert all(h["grad_norm"] > 0 for h in history)
    # one trace: make_train_step's step raises TraceCountError on a second (max_traces=1)


def test_each_train_step_counts_its_own_traces(setup):
    """Two train steps made alike in one process (a notebook re-running its cell; a supervised and a
    distillation step) trace once each; one step traced again (another clip length) raises."""
    cfg, params, optimizer, labels, _, batch = setup
    state = place_state(init_state(_copy(params), optimizer))
    twins = [make_train_step(cfg, optimizer, labels, loss_cfg=LOSS) for _ in range(2)]
    for twin in twins:
        twin.trace(state, shard_batch(batch))          # traces (no lowering, no compile)
    longer = SceneConfig(frames=3, height=28, width=42)
    clip = supervised_targets(*[getattr(make_scene(longer, seed=1, num_queries=0), k)
                                for k in ("images", "depth", "extrinsics", "intrinsics")])
    three = {k: clip[k][None] for k in batch}
    with pytest.raises(TraceCountError, match="traced 2 times"):
        twins[0].trace(state, shard_batch(three))


def test_learning_rate_schedule_matches_optax():
    """learning_rate_at (jnp, settings may be traced) against optax.warmup_cosine_decay_schedule."""
    count = np.arange(130)
    for lr, warmup, steps, final in [(1e-4, 10, 100, 0.01), (3e-3, 0, 4, 0.01), (1.0, 5, 3, 0.1), (3e-3, 3, 80, 0.0)]:
        ref = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * final)
        ours = jax.vmap(lambda c: learning_rate_at(c, lr, warmup, steps, final))(count)
        np.testing.assert_allclose(np.asarray(ours), [float(ref(c)) for c in count], rtol=1e-6, atol=1e-7 * lr)


def test_one_compiled_step_serves_every_learning_rate(setup, overfit):
    """The optimizer's settings are arrays in the state: the fixture's step (compiled for OPTIM, traced
    once: a second trace raises) runs other rates and schedules, and the rate scales the update. On a
    first AdamW step every update is -lr * (m / (sqrt(v) + eps) + wd * p) with the same m, v, p: linear in lr."""
    _, params, optimizer, _, step, batch = setup
    device_batch = shard_batch(batch)
    runs = {}
    for name, cfg in {"a": OptimConfig(lr=1e-3, warmup=0, steps=1000), "b": OptimConfig(lr=2e-3, warmup=0, steps=1000),
                      "warm": OptimConfig(lr=1e-3, warmup=4, steps=9)}.items():
        state = set_hyperparams(place_state(init_state(_copy(params), optimizer)), cfg)
        runs[name] = step(state, device_batch)
    for name, lr in (("a", 1e-3), ("b", 2e-3), ("warm", 0.0)):   # step 0 of a warmup runs at rate 0
        assert float(runs[name][1]["lr"]) == pytest.approx(lr, rel=1e-6), name
    moved = 0
    for p0, pa, pb, pw in zip(*(jax.tree_util.tree_leaves(t) for t in
                                (params, runs["a"][0].params, runs["b"][0].params, runs["warm"][0].params))):
        p0, da, db = np.asarray(p0), np.asarray(pa) - np.asarray(p0), np.asarray(pb) - np.asarray(p0)
        np.testing.assert_array_equal(np.asarray(pw), p0)
        # p + update is rounded to p's float32 grid: a difference of two such sums is exact to ~2 ulp(p)
        bound = 1e-3 * np.abs(2 * da) + 4 * np.finfo(np.float32).eps * np.abs(p0)
        assert np.all(np.abs(db - 2 * da) <= bound), np.abs(db - 2 * da - bound).max()
        moved += bool(np.any(da != 0))
    assert moved > 10


def test_frozen_parameters_unchanged_and_trainable_ones_move(setup, overfit):
    _, params, _, labels, _, _ = setup
    state, _ = overfit
    flat_labels = jax.tree_util.tree_leaves(labels)
    frozen = 0
    for before, after, label in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state.params),
                                    flat_labels):
        if label == "frozen":
            np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
            frozen += 1
    assert frozen >= 3
    # every trained weight matrix the supervised loss reaches moved (the track head is not run)
    for path, before in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(k.key for k in path)
        if name.endswith("kernel") and not name.startswith(("track_head", "aggregator/patch_embed")):
            after = state.params
            for k in path:
                after = after[k.key]
            assert not np.array_equal(np.asarray(before), np.asarray(after)), name


def test_resume_is_bit_identical(setup, tmp_path):
    _, params, optimizer, _, step, batch = setup
    batches = [shard_batch(b) for b in (batch, batch_at(make_clip_fn(SOURCE), SOURCE, 1))]
    straight = place_state(init_state(_copy(params), optimizer, seed=7))
    for i in range(4):
        straight, _ = step(straight, batches[i % 2])
    part = place_state(init_state(_copy(params), optimizer, seed=7))
    for i in range(2):
        part, _ = step(part, batches[i % 2])
    ckpt = Checkpoints(tmp_path / "ckpt")
    ckpt.save(part)
    ckpt.close()
    del part
    fresh_like = place_state(init_state(jax.tree_util.tree_map(jnp.zeros_like, params), optimizer, seed=99))
    resumed = Checkpoints(tmp_path / "ckpt").restore(fresh_like)
    assert int(resumed.step) == 2 and int(resumed.data_pos) == 2
    for i in range(2, 4):
        resumed, _ = step(resumed, batches[int(resumed.data_pos) % 2])
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_distillation_from_itself_is_zero_except_log_conf(setup):
    cfg, params, optimizer, _, step, batch = setup
    teacher = make_teacher(cfg, "causal")
    targets = teacher(params, jnp.asarray(batch["images"]))
    distill = {"images": batch["images"], **jax.device_get(targets), "valid": np.ones_like(batch["valid"])}
    _, m = step(place_state(init_state(_copy(params), optimizer)), shard_batch(distill))
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    for key in ("camera", "depth_conf_l1", "depth_grad", "point_conf_l1", "point_grad"):
        assert abs(m[key]) < 1e-4, (key, m[key])
    assert m["depth_reg"] < -1e-3 and m["point_reg"] < -1e-3   # -alpha log(conf), conf > 1


# ------------------------------------------------------------------ slow: two-device subprocess, CLI

DP_SCRIPT = """
import os, sys, json
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.nn.model import init_params
from xsvggt_jax.train.data import DataSource, batch_at, make_clip_fn
from xsvggt_jax.train.state import OptimConfig, UPSTREAM_FROZEN, init_state, make_optimizer, param_labels
from xsvggt_jax.train.step import data_mesh, make_train_step, place_state, shard_batch
assert len(jax.devices()) == 2
cfg = ModelConfig.preset("micro")
src = DataSource(batch=2, frames=2, height=28, width=42, seed=3)
optim = OptimConfig(lr=3e-3, warmup=3, steps=40, freeze=UPSTREAM_FROZEN)
params = jax.device_get(init_params(cfg, jax.random.key(0)))  # host copies: each step donates its own state
opt = make_optimizer(optim, params)
batch = batch_at(make_clip_fn(src), src, 0)
out = {}
for n, mesh in (("1", data_mesh(jax.devices()[:1])), ("2", data_mesh())):
    step = make_train_step(cfg, opt, param_labels(params, optim.freeze), mesh=mesh)
    state, m = step(place_state(init_state(params, opt), mesh), shard_batch(batch, mesh))
    leaf = np.asarray(jax.tree_util.tree_leaves(state.params)[-1]).ravel()[:4].tolist()
    out[n] = {"loss": float(m["loss"]), "leaf": leaf,
              "sharded": len(state.params["depth_head"]["projects_0"]["kernel"].sharding.device_set)}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_data_parallel_two_devices_matches_one():
    """One train step on a 1-device and on a 2-device data mesh (one subprocess, two forced devices)."""
    from conftest import child_xla_flags
    res = subprocess.run([sys.executable, "-c", DP_SCRIPT, str(ROOT)], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, XLA_FLAGS=child_xla_flags()))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["1"]["sharded"] == 1 and out["2"]["sharded"] == 2
    assert abs(out["1"]["loss"] - out["2"]["loss"]) <= 1e-6 * max(1.0, abs(out["1"]["loss"]))
    np.testing.assert_allclose(out["1"]["leaf"], out["2"]["leaf"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_cli_train_end_to_end_and_resume(tmp_path, capsys):
    """`xsvggt train` run in-process: the run and its files are under test here, not the process."""
    from conftest import run_error
    from xsvggt_jax.app.cli import main
    out = tmp_path / "run"

    def argv(steps: int) -> list[str]:
        # --freeze upstream: the fixture's partition, so this run's train step is the fixture's program
        return ["train", "--config", "micro", "--size", "28x42", "--frames", "2", "--steps", str(steps),
                "--freeze", "upstream", "--eval-every", "2", "--out", str(out), "--quiet"]

    assert main(argv(3)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("loss" in r for r in rows)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 3] and all(np.isfinite(e["abs_rel"]) for e in evals)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from xsvggt_jax.weights.params import load_params
    params, cfg = load_params(out / "params")
    assert cfg == ModelConfig.preset("micro")
    # same --out, more steps: a different run -> one error line, nothing changed
    capsys.readouterr()
    assert "optim.steps" in run_error(argv(5), capsys)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_cli_train_diverging_lr_stops_at_the_first_nan(tmp_path, capsys):
    """--lr 1e30 (the train step of test_cli_train_end_to_end_and_resume: the rate is an array in the
    state): step 1's update blows the weights up, step 2's loss is NaN; the run stops there in one line
    and keeps step 1's checkpoint, instead of ending with exit 0 and NaN parameters."""
    from conftest import run_error
    out = tmp_path / "run"
    msg = run_error(["train", "--config", "micro", "--size", "28x42", "--frames", "2", "--steps", "4",
                     "--lr", "1e30", "--warmup", "0", "--save-every", "1", "--eval-scenes", "0",
                     "--freeze", "upstream", "--out", str(out), "--quiet"], capsys)
    assert "diverged at step 2" in msg and f"step 1 in {out / 'checkpoints'}" in msg, msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"] and not (out / "params").exists()


def test_cli_train_bad_flags(capsys, tmp_path):
    from conftest import run_error
    base = ["train", "--out", str(tmp_path / "o")]
    assert "--config" in run_error(base, capsys)
    assert "patch size" in run_error(base + ["--config", "micro", "--size", "30x42"], capsys)
    assert "HxW" in run_error(base + ["--config", "micro", "--size", "big"], capsys)
    assert "READER:ROOT" in run_error(base + ["--config", "micro", "--data", "nope"], capsys)
    assert "student-cache" in run_error(base + ["--config", "micro", "--student-cache", "prune"], capsys)
    assert "stream" in run_error(base + ["--config", "micro", "--student", "stream"], capsys)
    assert not (tmp_path / "o").exists()


def test_remat_blocks_same_parameters_and_gradients():
    import flax.linen as nn
    from xsvggt_jax.nn.aggregator import PositionalBlock
    from xsvggt_jax.nn.model import StreamVGGT, param_shapes
    from xsvggt_jax.nn.rope import make_rope
    from conftest import rel_err

    cfg = ModelConfig.preset("micro")
    images = jax.ShapeDtypeStruct((1, 2, 28, 28, 3), jnp.float32)
    remat_tree = jax.eval_shape(StreamVGGT(cfg, remat=True).init, jax.random.key(0), images)["params"]
    plain = param_shapes(cfg)
    assert jax.tree_util.tree_structure(remat_tree) == jax.tree_util.tree_structure(
        {k: v for k, v in plain.items() if k != "track_head"})
    # one block: jax.checkpoint changes the memory schedule, not the numbers
    rope = make_rope(2, 2, cfg.num_special_tokens, cfg.head_dim, cfg.rope_freq, frames=2)
    x = jax.random.normal(jax.random.key(1), (1, 2 * (cfg.num_special_tokens + 4), cfg.embed_dim))
    block = PositionalBlock(cfg.num_heads, name="b")
    variables = block.init(jax.random.key(2), x, rope)

    def loss(cls, v):
        return jnp.sum(cls(cfg.num_heads, name="b").apply(v, x, rope)[0] ** 2)

    remat_cls = nn.remat(PositionalBlock, static_argnums=(2,))
    g_plain = jax.jit(jax.grad(lambda v: loss(PositionalBlock, v)))(variables)
    g_remat = jax.jit(jax.grad(lambda v: loss(remat_cls, v)))(variables)
    # float32: the recomputed forward is fused differently, so equal up to rounding (norm-wise)
    for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
        assert rel_err(b, a) < 1e-5
