"""Weights in int8 / int4: parameter bytes and output error of weight-only quantization.

    python -m benchmarks.weight_quant

For the tiny reference model (../shared/reference/tiny: random weights) and the shipped demo model
(trained), each weight format (`weights.quant.WeightFormat` text, with the default `KEEP_FLOAT` or
another keep list) streams the same frames through an uncompressed cache (`--frames`; the tiny
model's reference photos, the demo model's procedural scene) and is compared with the float run:
relative L2 error ||x - x_float|| / ||x_float|| over all frames of depth, points (pts3d_in_other_view),
camera_pose and conf. Bytes: the parameter tree as stored (`describe`), as it sits on the device
(`on_device_size_in_bytes`), and for the published model (1.26 B parameters, abstract shapes: no
weights needed) as it would be stored. The keep variants measure which layers are fragile: "none"
quantizes every kernel, "+patch" also keeps the DINOv2 patch embedding float.
Writes `<out-dir>/weight_quant.json` and prints the README tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xsvggt_jax.cache.core import CacheConfig, init_cache
from xsvggt_jax.config import ModelConfig
from xsvggt_jax.io.fsutil import atomic_write_text
from xsvggt_jax.nn.model import param_shapes
from xsvggt_jax.stream.step import run_stream
from xsvggt_jax.weights.quant import KEEP_FLOAT, WeightFormat, describe, device_bytes, quantize_params, stored_shapes

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tiny"
KEYS = ("depth", "pts3d_in_other_view", "camera_pose", "conf")
PATCH = "aggregator/patch_embed/patch_embed/*"
KEEPS = {"default": KEEP_FLOAT, "none": (), "+patch": (*KEEP_FLOAT, PATCH)}
VARIANTS = {"tiny": ("int8", "int4"),
            "demo": ("int8", "int8|none", "int8|+patch", "int4", "int4|none", "int4|+patch", "int4:32",
                     "int4:128", "int4:channel")}


def variant(text: str) -> WeightFormat:
    """"FORMAT[:GROUP][|KEEP]" -> WeightFormat (KEEP a key of KEEPS)."""
    fmt, _, keep = text.partition("|")
    return dataclasses.replace(WeightFormat.from_text(fmt), keep=KEEPS[keep or "default"])


def model(name: str, frames: int):
    """(float params as numpy, cfg, frames [S, 1, H, W, 3])."""
    if name == "tiny":
        from xsvggt_jax.weights.convert import convert_state_dict
        from xsvggt_jax.weights.torch_reader import read_state_dict

        cfg = ModelConfig.from_spec(REFERENCE / "spec.json", dtype="float32")
        params = convert_state_dict(read_state_dict(REFERENCE / "weights.pth"), cfg, source="weights.pth")
        images = np.load(REFERENCE / "frames.npz")["images"][:frames].transpose(0, 2, 3, 1)
    else:
        from xsvggt_jax import pretrained
        from xsvggt_jax.data.procedural import make_demo_scene

        params, cfg = pretrained.load("demo")
        hw = pretrained.card("demo")["frame_size"]
        images = make_demo_scene(frames=frames, height=hw[0], width=hw[1]).images
    return jax.device_get(params), cfg.replace(dtype="float32"), np.asarray(images, np.float32)[:, None]


def stream(cfg, params, frames) -> dict:
    cc = CacheConfig.uncompressed()
    cache = init_cache(cfg, cc, 1, frames.shape[2:4], max_frames=frames.shape[0])
    out = jax.jit(lambda p, c, f: run_stream(cfg, cc, p, c, f))(params, cache, jnp.asarray(frames))[1]
    return {k: np.asarray(out[k], np.float64) for k in KEYS}


def measure(name: str, frames: int, variants: Sequence[str]) -> dict:
    params, cfg, images = model(name, frames)
    dev = jax.devices()[0]
    ref = stream(cfg, jax.device_put(params, dev), images)
    rows = {"float": {**describe(params), "device_bytes": device_bytes(jax.device_put(params, dev)),
                      "errors": {k: 0.0 for k in KEYS}}}
    for text in variants:
        t0 = time.perf_counter()
        q = jax.device_put(quantize_params(params, variant(text)), dev)
        out = stream(cfg, q, images)
        rows[text] = {**describe(q), "device_bytes": device_bytes(q), "seconds": time.perf_counter() - t0,
                      "errors": {k: float(np.linalg.norm(out[k] - ref[k]) / np.linalg.norm(ref[k])) for k in KEYS}}
    return {"frames": frames, "frame_hw": list(images.shape[2:4]), "variants": rows}


def published_bytes() -> dict:
    shapes = param_shapes(ModelConfig.published())
    out = {"float32": describe(shapes)["float32_bytes"]}
    for text in ("int8", "int4", "int4:128"):
        out[text] = describe(stored_shapes(shapes, WeightFormat.from_text(text)))["bytes"]
    return out


def tables(result: dict) -> str:
    lines = []
    for name, m in result["models"].items():
        lines += [f"{name} model, {m['frames']} frames {m['frame_hw'][0]}x{m['frame_hw'][1]}, uncompressed stream, "
                  "relative L2 error vs the float run:", "",
                  "| weights | keep float | bytes (stored) | bytes on device | vs float32 | depth | points | pose | conf |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for text, r in m["variants"].items():
            fmt, _, keep = text.partition("|")
            keep = "-" if fmt == "float" else (keep or "heads' last layers")
            keep = {"none": "nothing", "+patch": "heads' last layers + patch embed"}.get(keep, keep)
            e = r["errors"]
            lines.append(f"| {fmt} | {keep} | {r['bytes']:,} | {r['device_bytes']:,} | "
                         f"{r['bytes'] / r['float32_bytes']:.3f} | "
                         + " | ".join("-" if fmt == "float" else f"{e[k]:.2e}" for k in KEYS) + " |")
        lines.append("")
    p = result["published_bytes"]
    lines += ["published model (1.26 B parameters), bytes as stored: "
              + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in p.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.weight_quant", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=6, help="frames streamed per run (default 6)")
    p.add_argument("--models", default="tiny,demo", help="comma list of tiny, demo")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names or set(names) - set(VARIANTS) or args.frames < 1:
        sys.stderr.write(f"xsvggt: error: --models is a comma list of {', '.join(VARIANTS)}; --frames >= 1\n")
        raise SystemExit(2)
    dev = jax.devices()[0]
    result = {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
              "jax_version": jax.__version__, "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "models": {n: measure(n, args.frames, VARIANTS[n]) for n in names},
              "published_bytes": published_bytes()}
    atomic_write_text(Path(args.out_dir) / "weight_quant.json", json.dumps(result, indent=1))
    sys.stdout.write(tables(result) + "\n")
    return result


if __name__ == "__main__":
    main()
