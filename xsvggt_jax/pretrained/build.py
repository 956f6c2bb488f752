"""Package a trained run as a shipped model and measure its card: `python -m xsvggt_jax.pretrained.build`.

    python -m xsvggt_jax.pretrained.build RUN_DIR [--name demo] [--scenes 16]

reads RUN_DIR (an `xsvggt train` output: run.json, params/, metrics.jsonl, eval.jsonl), stores the
parameters as float16 safetensors in this package (`<name>.safetensors`, leaves keyed by their
"/"-joined path) and writes `<name>.json` (config, frame size, training settings and curve summary,
held-out metrics) and `<name>.md` (the human model card).

Held-out metrics (`heldout_metrics`) are measured on the float16-rounded weights, so loading the
shipped file reproduces them: procedural scenes with seeds EVAL_SEED_BASE + k (never seen in
training) at the training clip's frame size and length, full-sequence causal forward; per scene depth
AbsRel / delta<1.25 (one median scale per sequence) and camera ATE (Sim(3)-aligned centres), averaged
over scenes. Baselines on the same scenes: random weights (init seed 0), a constant depth map (AbsRel
after the median scale) and identity poses (all centres coincide, so the best Sim(3) fit puts them at
the ground truth's centroid: ATE = RMS distance of the true centres from their centroid).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from xsvggt_jax.config import ModelConfig
from xsvggt_jax.eval.depth import DELTA_KEYS, evaluate_depth
from xsvggt_jax.eval.pose import extrinsics_to_c2w
from xsvggt_jax.io.fsutil import atomic_write, atomic_write_json, atomic_write_text
from xsvggt_jax.weights.params import load_params
from xsvggt_jax.nn.model import init_params, param_shapes
from xsvggt_jax.train.data import DataSource, eval_clips
from xsvggt_jax.train.loop import clip_metrics
from xsvggt_jax.train.step import eval_forward

log = logging.getLogger(__name__)

STORAGE_DTYPE = "float16"
PACKAGE_DIR = Path(__file__).parent


def round_to_storage(params: dict) -> dict:
    """float32 leaves rounded through the storage dtype (what `load` returns for the shipped file)."""
    def rnd(x):
        x = np.asarray(x, np.float32)
        if np.abs(x).max(initial=0.0) >= np.finfo(np.float16).max:
            raise ValueError("a parameter exceeds the float16 range; store this model in float32")
        return x.astype(STORAGE_DTYPE).astype(np.float32)
    return jax.tree.map(rnd, params)


def _identity_pose_ate(ref_c2w: np.ndarray) -> float:
    centres = ref_c2w[:, :3, 3]
    return float(np.sqrt(np.mean(np.sum((centres - centres.mean(0)) ** 2, axis=-1))))


def heldout_metrics(params: dict, cfg: ModelConfig, frame_size: tuple[int, int], frames: int,
                    scenes: int, baselines: bool = False) -> dict[str, dict[str, Any]]:
    """{"model": {...}} (plus "random_weights", "constant_depth", "identity_poses" when `baselines`)
    of mean {"abs_rel", "delta_1.25", "ate", "focal_err"} over `scenes` held-out procedural scenes."""
    h, w = frame_size
    clips = eval_clips(DataSource(frames=frames, height=h, width=w), scenes)
    predict = eval_forward(cfg, "causal", None)
    models = {"model": params}
    if baselines:
        models["random_weights"] = init_params(cfg, jax.random.key(0))
    rows: dict[str, list[dict]] = {k: [] for k in models}
    if baselines:
        rows.update(constant_depth=[], identity_poses=[])
    for targets, scene in clips:
        gt_c2w = extrinsics_to_c2w(scene.extrinsics)
        for name, p in models.items():
            row = clip_metrics(jax.device_get(predict(p, targets["images"][None])), scene)
            if row["ate"] is None:   # coinciding predicted centres: the identity-pose value
                row["ate"] = _identity_pose_ate(gt_c2w)
            rows[name].append(row)
        if baselines:
            d = evaluate_depth(np.ones_like(scene.depth, np.float64), scene.depth, align="median")
            rows["constant_depth"].append({"abs_rel": d["abs_rel"], DELTA_KEYS[0]: d[DELTA_KEYS[0]]})
            rows["identity_poses"].append({"ate": _identity_pose_ate(gt_c2w)})
    return {name: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for name, rs in rows.items()}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def build(run_dir: Path, name: str, scenes: int, out_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """Write out_dir/<name>.{safetensors,json,md} from an `xsvggt train` run; returns the card."""
    import safetensors.numpy
    from flax.traverse_util import flatten_dict

    run = json.loads((run_dir / "run.json").read_text())
    params, cfg = load_params(run_dir / "params")
    params = round_to_storage(jax.device_get(params))
    data = run["data"]
    size, frames = (data["height"], data["width"]), data["frames"]
    t0 = time.perf_counter()
    metrics = heldout_metrics(params, cfg, size, frames, scenes, baselines=True)
    log.info("held-out metrics in %.1f s: %s", time.perf_counter() - t0, metrics)
    steps = _read_jsonl(run_dir / "metrics.jsonl")
    if not steps:
        raise ValueError(f"{run_dir}: no metrics.jsonl")
    info = {
        "format": "xsvggt-pretrained/1",
        "name": name,
        "config": cfg.to_dict(),
        "frame_size": list(size),
        "storage_dtype": STORAGE_DTYPE,
        "training": {
            "data": data, "optim": run["optim"], "loss": run["loss"], "student": run["student"],
            "steps": steps[-1]["step"],
            # the loop's steps/s is cumulative from the end of the first (compiling) step
            "train_seconds": float(steps[-1]["step"] / steps[-1]["steps_per_s"]) if steps[-1].get("steps_per_s") else None,
            "loss_first_last": [steps[0]["loss"], steps[-1]["loss"]],
            "loss_mean_last_100": float(np.mean([r["loss"] for r in steps[-100:]])),
            "eval_during_training": _read_jsonl(run_dir / "eval.jsonl"),
        },
        "heldout": {"scenes": scenes, "frames": frames, "seed_base": "train.data.EVAL_SEED_BASE",
                    "forward": "causal, whole clip", "metrics": metrics},
    }
    flat = {"/".join(k): np.asarray(v, STORAGE_DTYPE) for k, v in flatten_dict(params).items()}
    atomic_write(out_dir / f"{name}.safetensors", lambda f: f.write(safetensors.numpy.save(flat)))
    atomic_write_json(out_dir / f"{name}.json", info)
    atomic_write_text(out_dir / f"{name}.md", model_card_markdown(info))
    return info


def model_card_markdown(info: dict) -> str:
    """The human-readable model card of `info` (a `<name>.json`)."""
    t, m = info["training"], info["heldout"]["metrics"]
    cfg = ModelConfig.from_dict(info["config"])
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_shapes(cfg)))
    h, w = info["frame_size"]
    fmt = lambda v: "–" if v is None else f"{v:.4f}"
    rows = [("trained model", m["model"]), ("random weights", m["random_weights"]),
            ("constant depth (median-scaled)", m["constant_depth"]), ("identity poses", m["identity_poses"])]
    table = "\n".join(f"| {label} | {fmt(r.get('abs_rel'))} | {fmt(r.get(DELTA_KEYS[0]))} | {fmt(r.get('ate'))} | "
                      f"{fmt(r.get('focal_err'))} |" for label, r in rows)
    secs = t["train_seconds"]
    return f"""# Model card: `{info['name']}`

