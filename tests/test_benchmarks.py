"""The streaming benchmark runs end to end on the tiny model and writes complete results (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from benchmarks import stream, summarize

SMALL_MATMUL = ["--matmul-size", "256"]  # keeps the peak measurement cheap on a busy CPU


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--config", "tiny", "--frames", "3", "--settings", "none,xstream-int4", "--budget", "64",
            "--out-dir", str(out), "--no-plot", *SMALL_MATMUL]
    result = stream.main(argv)
    return out, result


def test_json_has_every_field(run):
    out, returned = run
    path = out / "tiny_112x154_3f.json"
    assert path.exists() and not (out / "tiny_112x154_3f.png").exists()
    res = json.loads(path.read_text())
    assert res == json.loads(json.dumps(returned))
    assert res["config"] == "tiny" and res["frame_hw"] == [112, 154] and res["frames"] == 3
    assert res["dtype"] == "float32" and res["backend"] and res["jax_version"]
    assert res["matmul_peak"]["float32_flops_per_s"] > 0 and res["matmul_peak"]["used_flops_per_s"] > 0
    assert list(res["settings"]) == ["none", "xstream-int4"]
    for name, s in res["settings"].items():
        assert s["traces"] == 1, name
        assert s["compile_s"] > 0 and s["lower_s"] > 0
        assert s["flops_per_step"] > 0
        assert len(s["latency_s"]) == 3 and all(t > 0 for t in s["latency_s"])
        assert len(s["cache_bytes"]) == 3 and len(s["cache_bytes_used"]) == 3
        assert s["cache_report"]["cache_bytes"] == s["cache_bytes"][-1] > 0
        for k in ("latency_median_s", "latency_median_early_s", "latency_median_late_s",
                  "latency_ratio_late_over_early"):
            assert s[k] is not None and s[k] > 0, (name, k)
        for k in ("flop_floor_seconds", "achieved_over_floor"):  # none: its attention loop's FLOPs vary per frame
            assert (s[k] is None) if name == "none" else (s[k] > 0), (name, k)
        assert s["peak_rss_bytes"] > 0
    assert res["settings"]["none"]["cache_config"]["prune"] == "none"
    assert res["settings"]["none"]["max_frames"] == 3
    int4 = res["settings"]["xstream-int4"]
    assert int4["cache_config"]["quant"] == "kcvt" and int4["cache_config"]["budget"] == 64
    # the uncompressed cache fills up linearly, frame by frame, within its allocation (whole attention
    # chunks); the quantized one is smaller
    used = res["settings"]["none"]["cache_bytes_used"]
    per_frame = used[1] - used[0]
    assert per_frame > 0 and used[2] - used[1] == pytest.approx(per_frame, rel=1e-4)
    # besides the filled slots: the counters and the config record (`StreamCache.built_for`), constant
    assert 0 <= used[0] - per_frame <= 4096
    assert used[2] <= res["settings"]["none"]["cache_bytes"][-1]
    assert int4["cache_bytes"][-1] < res["settings"]["none"]["cache_bytes"][-1]


def test_summary_table_lists_every_setting(run, capsys):
    out, _ = run
    text = summarize.main(["--results-dir", str(out)])
    assert text.count("tiny 112x154, 3 f") == 2 and "xstream-int4" in text
    assert text in capsys.readouterr().out


def test_plot_is_written(tmp_path):
    """The module run's setting and length (its step program: a compilation-cache hit), plotted."""
    res = stream.main(["--config", "tiny", "--frames", "3", "--settings", "xstream-int4", "--budget", "64",
                       "--out-dir", str(tmp_path), "--name", "plotted", *SMALL_MATMUL])
    png = tmp_path / "plotted.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "plotted.json").exists() and res["settings"]["xstream-int4"]["traces"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_windows_guard_short_runs():
    assert stream.windows(1) == ((0, 1), (0, 1))
    assert stream.windows(3) == ((1, 3), (1, 3))
    assert stream.windows(12) == ((5, 12), (2, 12))
    assert stream.windows(40) == ((5, 15), (30, 40))


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="unknown setting"):
        stream.main(["--settings", "none,bogus", "--no-plot"])


def test_upstream_comparison_skips_without_torch(caplog, tmp_path):
    args = stream.build_parser().parse_args(["--upstream-src", str(tmp_path), "--upstream-python",
                                             str(tmp_path / "no-such-python")])
    assert stream.run_upstream(args, stream.CONFIGS["tiny"], ["none"], (112, 154), {}) is None
    assert "skipping the upstream comparison" in caplog.text


