"""Command line of xsvggt-jax.

    xsvggt demo [--checkpoint FILE] [--out DIR]           procedural scene through the whole pipeline
    xsvggt convert SRC --out DIR [--spec spec.json]       upstream checkpoint -> orbax params dir
    xsvggt reconstruct INPUT (--params DIR | --checkpoint FILE) --out OUTDIR [options]

INPUT is a folder of images, a video file, or an .npz with `images` [S,3,H,W] (and optionally
`query_points` [N,2]).

Input problems (bad files, shapes, values, existing outputs) end with one line
`xsvggt: error: ...` on stderr and exit code 2; outputs are written atomically, so a failed run
leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MAX_MESSAGE = 2000


class UsageError(Exception):
    """A problem with the user's inputs: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------ convert
def _convert(args) -> Path:
    from .convert import ConversionError, convert_state_dict

    from .config import ModelConfig
    from .io.checkpoint_reader import CheckpointError, read_state_dict
    from .io.params import ParamsError, _check_target, save_params

    try:
        cfg = ModelConfig.from_spec(args.spec) if args.spec else ModelConfig.published()
        _check_target(Path(args.out).absolute(), args.overwrite)  # fail fast, before reading SRC
        state = read_state_dict(args.src)
        params = convert_state_dict(state, cfg, source=str(args.src))
        return save_params(params, args.out, cfg, overwrite=args.overwrite)
    except (CheckpointError, ConversionError, ParamsError) as e:
        raise UsageError(str(e)) from e
    except (ValueError, TypeError) as e:  # from_spec on a bad spec
        raise UsageError(f"bad spec {args.spec}: {e}" if args.spec else str(e)) from e


# ------------------------------------------------------------------------------------- reconstruct
OUTDIR_MARKER = "xsvggt-jax"  # report.json["producer"]: an OUTDIR we wrote may be replaced


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def _ours(out_dir: Path) -> bool:
    try:
        return json.loads((out_dir / "report.json").read_text()).get("producer") == OUTDIR_MARKER
    except (OSError, ValueError, AttributeError):
        return False


def _cache_config(args):
    from .cache import CacheConfig

    try:
        return CacheConfig(prune=args.prune, budget=args.cache_size, pool=args.pool, seed=args.seed,
                           quant=args.quant, bits=args.bits, group=args.group, scale_dtype=args.scale_dtype)
    except ValueError as e:
        raise UsageError(str(e)) from e


def _model(args):
    """(params, cfg) from --params or --checkpoint [--spec]."""
    from .convert import ConversionError

    from .config import ModelConfig
    from .io.checkpoint_reader import CheckpointError
    from .io.params import ParamsError, load_params
    from .weights import params_from_checkpoint

    try:
        if args.params:
            return load_params(args.params)
        cfg = ModelConfig.from_spec(args.spec) if args.spec else ModelConfig.published()
        return params_from_checkpoint(args.checkpoint, cfg, Path(args.cache_dir) if args.cache_dir else None)
    except (CheckpointError, ConversionError, ParamsError) as e:
        raise UsageError(str(e)) from e
    except (ValueError, TypeError) as e:
        raise UsageError(f"bad spec {args.spec}: {e}") from e


def _query_points(text: str | None):
    if not text:
        return None
    try:
        pts = np.array([[float(v) for v in p.split(",")] for p in text.replace(";", " ").split()], np.float32)
    except ValueError:
        pts = np.zeros((0, 3))
    if pts.ndim != 2 or pts.shape[1] != 2 or not len(pts) or not np.all(np.isfinite(pts)):
        raise UsageError(f"--query-points must look like 'x,y x,y ...', got {text!r}")
    return pts


def _offline(cfg, params, source, qp, causal: bool):
    import jax
    import jax.numpy as jnp

    from .model import StreamVGGT

    frames = np.stack(list(source))  # the batch forward needs every frame at once
    model = StreamVGGT(cfg)
    fwd = jax.jit(lambda p, x, q: model.apply({"params": p}, x, q, causal, method=StreamVGGT.offline))
    x = jnp.asarray(frames.transpose(0, 2, 3, 1))[None]
    q = None if qp is None else jnp.asarray(qp)[None]
    t0 = time.perf_counter()
    compiled = fwd.lower(params, x, q).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, x, q))
    total = time.perf_counter() - t0
    preds = {k: np.asarray(v[0]) for k, v in out.items()}
    rgb = np.clip(np.rint(frames.transpose(0, 2, 3, 1) * 255), 0, 255).astype(np.uint8)
    s = len(frames)
    return preds, rgb, {"compile_seconds": compile_s, "seconds_per_frame": total / s, "total_seconds": total,
                        "latency_s": [total / s] * s}, {"cache_bytes": 0}, [0] * s


