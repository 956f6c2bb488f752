"""`xsvggt live SOURCE`: reconstruct a camera, a network stream, a video file or a folder that
images are written into, as the frames arrive, and watch it grow in the browser.

    xsvggt live /dev/video0                       # or 0; a camera (V4L2)
    xsvggt live rtsp://host/stream --timeout 5    # rtsp / http / ... through FFmpeg
    xsvggt live walk.mp4 --realtime --out walk    # a video at its own frame rate (else as fast as it goes)
    xsvggt live frames/ --max-frames 300          # a folder another program writes images into

Frames go from a reader thread through a bounded queue (`io.feed`: `--drop`, the default for cameras
and streams, keeps only the newest waiting frame and counts the others; `--no-drop`, the default for
files and folders, keeps every frame) into a `StreamSession` (`stream.session`), compiled before the
source starts. The viewer (`app.live_view`) opens at once. The run stops at the end of the source, when
nothing arrives for `--timeout` seconds, after `--max-frames`, or on Ctrl-C / SIGTERM; then, with
`--out`, OUTDIR receives exactly what `xsvggt reconstruct` writes for the processed frames (the same
`io.scene.write_scene`, manifest and safety rules of `io.outdir`; timestamps: see `io.capture`) plus
`live.json` (per processed frame: its number in the source, name, timestamp, arrival time, latency
and step time; frames dropped; frames/s; latency median and p95).

A source that does not exist, answer or deliver a frame within `--timeout` is one error line, before
the model is loaded, and nothing is written. Weights: --params / --checkpoint, else the shipped demo
model, which runs at its card's training size unless `--size HxW` says otherwise (other models:
upstream's 518-px width at the first frame's aspect). The cache flags are `reconstruct`'s, except that
the cache is pruned by default (`--prune xstream`): `--prune none` needs `--max-frames`, its capacity.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from xsvggt_jax.errors import ConfigError, InputError
from xsvggt_jax.io.frames import FrameSource

log = logging.getLogger(__name__)

LIVE_JSON = "live.json"
DEFAULT_TIMEOUT_S = 10.0
FPS_WINDOW = 20  # frames/s shown is over the last this many frames


def _arg_type(convert: Callable, what: str) -> Callable:
    def parse(text: str):
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    parse.__name__ = what
    return parse


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(text)
        return value
    return convert


def _frame_size(text: str) -> tuple[int, int]:
    from xsvggt_jax.io.frames import parse_size
    return parse_size(text)


SIZE = _arg_type(_frame_size, "a frame size HxW, multiples of 14 (e.g. 84x112)")
SIZE_HELP = ("preprocess frames to exactly HxW (multiples of 14: resize, then centre crop or white pad; e.g. 84x112 "
             "for the shipped demo model)")


def add_parser(sub, run_options: Callable) -> argparse.ArgumentParser:
    """The `live` subcommand; `run_options(parser, stream_state=False)` adds reconstruct's weight, output and
    cache flags (the CLI's `_add_run_options`)."""
    p = sub.add_parser("live", help="reconstruct a camera, stream, video or growing folder live, in the browser",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="camera (/dev/video0 or 0), stream URL (rtsp://, http://, ...), video file, or a "
                                  "folder that images are written into (taken in name order)")
    p.add_argument("--out", help="OUTDIR: when the run stops, write what `xsvggt reconstruct` writes for the "
                                 "processed frames, plus live.json (their timestamps, latency, drops)")
    p.add_argument("--size", type=SIZE, help=SIZE_HELP + "; default: the shipped model's training size, else "
                                                          "upstream's 518-px width")
    p.add_argument("--resize", choices=("crop", "pad"), default="crop", help="preprocessing of the frames")
    drop = p.add_mutually_exclusive_group()
    drop.add_argument("--drop", dest="drop", action="store_const", const=True,
                      help="when the model is slower than the source, take the newest frame and count the "
                           "skipped ones (default for cameras and streams)")
    drop.add_argument("--no-drop", dest="drop", action="store_const", const=False,
                      help="process every frame, queued (default for video files and folders)")
    p.add_argument("--queue", type=_arg_type(_positive(int), "a positive integer"), default=4,
                   help="--no-drop: frames that may wait (the reader waits when it is full; default 4)")
    p.add_argument("--realtime", action="store_true",
                   help="play a video file at its own frame rate (default: as fast as the model takes frames)")
    p.add_argument("--max-frames", type=_arg_type(_positive(int), "a positive integer"),
                   help="stop after this many processed frames")
    p.add_argument("--timeout", type=_arg_type(_positive(float), "a positive number"), default=DEFAULT_TIMEOUT_S,
                   help="seconds to wait for the source: to open and deliver its first frame (else an error), "
                        "then for each next frame (else the run ends); default 10")
    v = p.add_argument_group("viewer (as `xsvggt view`)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080; busy: the next free one)")
    v.add_argument("--max-points", type=_arg_type(_positive(int), "a positive integer"), default=300_000,
                   help="draw at most this many points (the oldest frames' go first; default 300000)")
    v.add_argument("--points-per-frame", type=_arg_type(_positive(int), "a positive integer"), default=4000,
                   help="confident points drawn per frame (default 4000)")
    v.add_argument("--no-view", action="store_true", help="no viewer (a pipeline, a benchmark)")
    v.add_argument("--keep-open", action="store_true", help="after the run stops, keep the viewer open until Ctrl-C")
    run_options(p, stream_state=False)
    for group in p._mutually_exclusive_groups:  # the weights are optional here: the shipped demo model
        if any(a.dest == "params" for a in group._group_actions):
            group.required = False
    p.set_defaults(prune="xstream")
    for action in p._actions:
        if action.dest == "prune":
            action.help = "cache pruning policy (live default xstream, a bounded cache; none needs --max-frames)"
    return p


# ------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class LiveLog:
    """What a run did, frame by frame (live.json)."""
    index: list = dataclasses.field(default_factory=list)
    name: list = dataclasses.field(default_factory=list)
    timestamp: list = dataclasses.field(default_factory=list)
    received_unix: list = dataclasses.field(default_factory=list)
    latency_s: list = dataclasses.field(default_factory=list)
    step_s: list = dataclasses.field(default_factory=list)
    done: list = dataclasses.field(default_factory=list)  # perf_counter when each frame's outputs were ready
    dropped: int = 0
    skipped: int = 0
    stopped_by: str = "end of the source"

    @property
    def frames(self) -> int:
        return len(self.index)

    def fps(self, window: Optional[int] = None) -> float:
        done = self.done[-window:] if window else self.done
        return (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else 0.0

    def summary(self) -> dict:
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
        return {"frames": self.frames, "dropped": self.dropped, "skipped": self.skipped, "stopped_by": self.stopped_by,
                "frames_per_second": self.fps(),
                "latency_s": {"median": pct(self.latency_s, 50), "p95": pct(self.latency_s, 95),
                              "max": max(self.latency_s, default=None)},
                "step_s": {"median": pct(self.step_s, 50), "p95": pct(self.step_s, 95)}}


class _Frames(FrameSource):
    """The processed frames as a `FrameSource` for `write_scene`: their infos and original pictures, each
    an image file (a folder's) or a decoded picture saved as .npy under the staging directory's .work."""

    def __init__(self, name: str, infos: list, hw: tuple[int, int], query_points, originals: list):
        super().__init__(name, len(infos), *hw, query_points, infos)
        self.originals = originals

    def __iter__(self):
        raise NotImplementedError("the processed frames are not kept")

    def iter_originals(self):
        for kind, path in self.originals:
            yield path if kind == "file" else np.load(path)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """Ctrl-C, SIGTERM and SIGHUP set `stop` (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _check(args, cache_cfg) -> tuple[str, bool]:
    """Flag checks before anything is opened: (the source's kind, drop)."""
    from xsvggt_jax.io.capture import source_kind

    if cache_cfg.prune == "none" and not args.max_frames:
        raise ConfigError("--prune none keeps every frame in the cache: give --max-frames N (its capacity), or "
                          "prune (the default, --prune xstream)")
    if args.keep_open and args.no_view:
        raise ConfigError("--keep-open keeps the viewer open: it does not go with --no-view")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    kind = source_kind(args.source)
    if args.realtime and kind != "video":
        raise ConfigError(f"--realtime paces a video file; a {kind} delivers frames at its own pace")
    return kind, (kind in ("camera", "stream")) if args.drop is None else args.drop


def run_live(args, cache_cfg, exports, query_points, announce: Callable[[str], None] = log.warning):
    """Run `xsvggt live` (see the module docstring) with the parsed `args` and reconstruct's cache
    configuration, export options and query points; returns OUTDIR (or the source without --out)."""
    from xsvggt_jax import pretrained
    from xsvggt_jax.app.listen import listen_address
    from xsvggt_jax.config import ModelConfig, check_frame_size
    from xsvggt_jax.io.capture import open_capture
    from xsvggt_jax.io.frames import DEFAULT_TARGET
    from xsvggt_jax.io.fsutil import FsError, disk_error_message
    from xsvggt_jax.io.outdir import OutputDir
    from xsvggt_jax.weights.loading import model_config, with_dtype

    kind, drop = _check(args, cache_cfg)
    default_model = not (args.params or args.checkpoint)
    cfg = with_dtype(ModelConfig.from_dict(pretrained.card("demo")["config"]), args) if default_model else \
        model_config(args)
    size = args.size or (tuple(pretrained.card("demo")["frame_size"]) if default_model else None)
    local = [args.source] if kind in ("video", "folder") else []
    try:
        out = OutputDir(args.out, args.overwrite, protect=local + [p for p in (args.params, args.checkpoint) if p]) \
            if args.out else None
    except FsError as e:
        raise InputError(str(e)) from e
    url_host = None if args.no_view else listen_address(args.host)
    capture = open_capture(args.source, mode=args.resize, target=size or DEFAULT_TARGET, realtime=args.realtime,
                           timeout=args.timeout)
    server = viewer = None
    try:
        hw = tuple(size) if size else capture.natural_size(args.resize, DEFAULT_TARGET)
        check_frame_size(cfg, *hw, tracks=query_points is not None)
        log.info("live: %s (%s), %dx%d frames, %s", args.source, kind, *hw, "drop" if drop else "no drop")
        if not args.no_view:  # before the model loads and compiles
            import viser
            from xsvggt_jax.app.live_view import LiveViewer

            with contextlib.redirect_stdout(io.StringIO()):  # viser's banner: stdout is the OUTDIR line
                server = viser.ViserServer(host=args.host, port=args.port, verbose=False)
            viewer = LiveViewer(server, max_points=args.max_points, points_per_frame=args.points_per_frame,
                                conf_percentile=args.conf_percentile)
            announce(f"live view of {args.source} at http://{url_host}:{server.get_port()} (Ctrl-C to stop)")
        try:
            record = _stream(args, cfg, cache_cfg, exports, query_points, capture, hw, drop, out, viewer,
                             default_model, announce)
        except OSError as e:  # a full disk, a read-only place ... while writing OUTDIR (removed again)
            if (msg := disk_error_message(e)) is None:
                raise
            raise InputError(msg) from e
        announce(_summary_line(record))
        if viewer is not None and args.keep_open:
            stop = threading.Event()
            announce(f"the run stopped ({record.stopped_by}); the viewer stays open (Ctrl-C to close it)")
            with _stop_on_signals(stop):
                while not stop.wait(0.2):
                    pass
    finally:
        capture.close()
        if server is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                server.stop()
    return out.given if out is not None else args.source


def _stream(args, cfg, cache_cfg, exports, query_points, capture, hw, drop, out, viewer, default_model,
            announce) -> LiveLog:
    """Load the model, compile, then take frames until the run stops; write OUTDIR. Returns the log."""
    import jax

    from xsvggt_jax import pretrained
    from xsvggt_jax.io.feed import FrameQueue, start_reader
    from xsvggt_jax.io.fsutil import atomic_write_json, PRODUCER
    from xsvggt_jax.io.scene import write_scene
    from xsvggt_jax.stream.session import StreamSession
    from xsvggt_jax.weights.loading import load_model

    params, cfg = load_model(args, default=lambda: pretrained.load("demo"))
    params = jax.device_put(params, jax.devices()[0])  # committed, as a params directory loads: one program
    staged = out.staged() if out is not None else contextlib.nullcontext(None)
    with staged as tmp:
        work = None if tmp is None else tmp / ".work"
        session = StreamSession(params, cfg, cache_cfg, hw, query_points=query_points, max_frames=args.max_frames,
                                record=tmp is not None, work_dir=None if work is None else work / "record")
        warm = session.warmup()
        announce(f"live: model ready ({warm:.1f} s to compile): taking frames from {args.source}")
        queue = FrameQueue(drop, args.queue)
        record, infos, originals = LiveLog(), [], []
        stop = threading.Event()
        with _stop_on_signals(stop):
            start_reader(capture.frames(), queue)
            try:
                _take_frames(args, session, queue, capture, hw, stop, record, infos, originals, work, viewer)
            finally:
                queue.close()
                capture.close()
                record.dropped = queue.dropped
        if viewer is not None:
            viewer.update_stats(_stats(record, session, status=f"stopped: {record.stopped_by}"))
        if tmp is None:
            return record
        if not record.frames:
            raise InputError(f"{args.source}: no frame was processed ({record.stopped_by}): nothing written")
        note = ("live: the shipped `demo` model (tiny, trained on procedural scenes only; model card: "
                "xsvggt_jax/pretrained/demo.md)" if default_model else None)
        source = _Frames(args.source, infos, hw, query_points, originals)
        write_scene(tmp, session.result(), source, exports, cfg, note)
        atomic_write_json(tmp / LIVE_JSON, {
            "producer": PRODUCER, "source": args.source, "kind": capture.kind, "drop": drop,
            "realtime": bool(args.realtime), "height": hw[0], "width": hw[1], "warmup_seconds": warm,
            **record.summary(),
            "per_frame": {"index": record.index, "name": record.name, "timestamp": record.timestamp,
                          "received_unix": record.received_unix, "latency_s": record.latency_s,
                          "step_s": record.step_s}})
        shutil.rmtree(work, ignore_errors=True)
    return record


def _stats(record: LiveLog, session, status: str):
    from xsvggt_jax.app.live_view import LiveStats

    return LiveStats(frames=record.frames, fps=record.fps(FPS_WINDOW),
                     latency_s=record.latency_s[-1] if record.latency_s else 0.0,
                     step_s=record.step_s[-1] if record.step_s else 0.0,
                     cache_bytes=session.cache_bytes, filled_bytes=session.filled_bytes,
                     dropped=record.dropped, status=status)


def _take_frames(args, session, queue, capture, hw, stop, record: LiveLog, infos, originals, work, viewer) -> None:
    """The loop: take a frame, preprocess, push, record, draw; until the run stops (sets record.stopped_by)."""
    import jax

    from xsvggt_jax.io.capture import prepare
    from xsvggt_jax.io.feed import FeedTimeout
    from xsvggt_jax.io.frames import FrameError
    from xsvggt_jax.io.rgb import to_uint8_rgb
    from xsvggt_jax.stream.loop import Progress

    wall0, perf0 = time.time(), time.perf_counter()
    total = args.max_frames or (capture.source.num_frames if capture.kind == "video" else None)
    progress = Progress(total, args.quiet, postfix=lambda: {"fps": f"{record.fps(FPS_WINDOW):.1f}",
                                                             "dropped": queue.dropped})
    try:
        while True:
            if args.max_frames and record.frames >= args.max_frames:
                record.stopped_by = "--max-frames"
                return
            if stop.is_set():
                record.stopped_by = "signal"
                return
            try:
                item = queue.get(args.timeout, stop)
            except FeedTimeout:
                log.warning("%s: no frame for %g s: stopping", args.source, args.timeout)
                record.stopped_by = "timeout"
                return
            if item is None:
                record.stopped_by = "signal" if stop.is_set() else "end of the source"
                return
            try:
                frame, info = prepare(item, args.resize, hw)
            except FrameError as e:
                if not isinstance(item.picture, Path):
                    raise
                log.warning("skipped: %s", e)
                record.skipped += 1
                continue
            start = time.perf_counter()
            out = session.push(frame)
            host = jax.device_get({k: out[k] for k in ("depth", "depth_conf", "camera_pose")})
            done = time.perf_counter()
            n = record.frames
            record.index.append(item.index)
            record.name.append(item.name)
            record.timestamp.append(float(item.time))
            record.received_unix.append(wall0 + (item.arrived - perf0))
            record.latency_s.append(done - item.arrived)
            record.step_s.append(done - start)
            record.done.append(done)
            record.dropped = queue.dropped
            infos.append(info)
            if work is not None:
                if isinstance(item.picture, Path):
                    originals.append(("file", item.picture))
                else:  # kept on disk: memory stays flat
                    (work / "originals").mkdir(parents=True, exist_ok=True)
                    np.save(work / "originals" / f"{n:06d}.npy", item.picture)
                    originals.append(("npy", work / "originals" / f"{n:06d}.npy"))
            if viewer is not None:
                viewer.add_frame(n, host["depth"], host["depth_conf"], host["camera_pose"], to_uint8_rgb(frame))
                viewer.update_stats(_stats(record, session, status=f"live: {args.source}"))
            progress.update()
    finally:
        progress.close()


def _summary_line(record: LiveLog) -> str:
    s = record.summary()
    lat = s["latency_s"]
    latency = (f", latency median {1e3 * lat['median']:.0f} ms, p95 {1e3 * lat['p95']:.0f} ms"
               if lat["median"] is not None else "")
    return (f"live: {record.frames} frames processed, {record.dropped} dropped, {s['frames_per_second']:.1f} "
            f"frames/s{latency} (stopped: {record.stopped_by})")
