"""Loss configuration: a frozen (hashable, so jit-static) dataclass with StreamVGGT's defaults.

Defaults follow upstream StreamVGGT's `DistillLoss` (src/dust3r/losses.py, used by config/train.yaml):
total = 20 camera + 20 depth + 10 point + 0.5 track (upstream: lambda_track 0.05 times 10), camera
Huber delta 0.1 with translation / quaternion / FoV weights 1 / 1 / 0.5, confidence regularizer
alpha 0.1 for depth and points, 3 normal scales. `camera_iteration_gamma` is VGGT's
(training/loss.py, compute_camera_loss) and only matters when per-iteration poses are passed.
"""

from __future__ import annotations

import dataclasses

from xsvggt_jax.errors import ConfigError


#: How a dense prediction is aligned to its target before the L1 (after `normalize_maps`):
#: "scale&shift": closed-form per-frame least-squares scale and shift (upstream DistillLoss, made for
#:     distilling a pretrained student; the fitted scale may be negative, so a model trained from
#:     scratch with it can learn depth that is anti-correlated with the truth and still score well);
#: "none": the (normalised) prediction is compared as is: depth must be right up to the scale
#:     `normalize_maps` removes (VGGT's training), the choice for training from random weights.
DENSE_ALIGNMENTS: tuple[str, ...] = ("scale&shift", "none")


class LossConfigError(ConfigError):
    """A loss configuration value is out of range."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and hyper-parameters of `multitask_loss`.

    camera_weight, depth_weight, point_weight, track_weight: term weights in the total.
    huber_delta: Huber threshold on the pose encoding.
    camera_component_weights: (translation, quaternion, FoV) weights inside the camera term.
    camera_iteration_gamma: iteration i of n gets gamma ** (n - 1 - i) (VGGT), mean over iterations.
    depth_alpha, point_alpha: weight of -log(confidence).
    normal_scales: strided scales (1, 2, 4, ...) of the point-map normal loss.
    normalize_maps: divide prediction and target by their mean valid norm before alignment
        (upstream's training-mode `normalize_pointcloud`); the loss is then in units of the target's
        mean distance, i.e. invariant to the scene's scale.
    dense_alignment: one of DENSE_ALIGNMENTS (default: upstream's "scale&shift").
    track_weight_stop_gradient: upstream weights the track terms by the predicted track confidence
        and lets the gradient flow into it (False, the default), so the student can lower the track
        loss by lowering its confidence; True keeps the weighting but blocks that path.
    """

    camera_weight: float = 20.0
    depth_weight: float = 20.0
    point_weight: float = 10.0
    track_weight: float = 0.5
    huber_delta: float = 0.1
    camera_component_weights: tuple[float, float, float] = (1.0, 1.0, 0.5)
    camera_iteration_gamma: float = 0.6
    depth_alpha: float = 0.1
    point_alpha: float = 0.1
    normal_scales: int = 3
    normalize_maps: bool = True
    dense_alignment: str = "scale&shift"
    track_weight_stop_gradient: bool = False

    def __post_init__(self):
        for name in ("camera_weight", "depth_weight", "point_weight", "track_weight",
                     "depth_alpha", "point_alpha"):
            if getattr(self, name) < 0:
                raise LossConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.huber_delta <= 0:
            raise LossConfigError(f"huber_delta must be > 0, got {self.huber_delta}")
        if len(self.camera_component_weights) != 3 or min(self.camera_component_weights) < 0:
            raise LossConfigError("camera_component_weights must be three non-negative numbers, got "
                                  f"{self.camera_component_weights}")
        if not 0 < self.camera_iteration_gamma <= 1:
            raise LossConfigError(f"camera_iteration_gamma must be in (0, 1], got {self.camera_iteration_gamma}")
        if self.dense_alignment not in DENSE_ALIGNMENTS:
            raise LossConfigError(f"dense_alignment must be one of {', '.join(DENSE_ALIGNMENTS)}, "
                                  f"got {self.dense_alignment!r}")
        if self.normal_scales < 1:
            raise LossConfigError(f"normal_scales must be >= 1, got {self.normal_scales}")
