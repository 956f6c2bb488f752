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
from typing import Any, Optional

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
                    scenes: int, baselines: bool = False, others: dict[str, dict] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """{"model": {...}} (plus "random_weights", "constant_depth", "identity_poses" when `baselines`,
    and one entry per `others` name -> params of the same configuration, e.g. another shipped model)
    of mean {"abs_rel", "delta_1.25", "ate", "focal_err"} over `scenes` held-out procedural scenes."""
    h, w = frame_size
    clips = eval_clips(DataSource(frames=frames, height=h, width=w), scenes)
    predict = eval_forward(cfg, "causal", None)
    models = {"model": params, **(others or {})}
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


def build(run_dir: Path, name: str, scenes: int, out_dir: Path = PACKAGE_DIR, *, compare: tuple[str, ...] = (),
          check_scenes: int = 0, command: Optional[str] = None, purpose: Optional[str] = None,
          timing: Optional[str] = None, loss_png: Optional[Path] = None,
          build_command: Optional[str] = None) -> dict[str, Any]:
    """Write out_dir/<name>.{safetensors,json,md} from an `xsvggt train` run; returns the card.

    compare: shipped models (`xsvggt_jax.pretrained`, same architecture) scored on the same held-out
    clips; check_scenes > 0: also the metrics of the first `check_scenes` of those clips (a row a fast
    test reproduces); command: the training command verbatim; purpose: the card's sentence on what the
    model is for; timing: the card's note on the training machine; loss_png: also draw the loss curve
    there (the card names it); build_command: this packaging command as the card should print it."""
    import safetensors.numpy
    from flax.traverse_util import flatten_dict

    from xsvggt_jax import pretrained

    run = json.loads((run_dir / "run.json").read_text())
    params, cfg = load_params(run_dir / "params")
    params = round_to_storage(jax.device_get(params))
    data = run["data"]
    size, frames = (data["height"], data["width"]), data["frames"]
    others = {}
    for other in compare:
        p, other_cfg = pretrained.load(other)
        if other_cfg.architecture() != cfg.architecture():
            raise ValueError(f"--compare {other}: another architecture than the trained model's")
        others[other] = p
    t0 = time.perf_counter()
    metrics = heldout_metrics(params, cfg, size, frames, scenes, baselines=True, others=others)
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
    # optional card parts (absent from the demo's card, whose text stays as it was built)
    if compare:  # name -> its training regime, for the table's row label
        info["heldout"]["compared"] = {
            other: "trained on {frames}-frame clips at {h}x{w}".format(
                frames=pretrained.card(other)["training"]["data"]["frames"], h=pretrained.card(other)["frame_size"][0],
                w=pretrained.card(other)["frame_size"][1]) for other in compare}
    if check_scenes:
        info["heldout"]["check"] = {"scenes": check_scenes,
                                    "metrics": heldout_metrics(params, cfg, size, frames, check_scenes)["model"]}
    if command:
        info["training"]["command"] = command
    if build_command:
        info["build_command"] = build_command
    if purpose:
        info["purpose"] = purpose
    if timing:
        info["training"]["timing"] = timing
    if loss_png is not None:
        info["training"]["loss_curve"] = loss_png.as_posix()
        plot_loss(steps, loss_png, f"{name}: training loss")
    flat = {"/".join(k): np.asarray(v, STORAGE_DTYPE) for k, v in flatten_dict(params).items()}
    atomic_write(out_dir / f"{name}.safetensors", lambda f: f.write(safetensors.numpy.save(flat)))
    atomic_write_json(out_dir / f"{name}.json", info)
    atomic_write_text(out_dir / f"{name}.md", model_card_markdown(info))
    return info


#: The demo card's sentence on what the model is for (cards without a "purpose" use it).
DEMO_PURPOSE = ("so that `xsvggt demo` shows real geometry. It is a demonstration model: it knows textured\n"
                "boxes and planes under smooth camera paths at {h}x{w} pixels, nothing of real images.")
DEMO_TIMING = "(about 2.5x faster alone)"
DEMO_LOSS_CURVE = "benchmarks/results/demo_model_loss.png"
#: Labels of the held-out table's rows (other shipped models: "<name> model").
ROW_LABELS = {"model": "trained model", "random_weights": "random weights",
              "constant_depth": "constant depth (median-scaled)", "identity_poses": "identity poses"}


