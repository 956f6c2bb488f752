"""The quality-per-byte study (`benchmarks.quality`): metrics, bytes, Pareto front and the comparison
with XStreamVGGT's default, on the micro model with random weights (no timing asserts)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from benchmarks import quality
from conftest import micro_cfg
from xsvggt_jax.cache.core import init_cache
from xsvggt_jax.eval.settings import SettingsError

HW = (28, 28)
SETTINGS = ("none", "xstream-int4:24/camera_quant=kcvt")  # the study adds and streams the reference first


def nbytes(tree) -> int:
    return sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def study(micro):
    cfg, params = micro
    sequences = quality.held_out_sequences(1, 6, HW)
    settings = [quality.study_setting(s) for s in SETTINGS]
    return settings, quality.run_study(params, cfg, settings[1:], sequences, every=2, stride=1)


def test_every_setting_has_finite_metrics(study):
    settings, records = study
    assert list(records) == list(SETTINGS)
    for name, rec in records.items():
        assert set(rec["metrics"]) == set(quality.METRICS), name
        assert all(math.isfinite(v) for v in rec["metrics"].values()), (name, rec["metrics"])
        (seq,) = rec["sequences"].values()
        assert seq == rec["metrics"]  # one sequence: the mean is that sequence's metrics
        assert rec["ms_per_frame"] > 0 and rec["first_frame_s"] > 0
    ref = records["none"]["metrics"]  # the reference against itself
    assert ref["abs_rel_ref"] == 0.0 and ref["delta_1.25_ref"] == 1.0
    assert ref["ate_ref"] == pytest.approx(0.0, abs=1e-9) and ref["acc_ref"] == pytest.approx(0.0, abs=1e-9)


def test_bytes_are_the_cache_pytree_bytes(study):
    settings, records = study
    for s in settings:
        cache = init_cache(micro_cfg(), s.cache, 1, HW, max_frames=6)
        rec = records[s.name]
        assert rec["cache_bytes"] == nbytes(cache)
        assert rec["cache_bytes_global"] == nbytes(cache.global_kv)
        assert rec["cache_bytes_camera"] == nbytes(cache.camera_kv)
    # a quantized camera cache is smaller than the float one of the same budget
    float_camera = init_cache(micro_cfg(), quality.study_setting("xstream-int4:24").cache, 1, HW).camera_kv
    assert records[SETTINGS[1]]["cache_bytes_camera"] < nbytes(float_camera)


def test_study_setting():
    s = quality.study_setting("cumulative-int2:128/protect=budget/protect_share=0.25/camera_budget=64")
    c = s.cache
    assert (c.prune, c.quant, c.bits, c.budget, c.pool, c.group) == ("cumulative", "kcvt", 2, 128, 16, 64)
    assert (c.protect, c.protect_share, c.camera_budget) == ("budget", 0.25, 64)
    assert quality.study_setting("xstream-int4:2048").cache == quality.study_setting(quality.default_name(2048)).cache
    for bad in ("xstream-int4:64/protect", "xstream-int4:64/nosuchfield=1", "xstream-int9:64", "frame:64/protect=budget"):
        with pytest.raises(SettingsError):
            quality.study_setting(bad)
    for text in quality.GRID:  # the committed grid parses
        quality.study_setting(text)


def test_pareto_front():
    points = [(4.0, 1.0), (1.0, 5.0), (2.0, 3.0), (3.0, 3.0), (2.0, 4.0), (5.0, 1.0), (1.5, math.nan), (2.0, 3.0),
              (6.0, 0.5)]
    # (3, 3) and (2, 4) are dominated by (2, 3); (5, 1) by (4, 1); the duplicate (2, 3) keeps the first
    assert quality.pareto_front(points) == [1, 2, 0, 8]
    assert quality.pareto_front([]) == []
    assert quality.pareto_front([(1.0, 1.0)]) == [0]


def _record(budget: int, nbytes_: int, abs_rel: list[float], prune: str = "xstream") -> dict:
    seqs = {f"s{i}": {"abs_rel": v} for i, v in enumerate(abs_rel)}
    return {"cache_config": {"budget": budget, "prune": prune}, "cache_bytes": nbytes_,
            "metrics": {"abs_rel": float(np.mean(abs_rel))}, "sequences": seqs}


def test_compare_to_default():
    records = {
        "none": _record(2048, 9_000, [0.05, 0.05]),                       # more bytes, and the reference: never chosen
        "xstream-int4:256": _record(256, 1_000, [0.30, 0.20]),            # the default at 256
        "xstream-int4:512": _record(512, 2_000, [0.20, 0.20]),            # the default at 512
        "a": _record(256, 1_000, [0.10, 0.30]),                           # equal bytes, better mean, 1 of 2 sequences
        "b": _record(256, 1_001, [0.01, 0.01]),                           # better but 1 byte over the 256 default
        "c": _record(64, 500, [0.30 * (1 - 1e-9), 0.20]),                 # equal to the 256 default up to float noise
    }
    rows = quality.compare_to_default(records, metrics=("abs_rel",))
    assert [r["budget"] for r in rows] == [256, 512]
    at256, at512 = (r["metrics"]["abs_rel"] for r in rows)
    assert at256["best"] == "a" and at256["beats_default"] and at256["sequences_better"] == 1
    assert at256["default"] == pytest.approx(0.25) and at256["bytes"] == 1_000
    assert at512["best"] == "b" and at512["value"] == pytest.approx(0.01) and at512["sequences_better"] == 2
    del records["a"]  # at 256 "c" is now the best candidate: a tie with the default, not a win
    at256 = quality.compare_to_default(records, metrics=("abs_rel",))[0]["metrics"]["abs_rel"]
    assert at256["best"] == "c" and not at256["beats_default"] and at256["sequences_better"] == 0


def test_bad_arguments_exit_before_work(tmp_path, capsys):
    for argv in (["--params", str(tmp_path), "--settings", "xstream-int9:64"],
                 ["--params", str(tmp_path), "--size", "112by154"],
                 ["--params", str(tmp_path / "missing")],
                 ["--size", "84x113"],                  # the shipped model, a size it cannot take
                 ["--frames", "0"]):
        with pytest.raises(SystemExit) as e:
            quality.main([*argv, "--json", str(tmp_path / "q.json"), "--no-plot"])
        assert e.value.code == 2, argv
    assert not (tmp_path / "q.json").exists()
