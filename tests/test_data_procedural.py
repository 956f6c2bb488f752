"""Procedural scenes: determinism, exact geometry (depth, poses, intrinsics agree), shapes, interface."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from xsvggt_jax.data import DATASETS, DataError, load_dataset
from xsvggt_jax.data.procedural import (PRESETS, SceneConfig, make_demo_scene, make_scene, procedural_dataset,
                                        procedural_sequence, render_frame)
from xsvggt_jax.data.preprocess import preprocess_frame
from xsvggt_jax.geometry import unproject_depth

TINY = PRESETS["tiny"]
SMALL = SceneConfig(frames=5, height=36, width=48)


@pytest.fixture(scope="module")
def small_scene():
    return make_scene(SMALL, seed=3)


def test_same_seed_same_arrays_other_seed_differs():
    a, b, c = make_scene(TINY, seed=5), make_scene(TINY, seed=5), make_scene(TINY, seed=6)
    for field in ("images", "depth", "extrinsics", "intrinsics", "query_points"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.depth, c.depth)
    assert not np.array_equal(a.extrinsics, c.extrinsics)


def test_unprojected_depth_lies_on_the_analytic_surfaces(small_scene):
    # independent of the ray caster: signed distance functions of walls, boxes and spheres
    pts = unproject_depth(small_scene.depth, small_scene.extrinsics, small_scene.intrinsics).astype(np.float64)
    dist = small_scene.world.surface_distance(pts)
    assert dist.max() < 1e-4 * small_scene.depth.max(), dist.max()


def _project(points: np.ndarray, extr: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = points @ extr[:, :3].T + extr[:, 3]
    return (cam @ k.T)[..., :2] / cam[..., 2:], cam[..., 2]


def test_depth_reprojects_consistently_between_frames(small_scene):
    sc = small_scene
    extr, k = sc.extrinsics.astype(np.float64), sc.intrinsics.astype(np.float64)
    for i, j in [(0, 1), (1, 3), (4, 2)]:
        pts = unproject_depth(sc.depth[i:i + 1], extr[i:i + 1], k[i:i + 1])[0].astype(np.float64)
        uv, z = _project(pts, extr[j], k[j])
        inside = (z > 0) & (uv[..., 0] >= 0) & (uv[..., 0] <= SMALL.width - 1) & \
                 (uv[..., 1] >= 0) & (uv[..., 1] <= SMALL.height - 1)
        # depth seen by frame j along the ray through the (sub-pixel) projection
        rot, t = extr[j, :, :3], extr[j, :, 3]
        pix = np.concatenate([uv[inside], np.ones((inside.sum(), 1))], -1)
        dirs = pix @ np.linalg.inv(k[j]).T @ rot
        seen, _, _ = sc.world.cast(-rot.T @ t, dirs)
        rel = (seen - z[inside]) / z[inside]
        assert rel.max() < 1e-4, rel.max()  # nothing is seen behind a surface point
        visible = np.abs(rel) < 1e-4
        assert visible.mean() > 0.3, visible.mean()  # most of the overlap agrees exactly


def test_poses_are_proper_rotations_inside_the_room(small_scene):
    extr = small_scene.extrinsics.astype(np.float64)
    rot = extr[:, :, :3]
    np.testing.assert_allclose(rot @ np.swapaxes(rot, 1, 2), np.broadcast_to(np.eye(3), rot.shape), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-6)
    eyes = -np.einsum("sji,sj->si", rot, extr[:, :, 3])
    assert (np.abs(eyes) < small_scene.world.half).all()
    assert (small_scene.world.surface_distance(eyes) > 0.2).all()  # clear of walls and objects
    # the camera both moves and turns
    assert np.linalg.norm(eyes[-1] - eyes[0]) > 0.3
    assert np.degrees(np.arccos((np.trace(rot[0].T @ rot[-1]) - 1) / 2)) > 5


def test_demo_preset_shapes_and_dtypes():
    sc = make_demo_scene(frames=2, height=28, width=42, num_queries=5)
    assert sc.images.shape == (2, 28, 42, 3) and sc.images.dtype == np.float32
    assert sc.depth.shape == (2, 28, 42) and sc.depth.dtype == np.float32
    assert sc.extrinsics.shape == (2, 3, 4) and sc.extrinsics.dtype == np.float32
    assert sc.intrinsics.shape == (2, 3, 3) and sc.intrinsics.dtype == np.float32
    assert sc.query_points.shape == (5, 2) and sc.query_points.dtype == np.float32
    assert 0 <= sc.images.min() and sc.images.max() <= 1 and (sc.depth > 0).all()
    assert ((sc.query_points >= 0) & (sc.query_points <= [42, 28])).all()
    np.testing.assert_allclose(sc.intrinsics[0], [[0.9 * 42, 0, 21], [0, 0.9 * 42, 14], [0, 0, 1]], rtol=1e-6)
    assert PRESETS["demo"].frames == 24 and (PRESETS["demo"].height, PRESETS["demo"].width) == (112, 154)


def test_textures_give_distinct_colours_per_surface(small_scene):
    # every frame shows several surfaces, each textured (not flat): many distinct colours
    for img in small_scene.images:
        colours = np.unique(np.round(img.reshape(-1, 3) * 255).astype(int), axis=0)
        assert len(colours) > 200
    means = [small_scene.world.colours[s].mean(0) for s in range(len(small_scene.world.colours))]
    assert len(np.unique(np.round(np.array(means), 3), axis=0)) == len(means)


def test_sequence_interface_reproduces_the_scene(small_scene):
    seq = small_scene.to_sequence("s")
    assert len(seq) == SMALL.frames
    np.testing.assert_array_equal(seq.images(), small_scene.images)
    np.testing.assert_array_equal(seq.depths(), small_scene.depth)
    np.testing.assert_array_equal(seq.extrinsics[:, :3], small_scene.extrinsics.astype(np.float64))
    np.testing.assert_array_equal(seq.extrinsics[:, 3], np.broadcast_to([0, 0, 0, 1.0], (SMALL.frames, 4)))
    assert seq.rgb(0).dtype == np.uint8 and seq.rgb(0).shape == (SMALL.height, SMALL.width, 3)
    assert seq.pil(1).size == (SMALL.width, SMALL.height)


def test_lazy_sequence_renders_the_same_frames(small_scene):
    lazy = procedural_sequence(SMALL, seed=3)
    eager = small_scene.to_sequence()
    np.testing.assert_array_equal(lazy.extrinsics, eager.extrinsics)
    np.testing.assert_array_equal(lazy.intrinsics, eager.intrinsics)
    for i in (2, 0, 0, 4):  # out of order and repeated: the one-frame cache must follow the index
        np.testing.assert_array_equal(lazy.depth(i), small_scene.depth[i])
        np.testing.assert_array_equal(lazy.image(i), small_scene.images[i])


def test_procedural_dataset_and_registry():
    ds = procedural_dataset("tiny", num_sequences=2, seed=4)
    assert [s.name for s in ds] == ["tiny-0004", "tiny-0005"]
    assert not np.array_equal(ds[0].images(), ds[1].images())
    np.testing.assert_array_equal(load_dataset("procedural", preset="tiny", num_sequences=1, seed=5)[0].images(),
                                  ds[1].images())
    assert "procedural" in DATASETS
    with pytest.raises(DataError, match="unknown procedural preset"):
        procedural_dataset("huge")
    with pytest.raises(DataError, match="positive"):
        dataclasses.replace(TINY, frames=0)


@pytest.mark.parametrize("mode,width,height", [("crop", 126, 168), ("pad", 84, 126)])
def test_preprocessed_ground_truth_matches_a_render_at_the_new_camera(mode, width, height):
    # a downscale by exactly 3 puts every output pixel centre on a source pixel centre, so the
    # nearest-resampled depth must equal a direct render with the preprocessed intrinsics
    config = SceneConfig(frames=2, height=height, width=width)
    scene = make_scene(config, seed=9)
    seq = scene.to_sequence()
    world, extr = scene.world, scene.extrinsics.astype(np.float64)
    for i in range(2):
        image, depth, k = preprocess_frame(seq, i, mode, target=42)
        assert image.shape == (42, 42, 3) and depth.shape == (42, 42)
        _, direct = render_frame(world, extr[i], k, 42, 42)
        valid = depth > 0
        np.testing.assert_allclose(depth[valid], direct[valid], rtol=1e-5)
        if mode == "pad":  # 28 columns of picture, 7 padded on each side
            assert not valid[:, :7].any() and not valid[:, -7:].any() and valid[:, 7:-7].all()
            assert (image[:, :7] == 1).all()
        else:  # 56 rows resized, 7 cropped at the top and the bottom: every pixel valid
            assert valid.all()
            np.testing.assert_allclose(k[1, 2], (scene.intrinsics[i, 1, 2] + 0.5) / 3 - 0.5 - 7, rtol=1e-6)