def _exports(tmp: Path, preds: dict, rgb: np.ndarray, source, args) -> dict:
    """predictions.npz, points.ply, trajectory.txt, colmap/, depth/ into `tmp` (see io/outputs.py)."""
    from .io.outputs import ExportOptions, write_outputs

    options = ExportOptions(points=args.points, conf_percentile=args.conf_percentile,
                            ply_max_pixels=args.ply_max_pixels)
    return write_outputs(tmp, preds, rgb, source, options)


def _reconstruct(args, source=None, note: str | None = None) -> Path:
    """Run a reconstruction and write OUTDIR. `source` (a FrameSource) overrides args.input."""
    import jax

    from .config import check_frame_size
    from .io.plots import plot_offline, plot_stream
    from .io.frames import FrameError, open_frames
    from .io.params import ParamsError, _check_target, staged_dir
    from .io.state import StateError
    from .pipeline import stream_frames

    out_dir = Path(args.out).absolute()
    overwrite = args.overwrite or _ours(out_dir)
    try:
        _check_target(out_dir, overwrite)
    except ParamsError as e:
        raise UsageError(f"{e} (not an xsvggt output directory)") from e
    if args.resume and args.save_state and Path(args.resume).absolute() != Path(args.save_state).absolute():
        raise UsageError("--resume and --save-state name different directories")
    state_dir = Path(args.resume or args.save_state).absolute() if (args.resume or args.save_state) else None
    if args.offline and state_dir:
        raise UsageError("--save-state/--resume apply to streaming, not --offline")
    try:
        if source is None:
            source = open_frames(args.input, mode=args.resize, fps=args.fps, stride=args.stride)
    except FrameError as e:
        raise UsageError(str(e)) from e
    params, cfg = _model(args)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    try:
        check_frame_size(cfg, source.height, source.width)
    except ValueError as e:
        raise UsageError(f"{source.name}: {e}") from e
    qp = _query_points(args.query_points)
    qp = source.query_points if qp is None else qp
    if source.num_frames is None:
        raise UsageError(f"{source.name}: the number of frames is unknown (container without a frame count); "
                         "convert the video or pass a folder of images")
    s, hw = source.num_frames, (source.height, source.width)
    cache_cfg = None if args.offline else _cache_config(args)
    mode = f"offline_{args.offline}" if args.offline else "stream"
    log.info("%s: %s, %d frames of %dx%d, %d queries, backend %s", mode, source.name, s, *hw,
             0 if qp is None else len(qp), jax.default_backend())
    if note:
        log.warning(note)
    params = jax.device_put(params)
    meta = {"model": cfg.to_dict(), "cache": dataclasses.asdict(cache_cfg) if cache_cfg else None,
            "frames": s, "height": hw[0], "width": hw[1], "queries": 0 if qp is None else len(qp)}
    try:
        with staged_dir(out_dir, overwrite) as tmp:
            if args.offline:
                preds, rgb, timing, cinfo, nbytes = _offline(cfg, params, source, qp, args.offline == "causal")
                latency = timing.pop("latency_s")
            else:
                run = stream_frames(cfg, cache_cfg, params, source, s, hw, qp, tmp / ".work", state_dir=state_dir,
                                    save_every=args.save_every, resume=bool(args.resume), quiet=args.quiet,
                                    meta=meta)
                preds, rgb, latency, nbytes, cinfo = run.predictions, run.rgb, run.latency_s, run.cache_bytes, \
                    run.cache_info
                timing = {"compile_seconds": latency[0],
                          "seconds_per_frame": float(np.median(latency[1:])) if s > 1 else latency[0],
                          "total_seconds": float(sum(latency))}
            extra = _exports(tmp, preds, rgb, source, args)
            if args.offline:
                plot_offline(tmp / "stream.png", timing["compile_seconds"], timing["total_seconds"], s,
                             _peak_rss_bytes())
            else:
                plot_stream(tmp / "stream.png", np.asarray(latency), allocated_bytes=np.asarray(nbytes))
            report = {
                "producer": OUTDIR_MARKER, "mode": mode, "input": source.name, "frames": s,
                "height": hw[0], "width": hw[1], "num_queries": 0 if qp is None else int(len(qp)),
                **{k: float(v) for k, v in timing.items()}, **cinfo,
                "cache": meta["cache"], "latency_s": [float(x) for x in latency],
                "cache_bytes_per_frame": [int(x) for x in nbytes], "peak_memory_bytes": _peak_rss_bytes(),
                "backend": jax.default_backend(), "device": str(jax.devices()[0]), "jax_version": jax.__version__,
                "dtype": cfg.dtype, "precision": cfg.precision, **extra, **({"note": note} if note else {}),
            }
            (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
            shutil.rmtree(tmp / ".work", ignore_errors=True)  # the streaming memory maps
    except (FrameError, StateError, ParamsError) as e:
        raise UsageError(str(e)) from e
    if state_dir is not None and not args.keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)  # the run completed: the checkpoint is spent
    log.info("%.4f s/frame after compile (%.2f s compile), cache %d bytes, peak RSS %d bytes",
             timing["seconds_per_frame"], timing["compile_seconds"], cinfo["cache_bytes"], _peak_rss_bytes())
    return out_dir


