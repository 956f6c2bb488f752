"""Markdown tables from the benchmark JSON files (`python -m benchmarks.summarize`).

    python -m benchmarks.summarize                      # print the table of benchmarks/results/*.json
    python -m benchmarks.summarize --update-readme      # also rewrite it into benchmarks/README.md

`--update-readme` replaces what lies between the `<!-- results:start -->` and `<!-- results:end -->`
markers of the README.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Iterable, Sequence

from xsvggt_jax.io.fsutil import atomic_write_text

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent


def markers(name: str) -> tuple[str, str]:
    """The start / end markers of the README table `name`: `<!-- name:start -->`, `<!-- name:end -->`."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


START, END = markers("results")

COLUMNS = ("run", "device", "dtype", "setting", "compile s", "traces", "GFLOP/step", "median ms",
           "early ms", "late ms", "late/early", "x FLOP floor", "cache MiB (end)", "peak RSS GiB")


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def rows(result: dict) -> Iterable[list[str]]:
    hw = result["frame_hw"]
    run = f"{result['config']} {hw[0]}x{hw[1]}, {result['frames']} f"
    for name, s in result["settings"].items():
        ms = lambda v: None if v is None else v * 1e3
        used = s.get("cache_bytes_used") or [None]
        early, late = s.get("early_window"), s.get("late_window")
        yield [run, result.get("device", "?"), result.get("dtype", "?"), name, _f(s.get("compile_s"), ".1f"),
               str(s.get("traces", "-")), _f(s["flops_per_step"] / 1e9 if s.get("flops_per_step") else None, ".2f"),
               _f(ms(s.get("latency_median_s")), ".1f"),
               _f(ms(s.get("latency_median_early_s")), ".1f") + (f" [{early[0]},{early[1]})" if early else ""),
               _f(ms(s.get("latency_median_late_s")), ".1f") + (f" [{late[0]},{late[1]})" if late else ""),
               _f(s.get("latency_ratio_late_over_early"), ".2f"), _f(s.get("achieved_over_floor"), ".1f"),
               _f(used[-1] / 2 ** 20 if used[-1] is not None else None, ".2f"),
               _f(s["peak_rss_bytes"] / 2 ** 30 if s.get("peak_rss_bytes") else None, ".2f")]


def markdown(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def table(results: Sequence[dict]) -> str:
    """One row per (run, setting)."""
    return markdown(COLUMNS, (r for res in results for r in rows(res)))


def upstream_table(result: dict) -> str:
    """Our aggregator + camera step vs upstream's Aggregator + CameraHead, per setting."""
    up = result.get("upstream") or {}
    body = []
    for name, u in up.get("settings", {}).items():
        ours = up.get("ours_agg_cam", {}).get(name, {})
        ms = lambda v: None if v is None else v * 1e3
        body.append([name, _f(ms(ours.get("latency_median_s")), ".1f"), _f(ms(u.get("latency_median_s")), ".1f"),
                     _f(up.get("time_ratio_ours_over_upstream", {}).get(name), ".2f"),
                     _f(u["peak_rss_bytes"] / 2 ** 30 if u.get("peak_rss_bytes") else None, ".2f")])
    return markdown(("setting (aggregator + camera)", "ours ms", "upstream ms", "ours/upstream",
                     "upstream peak RSS GiB"), body)


def load(results_dir: Path) -> list[dict]:
    out = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            res = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping %s: %s", p, e)
            continue
        if isinstance(res, dict) and "settings" in res and "frame_hw" in res:
            out.append(res)
    return out


def report(results: Sequence[dict]) -> str:
    text = table(results)
    for res in results:
        if res.get("upstream") and res["upstream"].get("settings"):
            text += f"\n\nUpstream comparison, {res['name']}:\n\n" + upstream_table(res)
    return text


def update_readme(readme: Path, text: str, start: str = START, end: str = END) -> None:
    """Replace what lies between the `start` and `end` markers of `readme` with `text`."""
    old = readme.read_text()
    if start not in old or end not in old:
        raise SystemExit(f"{readme} lacks the {start} / {end} markers")
    head, rest = old.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(readme, f"{head}{start}\n{text}\n{end}{tail}")


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.summarize", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--update-readme", nargs="?", const=HERE / "README.md", type=Path, metavar="README",
                   help="rewrite the table between the results markers of this README (default benchmarks/README.md)")
    args = p.parse_args(argv)
    results = load(args.results_dir)
    text = report(results) if results else f"(no benchmark results in {args.results_dir})"
    if args.update_readme:
        update_readme(args.update_readme, text)
    sys.stdout.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