def plot_loss(steps: list[dict], path: Path, title: str) -> None:
    """The training loss per step (log) and its 50-step running mean, as a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loss = np.array([r["loss"] for r in steps], np.float64)
    x = np.array([r["step"] for r in steps])
    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(x, loss, lw=0.5, alpha=0.4, label="loss")
    k = min(50, len(loss))
    ax.plot(x[k - 1:], np.convolve(loss, np.ones(k) / k, "valid"), lw=1.5, label=f"{k}-step mean")
    ax.set(yscale="log", xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def model_card_markdown(info: dict) -> str:
    """The human-readable model card of `info` (a `<name>.json`)."""
    t, held = info["training"], info["heldout"]
    m = held["metrics"]
    cfg = ModelConfig.from_dict(info["config"])
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(param_shapes(cfg)))
    h, w = info["frame_size"]
    fmt = lambda v: "–" if v is None else f"{v:.4f}"
    names = ["model", *held.get("compared", ()), "random_weights", "constant_depth", "identity_poses"]
    rows = [(ROW_LABELS.get(k) or f"`{k}` model ({held['compared'][k]})", m[k]) for k in names]
    table = "\n".join(f"| {label} | {fmt(r.get('abs_rel'))} | {fmt(r.get(DELTA_KEYS[0]))} | {fmt(r.get('ate'))} | "
                      f"{fmt(r.get('focal_err'))} |" for label, r in rows)
    secs = t["train_seconds"]
    command = (f"`{t['command']}`" if "command" in t else
               f"`xsvggt train --config tiny --steps {t['steps']} --frames {t['data']['frames']} --size {h}x{w}\n"
               f"  --lr {t['optim']['lr']} --warmup {t['optim']['warmup']} --out RUN`")
    build_cmd = info.get("build_command", f"python -m xsvggt_jax.pretrained.build RUN --name {info['name']}")
    if "check" in held:
        c = held["check"]
        check = (f"`tests/test_pretrained.py` reloads the shipped file and reproduces the trained model's row on the "
                 f"first {c['scenes']} of these\nscenes to 1e-4 (AbsRel {fmt(c['metrics']['abs_rel'])}, ATE "
                 f"{fmt(c['metrics']['ate'])}: `heldout.check` in `{info['name']}.json`).")
    else:
        check = "`tests/test_pretrained.py` reloads the shipped file and reproduces the trained model's row to 1e-4."
    return f"""# Model card: `{info['name']}`

A StreamVGGT-architecture model (the `tiny`-sized configuration, {n:,} parameters, stored as
{info['storage_dtype']}) trained from random weights in this repository, on this project's procedural
scenes only, {info.get('purpose', DEMO_PURPOSE).format(h=h, w=w)}

## Training
- data: procedural clips of {t['data']['frames']} frames at {h}x{w}, batch {t['data']['batch']}, a new
  scene every step (seeds from {t['data']['seed']}); supervised depth, point map and camera losses
  (`xsvggt_jax.train`), dense alignment `{t['loss']['dense_alignment']}`;
- optimizer: AdamW, lr {t['optim']['lr']} with {t['optim']['warmup']} warmup steps and cosine decay,
  clip {t['optim']['clip_norm']}; {t['steps']} steps in about {secs / 60:.0f} min on a 2-core CPU shared with
  other jobs {t.get('timing', DEMO_TIMING)};
- loss: {t['loss_first_last'][0]:.1f} at step 1, mean {t['loss_mean_last_100']:.2f} over the last 100 steps
  (curve: `{t.get('loss_curve', DEMO_LOSS_CURVE)}`); held-out AbsRel during training (4 scenes):
  {', '.join(f"{e['abs_rel']:.3f} at {e['step']}" for e in t['eval_during_training'])};
- command: {command} then
  `{build_cmd}`.

## Held-out metrics
{held['scenes']} procedural scenes never seen in training, {held['frames']} frames each, whole-clip
causal forward; depth AbsRel and delta<1.25 after one median scale per sequence, ATE after Sim(3)
alignment of the camera centres (scene units; the scenes span a few units), focal error
mean |f / f_true - 1| of the focal lengths the predicted fields of view give.

| | AbsRel | delta<1.25 | ATE | focal error |
|---|---|---|---|---|
{table}

{check}

## Limits
Procedural scenes only; frames of other sizes and much longer streams than its clips are outside what
it was trained on (streaming with a compressed cache works, quality degrades with length).
"""


#: What the cards of models after the demo say about themselves (`build` arguments by model name): the
#: purpose sentence, the training command verbatim and the note on the machine it ran on.
MODEL_NOTES: dict[str, dict[str, str]] = {
    "stream8": {
        "purpose": ("for the quality-per-byte study at a realistic scale (`benchmarks/quality_scale.py`):\n"
                    "{h}x{w} frames (108 patches, 113 tokens a frame) in 8-frame clips, so that cache budgets of one to\n"
                    "four frames' tokens cut into the history it learned to use. Like the demo model it knows\n"
                    "textured boxes and planes under smooth camera paths, nothing of real images."),
        "command": ("xsvggt train --config tiny --steps 1000 --frames 8 --size 126x168 --lr 0.0005 --warmup 100\n"
                    "  --eval-every 250 --eval-scenes 4 --save-every 250 --out RUN"),
        "timing": "(run at nice 10 beside several other agents' jobs; about 0.55 steps/s when the machine is quiet)",
    },
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m xsvggt_jax.pretrained.build", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--name", default="demo")
    p.add_argument("--scenes", type=int, default=16)
    p.add_argument("--compare", default="", help="comma list of shipped models scored on the same held-out clips")
    p.add_argument("--check-scenes", type=int, default=0,
                   help="also store the metrics of the first K scenes (a row a fast test reproduces)")
    p.add_argument("--loss-png", type=Path, help="draw the loss curve here (relative to the repository root)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    notes = MODEL_NOTES.get(args.name, {})
    compare = tuple(c for c in args.compare.split(",") if c)
    extra = "".join([f" --scenes {args.scenes}" if args.scenes != 16 else "",
                     f" --compare {','.join(compare)}" if compare else "",
                     f" --check-scenes {args.check_scenes}" if args.check_scenes else "",
                     f" --loss-png {args.loss_png.as_posix()}" if args.loss_png else ""])
    info = build(args.run_dir, args.name, args.scenes, compare=compare, check_scenes=args.check_scenes,
                 command=notes.get("command"), purpose=notes.get("purpose"), timing=notes.get("timing"),
                 loss_png=args.loss_png,
                 build_command=f"python -m xsvggt_jax.pretrained.build RUN --name {args.name}{extra}" if extra else None)
    print(json.dumps(info["heldout"], indent=1))


if __name__ == "__main__":
    main()