# --------------------------------------------------------------------------------------------- demo
def _demo(args) -> Path:
    """A procedural scene streamed with compression on; a random tiny model unless --checkpoint."""
    import jax

    from .config import ModelConfig
    from .demo import make_scene
    from .io.frames import FrameSource

    args.offline, args.params = None, None
    if args.checkpoint:
        note = None
        scene = make_scene(frames=args.frames, height=392, width=518)  # the published model's frame size
    else:
        scene = make_scene(frames=args.frames)
        from .io.params import save_params
        from .model import init_params

        cfg = ModelConfig.tiny()
        note = ("demo: no --checkpoint, so a small RANDOMLY INITIALISED model is used; its predictions are "
                "meaningless (this run proves install, speed, memory and outputs)")
        params_dir = Path(args.out).absolute().parent / f".{Path(args.out).name}.demo-params"
        if not params_dir.exists():
            save_params(init_params(cfg, jax.random.PRNGKey(0)), params_dir, cfg, overwrite=True)
        args.params = str(params_dir)

    class SceneSource(FrameSource):
        def __iter__(self):
            yield from scene.images

    source = SceneSource("procedural demo scene", len(scene.images), scene.images.shape[2], scene.images.shape[3],
                         scene.query_points)
    try:
        out = _reconstruct(args, source=source, note=note)
    finally:
        if not args.checkpoint:
            shutil.rmtree(Path(args.params), ignore_errors=True)
    tmp = out / ".scene_ground_truth.tmp.npz"
    np.savez(tmp, depth=scene.depth, extrinsics=scene.extrinsics, intrinsics=scene.intrinsics, images=scene.images)
    os.replace(tmp, out / "scene_ground_truth.npz")
    if note:
        print(note)
    return out


# ------------------------------------------------------------------------------------------ parsers
def _add_run_options(r: argparse.ArgumentParser, demo: bool = False) -> None:
    w = r.add_argument_group("weights")
    if not demo:
        src = w.add_mutually_exclusive_group(required=True)
        src.add_argument("--params", help="params directory written by `xsvggt convert`")
        src.add_argument("--checkpoint", help="upstream StreamVGGT .pth / .safetensors (converted on the fly)")
    else:
        w.add_argument("--checkpoint", help="upstream StreamVGGT .pth / .safetensors (default: random tiny model)")
    w.add_argument("--spec", help="spec.json of a non-published configuration (with --checkpoint)")
    w.add_argument("--cache-dir", help="where converted checkpoints are cached (default ~/.cache/xsvggt-jax)")
    w.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: the model's, float32; bfloat16 is faster on accelerators)")
    o = r.add_argument_group("outputs")
    o.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR that xsvggt did not write")
    o.add_argument("--conf-percentile", type=float, default=50.0,
                   help="keep points whose confidence is at least this percentile (0-100; default 50)")
    o.add_argument("--points", choices=("depth", "pointmap"), default="depth",
                   help="point cloud from unprojected depth (default) or from the point map head")
    o.add_argument("--ply-max-pixels", type=int, default=20_000_000,
                   help="frames are subsampled so the cloud draws from at most this many pixels")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--query-points", help="points to track in frame 0: 'x,y x,y ...' (pixels of the model input)")
    g = r.add_argument_group("streaming cache (XStreamVGGT compression)")
    g.add_argument("--prune", choices=("none", "xstream", "sliding", "random"), default="xstream" if demo else "none",
                   help="cache pruning policy (reconstruct default none: plain StreamVGGT)")
    g.add_argument("--cache-size", type=int, default=512 if demo else 2048,
                   help="tokens kept per attention layer when pruning")
    g.add_argument("--pool", type=int, default=16, help="query pooling size of the xstream score")
    g.add_argument("--quant", choices=("none", "kcvt", "ktvt", "kcvc", "ktvc"), default="kcvt" if demo else "none",
                   help="K/V quantization layout: K per Channel|Token, V per Channel|Token")
    g.add_argument("--bits", type=int, choices=(2, 4, 8), default=4, help="quantization code width")
    g.add_argument("--group", type=int, default=64, help="quantization group size")
    g.add_argument("--scale-dtype", choices=("float32", "float16"), default="float32",
                   help="group scales: float32 (bit-exact with upstream) or float16 (smaller cache)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random pruning policy")
    st = r.add_argument_group("checkpointing the stream")
    st.add_argument("--save-state", help="directory to checkpoint the stream into every --save-every frames")
    st.add_argument("--save-every", type=int, default=50, help="frames between stream checkpoints")
    st.add_argument("--resume", help="continue the stream checkpointed in this directory")
    st.add_argument("--keep-state", action="store_true", help="keep the state directory after a completed run")


