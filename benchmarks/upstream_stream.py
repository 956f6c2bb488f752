"""Optional: time upstream PyTorch StreamVGGT streaming (Aggregator + CameraHead) with random weights.

Run by `benchmarks.stream --upstream-src PATH` as a separate process (an interpreter that has torch,
see `--upstream-python`), never imported by the JAX process: torch stays out of the project. Upstream
code is read from PATH/src at run time, nothing of it is copied here. The cache setting comes from the
environment (KV_PRUNE_MODE, KV_CACHE_SIZE, KV_POOL_SIZE, KV_QUANT_MODE), which the caller sets before
this process imports upstream.

    python benchmarks/upstream_stream.py --src PATH --spec '<ModelConfig.to_spec() JSON>' \
        --height 112 --width 154 --frames 10 --out result.json

Frames are the same as benchmarks.stream's: np.random.default_rng(0), one [1, H, W, 3] float32 draw
per frame (here transposed to [3, H, W]).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.upstream_stream")


def tensor_bytes(kv) -> int:
    """Bytes of a (nested) list/tuple of tensors, None entries ignored."""
    if kv is None:
        return 0
    if isinstance(kv, (list, tuple)):
        return sum(tensor_bytes(x) for x in kv)
    return int(kv.numel() * kv.element_size())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, required=True, help="upstream checkout (its src/ holds streamvggt)")
    p.add_argument("--spec", required=True, help="ModelConfig.to_spec() as JSON")
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu", help="torch device (default cpu; cuda for the GPU benchmark)")
    p.add_argument("--autocast", choices=("none", "bfloat16"), default="none",
                   help="run the aggregator under torch.autocast(dtype=bfloat16), heads in float32, as upstream "
                        "evaluates (default none: float32)")
    p.add_argument("--heads", action="store_true",
                   help="also run the depth and point DPT heads (upstream StreamVGGT's heads, float32), "
                        "as our step does; without: aggregator + camera head only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    src = args.src / "src" if (args.src / "src" / "streamvggt").is_dir() else args.src
    sys.path.insert(0, str(src))
    import torch
    from streamvggt.heads.camera_head import CameraHead
    from streamvggt.layers import MemEffAttention
    from streamvggt.layers.block import NestedTensorBlock
    from streamvggt.layers.vision_transformer import DinoVisionTransformer
    from streamvggt.models.aggregator import Aggregator

    spec = json.loads(args.spec)
    pe, cam_spec = spec["patch_embed"], spec["camera_head"]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    agg = Aggregator(img_size=spec["img_size"], patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
                     depth=spec["depth"], num_heads=spec["num_heads"], mlp_ratio=spec["mlp_ratio"],
                     num_register_tokens=spec["num_register_tokens"], patch_embed="conv")  # replaced below
    agg.patch_embed = DinoVisionTransformer(
        img_size=spec["img_size"], patch_size=spec["patch_size"], embed_dim=pe["embed_dim"], depth=pe["depth"],
        num_heads=pe["num_heads"], mlp_ratio=pe.get("mlp_ratio", 4), num_register_tokens=spec["num_register_tokens"],
        block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention),
        interpolate_antialias=True, interpolate_offset=0.0, block_chunks=0, init_values=1.0)
    cam = CameraHead(dim_in=2 * spec["embed_dim"], trunk_depth=cam_spec["trunk_depth"],
                     num_heads=cam_spec["num_heads"])
    heads = []
    if args.heads:
        from streamvggt.heads.dpt_head import DPTHead
        dpt = spec["dpt"]
        kw = dict(dim_in=2 * spec["embed_dim"], features=dpt["features"], out_channels=dpt["out_channels"],
                  intermediate_layer_idx=dpt["intermediate_layer_idx"])
        heads = [DPTHead(output_dim=4, activation="inv_log", conf_activation="expp1", **kw),
                 DPTHead(output_dim=2, activation="exp", conf_activation="expp1", **kw)]
    device = torch.device(args.device)
    for m in (agg, cam, *heads):
        m.to(device).eval()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    build_s = time.perf_counter() - t0
    attn_src = src / "streamvggt" / "layers" / "attention.py"
    quant_supported = "KV_QUANT_MODE" in attn_src.read_text()

    rng = np.random.default_rng(0)
    pkv, pkc = [None] * agg.depth, [None] * cam.trunk_depth
    latency, cache_bytes = [], []
    with torch.no_grad():
        for i in range(args.frames):
            img = torch.from_numpy(rng.random((1, args.height, args.width, 3), dtype=np.float32)[0].transpose(2, 0, 1).copy())
            img = img.to(device)
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bfloat16"):
                tokens, patch_start, pkv = agg(img[None, None], past_key_values=pkv, use_cache=True,
                                               past_frame_idx=i)
            with torch.autocast(device.type, enabled=False):
                tokens = [x.float() for x in tokens]
                pose, pkc = cam(tokens, past_key_values_camera=pkc, use_cache=True)
                last = pose[-1].sum()
                for h in heads:
                    pred, conf = h(tokens, images=img[None, None], patch_start_idx=patch_start)
                    last = last + pred.sum() + conf.sum()
            last.item()  # forces the whole frame (CPU is synchronous anyway)
            latency.append(time.perf_counter() - t)
            cache_bytes.append(tensor_bytes(pkv) + tensor_bytes(pkc))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(), "build_s": build_s,
        "params": sum(x.numel() for m in (agg, cam) for x in m.parameters()),
        "quant_supported": quant_supported, "latency_s": latency, "cache_bytes": cache_bytes,
        "peak_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024),
        "device_peak_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "autocast": args.autocast,
        "heads": bool(heads),
        "env": {k: os.environ.get(k) for k in ("KV_PRUNE_MODE", "KV_QUANT_MODE", "KV_CACHE_SIZE", "KV_POOL_SIZE")},
    }
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.out)
    return result


if __name__ == "__main__":
    main()
