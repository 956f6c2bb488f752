"""The viewer of `xsvggt live`: a viser scene that grows with every processed frame.

Per frame: its confident points (unprojected depth above the frame's `conf_percentile`-th confidence
percentile, at most `points_per_frame` of them, in the image's colours), its camera frustum showing
the frame, and the trajectory of the camera centres; a panel shows frames processed, frames/s,
latency, cache bytes and frames dropped (`LiveStats`). At most `max_points` points are drawn: the
oldest frames' points are removed first; the frustums of the last `FRUSTUM_IMAGES` frames keep their
image. A "cameras" checkbox hides frustums and trajectory, a slider sets the point size.

`LiveViewer(server)` adds to a `viser.ViserServer` (testable without a browser); `add_frame` is called
from the loop's thread, viser sends the changes from its own.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading

import numpy as np
from PIL import Image

from xsvggt_jax.app.view import DEFAULT_MAX_POINTS
from xsvggt_jax.geometry import invert_extrinsics, mat_to_quat, pose_encoding_to_extri_intri, unproject_depth
from xsvggt_jax.io.fsutil import format_bytes

log = logging.getLogger(__name__)

POINTS_PER_FRAME = 4000
FRUSTUM_IMAGES = 30          # frustums that keep showing their frame
FRUSTUM_IMAGE_WIDTH = 160    # px: frames are shrunk to this width for the frustums
FRUSTUM_RGB = (40, 90, 200)
TRAJECTORY_RGB = (255, 120, 0)
VIEW_BACK, VIEW_UP = 1.0, 0.5  # the first view: this far behind and above the first camera (x the frame's extent)


@dataclasses.dataclass
class LiveStats:
    """What the panel shows: frames processed, frames/s (recent), the last frame's latency (arrival to
    outputs, s) and step (s), the cache's bytes (allocated, filled) and frames dropped."""
    frames: int = 0
    fps: float = 0.0
    latency_s: float = 0.0
    step_s: float = 0.0
    cache_bytes: int = 0
    filled_bytes: int = 0
    dropped: int = 0
    status: str = "waiting for frames"

    def markdown(self) -> str:
        return (f"**{self.status}**\n\n| | |\n|---|---|\n| frames | {self.frames} |\n"
                f"| frames/s | {self.fps:.1f} |\n| latency | {1e3 * self.latency_s:.0f} ms |\n"
                f"| step | {1e3 * self.step_s:.0f} ms |\n| cache | {format_bytes(self.cache_bytes)} "
                f"({format_bytes(self.filled_bytes)} filled) |\n| dropped | {self.dropped} |")