# ------------------------------------------------------------------------------------------- train
def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train or distill a model (supervised on procedural scenes / a dataset)")
    t.add_argument("--config", help="model preset (tiny, micro, medium, published) or spec.json (--init random)")
    t.add_argument("--init", default="random", help="'random' or a params directory to start from")
    t.add_argument("--data", default="procedural", help="'procedural' or READER:ROOT (e.g. scannet:/data/scannet)")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--frames", type=int, default=2)
    t.add_argument("--size", default="28x42", help="frame size HxW (multiples of the patch size)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--out", required=True, help="run directory (re-run with the same --out to resume)")
    t.add_argument("--teacher", help="teacher params directory (distillation)")
    t.add_argument("--teacher-mode", choices=("full", "causal", "stream"), default="full")
    t.add_argument("--student", choices=("causal", "full", "stream"), default="causal")
    t.add_argument("--student-cache", help="streaming student's cache: KEY=VALUE,... of CacheConfig "
                                           "(e.g. prune=xstream,budget=64,quant=kcvt); implies --student stream")
    t.add_argument("--freeze", choices=("upstream", "none"),
                   help="frozen parameters (default: upstream's with --init PARAMS, none with random init)")
    t.add_argument("--remat", action="store_true", help="rematerialise transformer blocks (less memory)")
    t.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (params stay float32)")
    t.add_argument("--eval-every", type=int, default=0, help="evaluate on held-out scenes every K steps")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (always at the end)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def _train(args) -> Path:
    from .train.command import run_train_command

    return run_train_command(args, UsageError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xsvggt", description="StreamVGGT in JAX: streaming 4D reconstruction")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="stream a procedural scene through the whole pipeline")
    d.add_argument("--out", default="xsvggt-demo", help="output directory (default ./xsvggt-demo)")
    d.add_argument("--frames", type=int, default=24, help="frames of the procedural scene")
    _add_run_options(d, demo=True)

    c = sub.add_parser("convert", help="convert an upstream .pth/.safetensors checkpoint to a params dir")
    c.add_argument("src", help="upstream state_dict (.pth zip format or .safetensors)")
    c.add_argument("--out", required=True, help="params directory to write")
    c.add_argument("--spec", help="model spec.json (default: the published StreamVGGT configuration)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")

    r = sub.add_parser("reconstruct", help="reconstruct from images, a video or an .npz")
    r.add_argument("input", help="folder of images, video file, or .npz with 'images' [S,3,H,W] in [0,1]")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--offline", choices=("causal", "full"),
                   help="batch forward over all frames instead of streaming (causal or full attention)")
    r.add_argument("--resize", choices=("crop", "pad"), default="crop", help="preprocessing of images/video")
    fr = r.add_mutually_exclusive_group()
    fr.add_argument("--fps", type=float, help="sample a video at this frame rate")
    fr.add_argument("--stride", type=int, default=1, help="take every STRIDE-th frame")
    _add_run_options(r)

    v = sub.add_parser("view", help="serve an interactive 3D view of an OUTDIR in the browser (viser)")
    v.add_argument("outdir", help="output directory written by `xsvggt reconstruct` or `xsvggt demo`")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080; busy: the next free one)")
    v.add_argument("--max-points", type=int, default=300_000, help="draw at most this many points (default 300000)")
    v.add_argument("--conf-percentile", type=float,
                   help="draw predictions.npz's depth points above this confidence percentile, with a slider "
                        "(default: points.ply as written)")
    _train_parser(sub)
    return p


def _view(args) -> Path:
    """Serve `xsvggt view` until Ctrl-C / SIGTERM."""
    from .view import ViewError, serve

    try:
        serve(args.outdir, args.host, args.port, args.max_points, args.conf_percentile,
              announce=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ViewError as e:
        raise UsageError(str(e)) from e
    return Path(args.outdir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `xsvggt` console script. Returns 0; input errors raise SystemExit(2)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    try:
        out = {"convert": _convert, "reconstruct": _reconstruct, "demo": _demo, "view": _view,
               "train": _train}[args.command](args)
    except UsageError as e:
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if len(msg) > MAX_MESSAGE:  # e.g. a wrong --spec: every parameter is listed
            log.info("full error: %s", e)
            msg = msg[:MAX_MESSAGE] + f" ... ({len(msg) - MAX_MESSAGE} more characters; -v shows all)"
        sys.stderr.write(f"xsvggt: error: {msg}\n")
        raise SystemExit(2) from None
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
