"""Live benchmark: frames/s and latency of `xsvggt live` with the shipped demo model.

    python -m benchmarks.live [--frames 120 --source-fps 30] [--update-readme]

Source: the demo's procedural scene (`data.procedural.make_demo_scene`, 168x224 px, `--frames`
frames) encoded as an H.264 video, preprocessed to the model's 84x112 (`--size`). Every run is the
command a user types, `xsvggt live VIDEO --no-view --out DIR` with the live defaults (the shipped
model, float32, xstream pruning to 2048 tokens), in this process (the step compiles once, before
the first run: `warmup_seconds`), and reads back its `live.json`:
* `as-fast-as-possible`: `--no-drop`, the video decoded as fast as the model takes frames: frames/s
  is the throughput of the whole loop (decode, preprocess, step, copy the outputs to the host, record
  them for OUTDIR); latency includes the wait in the 4-frame queue;
* `realtime-drop`: `--realtime --drop` at `--source-fps` (a camera): frames/s processed, the share
  dropped, latency from a frame's due time to its outputs on the host;
* `realtime-no-drop`: the same source with `--no-drop`: when the model is slower than the source,
  latency grows with the stream (what `--drop` avoids).
Results: `benchmarks/results/<name>.json` and the `live` table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Sequence

from xsvggt_jax.io.fsutil import atomic_write_json

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
RUNS = {"as-fast-as-possible": ["--no-drop"], "realtime-drop": ["--realtime", "--drop"],
        "realtime-no-drop": ["--realtime", "--no-drop"]}


def make_video(path: Path, frames: int, fps: float) -> Path:
    import av

    from xsvggt_jax.data.procedural import make_demo_scene
    from xsvggt_jax.io.rgb import to_uint8_rgb

    images = to_uint8_rgb(make_demo_scene(frames=frames, height=168, width=224).images)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = 224, 168, "yuv420p"
        for img in images:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return path


def run(label: str, video: Path, out: Path, extra: Sequence[str]) -> dict:
    from xsvggt_jax.app.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        main(["live", str(video), "--no-view", "--quiet", "--out", str(out), "--size", "84x112", *extra])
    log = json.loads((out / "live.json").read_text())
    return {"run": label, "flags": list(extra), **{k: log[k] for k in ("frames", "dropped", "frames_per_second",
                                                                     "latency_s", "step_s", "warmup_seconds")},
            "source_frames": None, "load_avg": os.getloadavg()[0], "summary": err.getvalue().strip().splitlines()[-1]}


def table(result: dict) -> str:
    rows = ["| run | device | source | frames processed / dropped | frames/s | latency median ms | latency p95 ms "
            "| step median ms | step p95 ms | load avg (1 min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        src = f"{r['source_frames']} f at {result['source_fps']:g} f/s" if "realtime" in r["run"] else \
            f"{r['source_frames']} f, as fast as taken"
        rows.append(f"| {r['run']} | {result['device_kind']} | {src} | {r['frames']} / {r['dropped']} | "
                    f"{r['frames_per_second']:.1f} | {1e3 * r['latency_s']['median']:.0f} | "
                    f"{1e3 * r['latency_s']['p95']:.0f} | {1e3 * r['step_s']['median']:.1f} | "
                    f"{1e3 * r['step_s']['p95']:.1f} | {r['load_avg']:.1f} |")
    return "\n".join(rows)


def summary(result: dict) -> str:
    """The short table of the top-level README's Live section."""
    rows = ["| run | frames/s | latency median / p95 ms | frames dropped |", "|---|---|---|---|"]
    for r in result["runs"]:
        rows.append(f"| {r['run']} ({', '.join(r['flags'])}) | {r['frames_per_second']:.1f} | "
                    f"{1e3 * r['latency_s']['median']:.0f} / {1e3 * r['latency_s']['p95']:.0f} | "
                    f"{r['dropped']} of {r['source_frames']} |")
    return "\n".join(rows) + (f"\n\n{result['source_frames']} frames, source at {result['source_fps']:g} frames/s "
                              f"for the realtime runs; {result['device_kind']}, {result['date']}, load average "
                              f"{min(r['load_avg'] for r in result['runs']):.0f}-"
                              f"{max(r['load_avg'] for r in result['runs']):.0f}.")


def main(argv: Sequence[str] | None = None) -> dict:
    import jax

    from .summarize import markers, update_readme

    p = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--source-fps", type=float, default=30.0)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default="live_demo_cpu")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)
    result = {"benchmark": "live", "date": datetime.date.today().isoformat(), "model": "demo (shipped)",
              "frame": [84, 112], "cache": "xstream, 2048 tokens (live default)", "source_fps": args.source_fps,
              "source_frames": args.frames,
              "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
              "cpu_count": os.cpu_count(), "platform": platform.platform(), "jax_version": jax.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        video = make_video(Path(tmp) / "scene.mp4", args.frames, args.source_fps)
        for label in args.runs.split(","):
            r = run(label, video, Path(tmp) / label, RUNS[label])
            r["source_frames"] = args.frames
            print(r["summary"], flush=True)
            result["runs"].append(r)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out_dir / f"{args.name}.json", result)
    text = table(result)
    print(text)
    if args.update_readme:
        update_readme(HERE / "README.md", text, *markers("live"))
        update_readme(HERE.parent / "README.md", summary(result), *markers("live-summary"))
    return result


if __name__ == "__main__":
    main()
