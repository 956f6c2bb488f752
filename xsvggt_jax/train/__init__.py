"""Training: StreamVGGT / VGGT losses (`losses`) and their configuration (`config`)."""

from xsvggt_jax.train.config import LossConfig, LossConfigError
from xsvggt_jax.train.losses import (LossInputError, align_scale_shift, camera_loss, depth_loss, huber,
                     multitask_loss, point_loss, track_loss)

__all__ = ["LossConfig", "LossConfigError", "LossInputError", "align_scale_shift", "camera_loss",
           "depth_loss", "huber", "multitask_loss", "point_loss", "track_loss"]
