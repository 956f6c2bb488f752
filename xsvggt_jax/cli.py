"""Command line: `xsvggt convert` (upstream checkpoint -> params dir) and `xsvggt reconstruct`.

    xsvggt convert SRC --out DIR [--spec spec.json] [--overwrite]
    xsvggt reconstruct INPUT.npz --params DIR --out OUTDIR [--offline causal|full] [--overwrite]

Input problems (bad files, shapes, values, existing outputs) end with one line
`xsvggt: error: ...` on stderr and exit code 2; outputs are written atomically, so a failed run
leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

PREDICTION_KEYS = ("pts3d_in_other_view", "conf", "depth", "depth_conf", "camera_pose")
TRACK_KEYS = ("track", "vis", "track_conf")
MAX_MESSAGE = 2000


class UsageError(Exception):
    """A problem with the user's inputs: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------ convert
def _convert(args) -> Path:
    from convert import ConversionError, convert_state_dict

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
def _load_input(path: Path, cfg) -> tuple[np.ndarray, np.ndarray | None]:
    """Validated `images` [S,3,H,W] float32 and optional `query_points` [N,2] float32."""
    import zipfile

    from .config import check_frame_size

    if not path.is_file():
        raise UsageError(f"{path}: input file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if "images" not in arrays:
        raise UsageError(f"{path}: no 'images' array (found: {sorted(arrays) or 'none'})")
    images = arrays["images"]
    if not np.issubdtype(images.dtype, np.floating):
        raise UsageError(f"{path}: 'images' must be float in [0, 1], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise UsageError(f"{path}: 'images' must have shape [S, 3, H, W] with S >= 1, got {list(images.shape)}")
    try:
        check_frame_size(cfg, *images.shape[2:])
    except ValueError as e:
        raise UsageError(f"{path}: 'images' {list(images.shape)}: {e}") from e
    if not np.all(np.isfinite(images)):
        raise UsageError(f"{path}: 'images' contains {int(np.sum(~np.isfinite(images)))} non-finite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        log.warning("%s: 'images' values span [%g, %g], expected [0, 1]", path, lo, hi)
    qp = arrays.get("query_points")
    if qp is not None:
        if not np.issubdtype(qp.dtype, np.number) or qp.ndim != 2 or qp.shape[1] != 2 or qp.shape[0] < 1:
            raise UsageError(f"{path}: 'query_points' must have shape [N, 2] with N >= 1, "
                             f"got {list(qp.shape)} ({qp.dtype})")
        if not np.all(np.isfinite(qp)):
            raise UsageError(f"{path}: 'query_points' contains non-finite values")
        qp = qp.astype(np.float32)
    return images.astype(np.float32), qp


def _cache_config(args):
    from .cache import CacheConfig

    try:
        return CacheConfig(prune=args.prune, budget=args.cache_size, pool=args.pool, seed=args.seed,
                           quant=args.quant, bits=args.bits, group=args.group)
    except ValueError as e:
        raise UsageError(str(e)) from e


def _stream(cfg, cache_cfg, params, images_nhwc: np.ndarray, qp: np.ndarray | None):
    import jax
    import jax.numpy as jnp

    from .cache import cache_report, init_cache
    from .step import make_step

    s, h, w, _ = images_nhwc.shape
    step_fn = make_step(cfg, cache_cfg)
    cache = init_cache(cfg, cache_cfg, 1, (h, w), max_frames=s,
                       query_points=None if qp is None else jnp.asarray(qp)[None])
    n_bytes = cache_report(cfg, cache_cfg, cache)
    outs, times = [], []
    for i in range(s):
        t0 = time.perf_counter()
        cache, out = step_fn(params, cache, jnp.asarray(images_nhwc[i:i + 1]))
        out = jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        outs.append({k: np.asarray(v[0]) for k, v in out.items()})
        log.info("frame %d/%d: %.3f s", i + 1, s, times[-1])
    preds = {k: np.stack([o[k] for o in outs]) for k in outs[0]}
    per_frame = float(np.mean(times[1:])) if s > 1 else times[0]
    timing = {"compile_seconds": times[0], "seconds_per_frame": per_frame, "total_seconds": float(sum(times)),
              "first_frame_seconds": times[0]}
    return preds, timing, n_bytes


def _offline(cfg, params, images_nhwc: np.ndarray, qp: np.ndarray | None, causal: bool):
    import jax
    import jax.numpy as jnp

    from .model import StreamVGGT

    model = StreamVGGT(cfg)

    def fwd(p, x, q):
        return model.apply({"params": p}, x, q, causal, method=StreamVGGT.offline)

    x = jnp.asarray(images_nhwc)[None]
    q = None if qp is None else jnp.asarray(qp)[None]
    t0 = time.perf_counter()
    compiled = jax.jit(fwd).lower(params, x, q).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, x, q))
    total = time.perf_counter() - t0
    preds = {k: np.asarray(v[0]) for k, v in out.items()}
    s = images_nhwc.shape[0]
    timing = {"compile_seconds": compile_s, "seconds_per_frame": total / s, "total_seconds": total}
    return preds, timing, {"cache_bytes": 0}


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def _reconstruct(args) -> Path:
    import jax

    from .io.params import ParamsError, _check_target, load_config, load_params, staged_dir

    out_dir = Path(args.out).absolute()
    try:
        _check_target(out_dir, args.overwrite)
        cfg = load_config(args.params)
    except ParamsError as e:
        raise UsageError(str(e)) from e
    images, qp = _load_input(Path(args.input), cfg)
    try:
        params, cfg = load_params(args.params)
    except ParamsError as e:
        raise UsageError(str(e)) from e
    params = jax.device_put(params)
    s, _, h, w = images.shape
    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    mode = "stream" if args.offline is None else f"offline_{args.offline}"
    log.info("%s: %d frames of %dx%d, %s queries, backend %s", mode, s, h, w,
             0 if qp is None else len(qp), jax.default_backend())
    if args.offline is None:
        cache_cfg = _cache_config(args)
        preds, timing, n_bytes = _stream(cfg, cache_cfg, params, nhwc, qp)
    else:
        preds, timing, n_bytes = _offline(cfg, params, nhwc, qp, causal=args.offline == "causal")
    keys = PREDICTION_KEYS + (TRACK_KEYS if qp is not None else ())
    preds = {k: np.asarray(preds[k], np.float32) for k in keys}
    report = {
        "mode": mode, "frames": s, "height": h, "width": w,
        "num_queries": 0 if qp is None else int(len(qp)),
        **{k: float(v) for k, v in timing.items()},
        **n_bytes,
        "cache": None if args.offline else dataclasses.asdict(cache_cfg),
        "peak_memory_bytes": _peak_rss_bytes(),
        "backend": jax.default_backend(), "device": str(jax.devices()[0]),
        "jax_version": jax.__version__, "dtype": cfg.dtype, "precision": cfg.precision,
        "input": str(Path(args.input).absolute()), "params": str(Path(args.params).absolute()),
    }
    try:
        with staged_dir(out_dir, args.overwrite) as tmp:
            np.savez(tmp / "predictions.npz", **preds)
            (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    except ParamsError as e:  # e.g. OUTDIR appeared while we were running
        raise UsageError(str(e)) from e
    log.info("%.4f s/frame after compile (%.2f s compile), cache %d bytes, peak RSS %d bytes",
             timing["seconds_per_frame"], timing["compile_seconds"], n_bytes["cache_bytes"],
             report["peak_memory_bytes"])
    return out_dir


# --------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xsvggt", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert an upstream .pth/.safetensors checkpoint to a params dir")
    c.add_argument("src", help="upstream state_dict (.pth zip format or .safetensors)")
    c.add_argument("--out", required=True, help="params directory to write")
    c.add_argument("--spec", help="model spec.json (default: the published StreamVGGT configuration)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")

    r = sub.add_parser("reconstruct", help="run a model on frames from an .npz file")
    r.add_argument("input", help=".npz with 'images' [S,3,H,W] in [0,1] and optional 'query_points' [N,2] (x, y)")
    r.add_argument("--params", required=True, help="params directory written by `xsvggt convert`")
    r.add_argument("--out", required=True, help="output directory (predictions.npz, report.json)")
    r.add_argument("--offline", choices=("causal", "full"),
                   help="batch forward over all frames instead of streaming (causal or full attention)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    g = r.add_argument_group("streaming cache (XStreamVGGT compression)")
    g.add_argument("--prune", choices=("none", "xstream", "sliding", "random"), default="none",
                   help="cache pruning policy (default none: plain StreamVGGT, every token kept)")
    g.add_argument("--cache-size", type=int, default=2048, help="tokens kept per attention layer when pruning")
    g.add_argument("--pool", type=int, default=16, help="query pooling size of the xstream score")
    g.add_argument("--quant", choices=("none", "kcvt", "ktvt", "kcvc", "ktvc"), default="none",
                   help="K/V quantization layout: K per Channel|Token, V per Channel|Token")
    g.add_argument("--bits", type=int, choices=(2, 4, 8), default=4, help="quantization code width")
    g.add_argument("--group", type=int, default=64, help="quantization group size")
    g.add_argument("--seed", type=int, default=0, help="seed of the random pruning policy")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `xsvggt` console script. Returns 0; input errors raise SystemExit(2)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    try:
        out = _convert(args) if args.command == "convert" else _reconstruct(args)
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