def frame_points(depth: np.ndarray, conf: np.ndarray, rgb: np.ndarray, extr: np.ndarray, intr: np.ndarray,
                 conf_percentile: float, limit: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One frame's drawn points: depth [H, W, 1], conf [H, W], colours [H, W, 3] uint8, camera [3, 4] /
    [3, 3] -> (xyz [M, 3] float32, rgb [M, 3] uint8), finite points with conf > 1e-5 and at least
    the frame's `conf_percentile`-th percentile, at most `limit` of them (a fixed random subset)."""
    xyz = unproject_depth(depth[None], extr[None], intr[None])[0].reshape(-1, 3)
    conf = np.asarray(conf, np.float32).reshape(-1)
    ok = np.isfinite(xyz).all(-1) & np.isfinite(conf) & (conf > 1e-5)
    if ok.any():
        ok &= conf >= np.percentile(conf[ok], conf_percentile)
    idx = np.flatnonzero(ok)
    if len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
    return xyz[idx].astype(np.float32), rgb.reshape(-1, 3)[idx]


class LiveViewer:
    """The growing scene on `server` (see the module docstring)."""

    def __init__(self, server, *, max_points: int = DEFAULT_MAX_POINTS, points_per_frame: int = POINTS_PER_FRAME,
                 conf_percentile: float = 50.0):
        self.server, self.max_points = server, max_points
        self.points_per_frame, self.conf_percentile = min(points_per_frame, max_points), conf_percentile
        self.lock = threading.Lock()
        self.clouds: collections.deque = collections.deque()  # (handle, points) oldest first
        self.frustums: collections.deque = collections.deque()
        self.centres: list[np.ndarray] = []
        self.trajectory = None
        self.point_size: float | None = None
        self.scale = 1.0
        self.cameras_visible = True
        self.panel = server.gui.add_markdown(LiveStats().markdown())
        self.size_slider = None
        cameras = server.gui.add_checkbox("cameras", initial_value=True)
        cameras.on_update(lambda _event: self.show_cameras(cameras.value))

    @property
    def points_drawn(self) -> int:
        return sum(n for _, n in self.clouds)

    def show_cameras(self, visible: bool) -> None:
        """Show or hide the frustums and the trajectory."""
        with self.lock:
            self.cameras_visible = bool(visible)
            for handle in self.frustums:
                handle.visible = self.cameras_visible
            if self.trajectory is not None:
                self.trajectory.visible = self.cameras_visible

    def update_stats(self, stats: LiveStats) -> None:
        self.panel.content = stats.markdown()

    def _first_view(self, xyz: np.ndarray, world: np.ndarray) -> None:
        """Set the scale, the up direction and the camera from the first drawable frame."""
        centre, rot = world[:, 3], world[:, :3]
        if len(xyz):
            lo, hi = np.percentile(xyz, [5, 95], axis=0)
            look, size = (lo + hi) / 2, max(float(np.linalg.norm(hi - lo)), 1e-6)
        else:
            look, size = centre + rot[:, 2], 1.0
        self.scale, self.point_size = size, 0.003 * size
        up, forward = -rot[:, 1], rot[:, 2]  # OpenCV cameras: y points down
        self.server.scene.set_up_direction(up)
        position = centre - VIEW_BACK * size * forward + VIEW_UP * size * up  # behind and above the first camera
        initial = self.server.initial_camera
        initial.position, initial.look_at, initial.up = position, look, up
        for client in self.server.get_clients().values():  # browsers already open look at it too
            client.camera.position, client.camera.look_at, client.camera.up_direction = position, look, up
        slider = self.server.gui.add_slider("point size", min=0.1 * self.point_size, max=5 * self.point_size,
                                            step=0.1 * self.point_size, initial_value=self.point_size)

        @slider.on_update
        def _(_event) -> None:
            for handle, _n in self.clouds:
                handle.point_size = slider.value
        self.size_slider = slider

    def add_frame(self, index: int, depth: np.ndarray, conf: np.ndarray, pose: np.ndarray, rgb: np.ndarray) -> int:
        """Draw frame `index`: depth [H, W, 1], depth_conf [H, W], camera_pose [9], rgb [H, W, 3] uint8
        (host arrays). Returns the points added (0, and no frustum, for a camera that is not finite)."""
        h, w = rgb.shape[:2]
        extr, intr = (np.asarray(a, np.float64)[0] for a in pose_encoding_to_extri_intri(np.asarray(pose)[None], (h, w)))
        focal = intr[1, 1]
        if not (np.isfinite(extr).all() and np.isfinite(focal) and focal > 0):
            log.debug("frame %d: no finite camera, not drawn", index)
            return 0
        xyz, colours = frame_points(np.asarray(depth), np.asarray(conf), rgb, extr, intr, self.conf_percentile,
                                    self.points_per_frame, seed=index)
        world = invert_extrinsics(extr)
        with self.lock:
            if self.point_size is None:
                self._first_view(xyz, world)
            scene = self.server.scene
            cloud = scene.add_point_cloud(f"/points/frame_{index:06d}", xyz, colours, point_size=self.point_size,
                                          point_shading="flat", precision="float32")
            self.clouds.append((cloud, len(xyz)))
            while self.points_drawn > self.max_points and len(self.clouds) > 1:
                old, _n = self.clouds.popleft()
                old.remove()
            small = Image.fromarray(rgb).resize((FRUSTUM_IMAGE_WIDTH, max(1, round(h * FRUSTUM_IMAGE_WIDTH / w))))
            frustum = scene.add_camera_frustum(
                f"/cameras/frame_{index:06d}", fov=float(2 * np.arctan2(h / 2, focal)), aspect=w / h,
                scale=0.05 * self.scale, thickness=2.0, thickness_units="screen", color=FRUSTUM_RGB,
                image=np.asarray(small),
                wxyz=np.roll(mat_to_quat(world[:, :3]), 1), position=world[:, 3], visible=self.cameras_visible)
            self.frustums.append(frustum)
            if len(self.frustums) > FRUSTUM_IMAGES:
                self.frustums[-FRUSTUM_IMAGES - 1].image = None
            self.centres.append(world[:, 3].astype(np.float32))
            if len(self.centres) > 1:
                segments = np.stack([self.centres[:-1], self.centres[1:]], 1)
                self.trajectory = scene.add_line_segments("/trajectory", segments, TRAJECTORY_RGB, thickness=4.0,
                                                          thickness_units="screen", visible=self.cameras_visible)
        return len(xyz)