def test_many_benchmark_writes_its_plot_and_readme_table(tmp_path, monkeypatch):
    """The many-scene benchmark's writers, on the committed result (they once imported a helper that
    no longer existed and failed only after the whole benchmark had run)."""
    from pathlib import Path

    from benchmarks import many

    result = json.loads((Path(many.__file__).parent / "results" / "many_tiny.json").read_text())
    many.plot(result, tmp_path / "many.png")
    assert (tmp_path / "many.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "README.md").write_text("intro\n<!-- many:start -->\nold\n<!-- many:end -->\nafter\n")
    monkeypatch.setattr(many, "HERE", tmp_path)
    many.write_readme(many.table(result))
    text = (tmp_path / "README.md").read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert all(f"| {r['run']} |" in text for r in result["runs"])


def test_live_benchmark_tables_from_the_committed_result():
    """benchmarks.live's two tables (benchmarks/README.md and the top-level README) format the committed
    result: one row per run, with its frames/s."""
    from pathlib import Path

    from benchmarks import live

    result = json.loads((Path(live.__file__).parent / "results" / "live_demo_cpu.json").read_text())
    for text in (live.table(result), live.summary(result)):
        for r in result["runs"]:
            assert f"| {r['run']}" in text and f"{r['frames_per_second']:.1f}" in text, text


PUBLISHED_KEYS = {"impl", "setting", "dtype", "frame", "ms", "peak_bytes", "device"}


def test_published_benchmark_dry_run_writes_jsonl_and_png(tmp_path, caplog):
    """benchmarks.published (the GPU Figure-1 benchmark) end to end on CPU with the tiny model: one row per
    (impl, setting, dtype, recorded frame), the compressed run continued to its long frame, the upstream
    part skipped with a logged reason (no --upstream-src), host RSS standing in for the device peak."""
    from benchmarks import published

    out = tmp_path / "pub.jsonl"
    rows = published.main(["--config", "tiny", "--height", "56", "--width", "70", "--frames", "3",
                           "--record", "1,2", "--record-long", "3", "--settings", "none,xstream-int4",
                           "--dtypes", "bfloat16", "--compile-workers", "2", "--out", str(out)])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == json.loads(json.dumps(rows))
    meta, data = lines[0], lines[1:]
    assert meta["impl"] == "meta" and meta["frame_hw"] == [56, 70]
    assert any("upstream" in s and "--upstream-src" in s for s in meta["skipped"])
    assert "upstream" in caplog.text and "skipped" in caplog.text
    got = sorted((r["impl"], r["setting"], r["dtype"], r["frame"]) for r in data)
    assert got == [("ours", "none", "bfloat16", 1), ("ours", "none", "bfloat16", 2),
                   ("ours", "xstream-int4", "bfloat16", 1), ("ours", "xstream-int4", "bfloat16", 2),
                   ("ours", "xstream-int4", "bfloat16", 3)]
    for r in data:
        assert PUBLISHED_KEYS <= set(r), r
        assert r["ms"] > 0 and r["peak_bytes"] > 0 and r["device"] == meta["device"] and r["compile_s"] > 0
        assert r["peak_kind"] == ("device" if published.device_peak_bytes() is not None else "host_rss")
        assert r["cache_bytes_used"] > 0
    none = sorted((r["frame"], r["cache_bytes_used"]) for r in data if r["setting"] == "none")
    assert 0 < none[0][1] < none[1][1]  # the uncompressed cache fills frame by frame
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_published_benchmark_rejects_bad_input_before_work(tmp_path, capsys):
    from benchmarks import published

    for argv in (["--settings", "none,bogus"], ["--dtypes", "float64"], ["--record", "0,5"], ["--frames", "0"]):
        with pytest.raises(SystemExit) as e:
            published.main([*argv, "--out", str(tmp_path / "x.jsonl")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("xsvggt: error: ") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


FAKE_TORCH_PYTHON = r'''#!{python}
"""Stands in for a torch interpreter running benchmarks/upstream_stream.py: answers `-c "import torch"`
and writes a result whose latencies encode the frame number and the cache setting it was given."""
import json, os, sys
if sys.argv[1] == "-c":
    sys.exit(0)
a = sys.argv[2:]
opt = dict(zip(a[::2], a[1::2]))
assert "--heads" in a and opt["--autocast"] == "bfloat16", a
n = int(opt["--frames"])
mode = os.environ["KV_PRUNE_MODE"] + "/" + os.environ["KV_QUANT_MODE"] + "/" + os.environ["KV_CACHE_SIZE"]
json.dump({{"latency_s": [(i + 1) / 1000 for i in range(n)], "device_peak_bytes": 7 * n, "peak_rss_bytes": 1,
           "quant_supported": True, "device": "fake-gpu", "heads": True, "torch_version": mode}},
          open(opt["--out"], "w"))
'''


def test_published_benchmark_runs_upstream_per_setting(tmp_path):
    """The upstream part: one process per upstream setting with its cache environment, rows at the
    recorded frames (the long rerun of XStreamVGGT adds only the long frames), device peak reported."""
    import sys

    from benchmarks import published

    src = tmp_path / "up"
    (src / "src" / "streamvggt").mkdir(parents=True)
    fake = tmp_path / "python"
    fake.write_text(FAKE_TORCH_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "res" / "pub.jsonl"
    rows = published.main(["--config", "tiny", "--height", "56", "--width", "70", "--frames", "3",
                           "--record", "1,2", "--record-long", "3", "--settings", "none,xstream-int4",
                           "--dtypes", "bfloat16", "--budget", "64", "--upstream-src", str(src),
                           "--upstream-python", str(fake), "--out", str(out), "--no-plot"])
    assert rows[0]["skipped"] == []
    up = sorted((r["setting"], r["frame"], r["ms"], r["peak_bytes"], r["torch_version"])
                for r in rows[1:] if r["impl"] == "upstream")
    assert up == [("none", 1, 1.0, 14, "none//64"), ("none", 2, 2.0, 14, "none//64"),
                  ("xstream-int4", 1, 1.0, 14, "XStreamVGGT/KCVT/64"), ("xstream-int4", 2, 2.0, 14, "XStreamVGGT/KCVT/64"),
                  ("xstream-int4", 3, 3.0, 21, "XStreamVGGT/KCVT/64")]
    assert all(r["dtype"] == "autocast-bf16" and r["peak_kind"] == "device" and r["device"] == "fake-gpu"
               for r in rows[1:] if r["impl"] == "upstream")