A StreamVGGT-architecture model (the `tiny`-sized configuration, {n:,} parameters, stored as
{info['storage_dtype']}) trained from random weights in this repository, on this project's procedural
scenes only, so that `xsvggt demo` shows real geometry. It is a demonstration model: it knows textured
boxes and planes under smooth camera paths at {h}x{w} pixels, nothing of real images.

## Training
- data: procedural clips of {t['data']['frames']} frames at {h}x{w}, batch {t['data']['batch']}, a new
  scene every step (seeds from {t['data']['seed']}); supervised depth, point map and camera losses
  (`xsvggt_jax.train`), dense alignment `{t['loss']['dense_alignment']}`;
- optimizer: AdamW, lr {t['optim']['lr']} with {t['optim']['warmup']} warmup steps and cosine decay,
  clip {t['optim']['clip_norm']}; {t['steps']} steps in about {secs / 60:.0f} min on a 2-core CPU shared with
  other jobs (about 2.5x faster alone);
- loss: {t['loss_first_last'][0]:.1f} at step 1, mean {t['loss_mean_last_100']:.2f} over the last 100 steps
  (curve: `benchmarks/results/demo_model_loss.png`); held-out AbsRel during training (4 scenes):
  {', '.join(f"{e['abs_rel']:.3f} at {e['step']}" for e in t['eval_during_training'])};
- command: `xsvggt train --config tiny --steps {t['steps']} --frames {t['data']['frames']} --size {h}x{w}
  --lr {t['optim']['lr']} --warmup {t['optim']['warmup']} --out RUN` then
  `python -m xsvggt_jax.pretrained.build RUN --name {info['name']}`.

## Held-out metrics
{info['heldout']['scenes']} procedural scenes never seen in training, {info['heldout']['frames']} frames each, whole-clip
causal forward; depth AbsRel and delta<1.25 after one median scale per sequence, ATE after Sim(3)
alignment of the camera centres (scene units; the scenes span a few units), focal error
mean |f / f_true - 1| of the focal lengths the predicted fields of view give.

| | AbsRel | delta<1.25 | ATE | focal error |
|---|---|---|---|---|
{table}

`tests/test_pretrained.py` reloads the shipped file and reproduces the trained model's row to 1e-4.

## Limits
Procedural scenes only; frames of other sizes and much longer streams than its clips are outside what
it was trained on (streaming with a compressed cache works, quality degrades with length).
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m xsvggt_jax.pretrained.build", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--name", default="demo")
    p.add_argument("--scenes", type=int, default=16)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    info = build(args.run_dir, args.name, args.scenes)
    print(json.dumps(info["heldout"], indent=1))


if __name__ == "__main__":
    main()
