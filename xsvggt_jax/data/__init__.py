"""Evaluation / training data behind one interface (`Sequence`, `Dataset`; see `base`).

`DATASETS` maps the `xsvggt eval --dataset` names to readers `reader(root, **options) -> Dataset`;
root is the dataset's folder or ONE sequence folder of it (`base.SequenceFolder`: each reader's marks
of a sequence folder); "procedural" takes no folder (root is ignored; options: preset, num_sequences,
seed, config).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xsvggt_jax.data.base import DataError, Dataset, DatasetInfo, Sequence
from xsvggt_jax.data.kitti import read_kitti
from xsvggt_jax.data.procedural import (PRESETS, ProceduralScene, SceneConfig, make_demo_scene, make_scene, procedural_dataset,
                         procedural_sequence)
from xsvggt_jax.data.rgbd_recon import read_7scenes, read_nrgbd
from xsvggt_jax.data.scannet import read_scannet
from xsvggt_jax.data.sintel import read_sintel
from xsvggt_jax.data.tum import TUM_DYNAMICS_SEQUENCES, TUM_FOLDER, read_bonn, read_tum


def _procedural(root: str | Path | None = None, **options) -> Dataset:
    return procedural_dataset(**options)


def _tum_dynamics(root: str | Path, **options) -> Dataset:
    """The TUM-dynamics sequences (fr3 sitting / walking) found under root, or root alone when it is
    one TUM sequence folder."""
    if "sequences" not in options and not TUM_FOLDER.holds(Path(root)):
        options["sequences"] = [s for s in TUM_DYNAMICS_SEQUENCES if (Path(root) / s).is_dir()]
        if not options["sequences"]:
            raise DataError(f"{root}: none of the TUM-dynamics sequences {', '.join(TUM_DYNAMICS_SEQUENCES)} "
                            f"in it, and it is not one TUM sequence folder ({TUM_FOLDER.pattern} in it)")
    return read_tum(root, **options)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "7scenes": read_7scenes,
    "nrgbd": read_nrgbd,
    "tum": read_tum,
    "tum-dynamics": _tum_dynamics,
    "scannet": read_scannet,
    "bonn": read_bonn,
    "sintel": read_sintel,
    "kitti": read_kitti,
    "procedural": _procedural,
}


def load_dataset(name: str, root: str | Path | None = None, **options) -> Dataset:
    """DATASETS[name](root, **options); raises DataError for an unknown name or a missing root."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if root is None and name != "procedural":
        raise DataError(f"dataset {name!r} needs a data folder")
    return DATASETS[name](root, **options)


__all__ = ["DATASETS", "DataError", "Dataset", "DatasetInfo", "PRESETS", "ProceduralScene", "SceneConfig", "Sequence",
           "load_dataset", "make_demo_scene", "make_scene", "procedural_dataset", "procedural_sequence",
           "read_7scenes", "read_bonn", "read_kitti", "read_nrgbd", "read_scannet", "read_sintel", "read_tum"]
