"""Evaluation metrics of the StreamVGGT / XStreamVGGT papers (numpy + scipy).

* `depth`: AbsRel, delta < 1.25 (and friends) with per-frame median, per-sequence robust scale,
  least-squares scale-and-shift or no alignment; per-dataset depth caps; OpenCV-bicubic resize.
* `pose`: ATE / RPE-trans / RPE-rot (evo conventions, Sim(3) Umeyama), TUM files, VGGT's
  RRA / RTA / AUC@30.
* `pointcloud`: Accuracy, Completeness, Normal Consistency with the 7-Scenes / NRGBD protocol
  (median shift + median-norm scale, centre crop, point-to-point ICP, PCA normals).

Evaluating cache settings (these import JAX and the model, so they are not imported here):
* `settings`: the `--settings` grammar (`parse_settings("none,xstream:2048,xstream-int4:2048")`);
* `runner`: `evaluate(params, cfg, dataset, settings, task)` streams and scores a dataset;
* `report`: `write_report(results, directory)` (results.json, results.md, accuracy_vs_bytes.png);
* `command`: the `xsvggt eval` subcommand.
"""

from xsvggt_jax.eval.depth import (DEPTH_PROTOCOLS, DepthProtocol, average_depth_metrics, depth_metrics,
                    evaluate_depth, lstsq_scale_shift, median_scale, resize_depth, robust_scale,
                    valid_depth_mask)
from xsvggt_jax.eval.geometry import EvalInputError, Similarity, umeyama
from xsvggt_jax.eval.pointcloud import (accuracy_completeness, centre_crop, estimate_normals, icp_point_to_point,
                         median_shift_scale, reconstruction_metrics, world_to_camera)
from xsvggt_jax.eval.pose import (absolute_trajectory_error, align_trajectory, c2w_to_extrinsics,
                   extrinsics_to_c2w, pairwise_pose_errors, pose_accuracy, pose_auc, read_tum,
                   relative_pose_error, trajectory_metrics, write_tum)

__all__ = [
    "DEPTH_PROTOCOLS", "DepthProtocol", "average_depth_metrics", "depth_metrics", "evaluate_depth",
    "lstsq_scale_shift", "median_scale", "resize_depth", "robust_scale", "valid_depth_mask",
    "EvalInputError", "Similarity", "umeyama",
    "accuracy_completeness", "centre_crop", "estimate_normals", "icp_point_to_point",
    "median_shift_scale", "reconstruction_metrics", "world_to_camera",
    "absolute_trajectory_error", "align_trajectory", "c2w_to_extrinsics", "extrinsics_to_c2w",
    "pairwise_pose_errors", "pose_accuracy", "pose_auc", "read_tum", "relative_pose_error",
    "trajectory_metrics", "write_tum",
]
