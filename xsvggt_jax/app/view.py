"""Interactive 3D view of a reconstruction OUTDIR in the browser (viser).

`xsvggt view OUTDIR` reads what `xsvggt reconstruct` wrote and serves a scene with

- the point cloud: `points.ply` (image colours, already filtered at reconstruct's
  `--conf-percentile`), or, with `conf_percentile` given, the unprojected `depth` of
  `predictions.npz` thresholded at that percentile of `depth_conf` with a live slider (the
  outputs hold no images, so those points are coloured by the frame that saw them);
- one camera frustum per frame from `extrinsics` [S,3,4] (OpenCV camera-from-world) and
  `intrinsics` [S,3,3], coloured along the stream, and the trajectory of the camera centres;
- a frame slider that shows the stream up to a frame, and a point-size slider.

`build_scene` fills a `viser.ViserServer` and returns at once (testable); `serve` blocks until
Ctrl-C / SIGTERM. A directory that is not a complete xsvggt output raises `ViewError`, and so does a
`--host` this machine cannot listen on (`listen.listen_address`, checked before viser starts). Only
an explicit wildcard address (0.0.0.0, ::) listens on every interface, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xsvggt_jax.app.listen import HostError, listen_address
from xsvggt_jax.errors import InputError
from xsvggt_jax.geometry import invert_extrinsics, mat_to_quat, unproject_depth

log = logging.getLogger(__name__)

DEFAULT_MAX_POINTS = 300_000
COLORMAP = "viridis"  # frame index -> colour of frustums, trajectory and (npz mode) points


class ViewError(InputError):
    """OUTDIR is missing, not an xsvggt output, or damaged."""


@dataclasses.dataclass(frozen=True)
class Cloud:
    """Points to draw: xyz [M,3] float32, rgb [M,3] uint8; for the npz cloud also per point
    conf [M] float32 and frame [M] int32 (None for points.ply)."""

    xyz: np.ndarray
    rgb: np.ndarray
    conf: np.ndarray | None = None
    frame: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Result:
    """An OUTDIR read back: extrinsics [S,3,4] camera-from-world, intrinsics [S,3,3], the frame
    size (H, W), the cloud (subsampled to at most `max_points`) and, for the npz cloud, the
    initial confidence percentile (0..100) to show it at."""

    extrinsics: np.ndarray
    intrinsics: np.ndarray
    hw: tuple[int, int]
    cloud: Cloud
    conf_percentile: float | None = None


@dataclasses.dataclass
class Scene:
    """What `build_scene` added (viser handles) and what is shown; `show` changes the latter."""

    result: Result
    points: object                 # viser PointCloudHandle
    frustums: list                 # one CameraFrustumHandle per drawable frame
    frustum_frames: list[int]      # the frame index of each frustum
    trajectory: object | None      # LineSegmentsHandle (None with fewer than 2 drawable frames)
    segments: np.ndarray           # [K-1,2,3] the trajectory's segments, K drawable frames
    segment_colours: np.ndarray    # [K-1,2,3] uint8
    conf_threshold: float | None   # depth_conf threshold in force (npz cloud only)
    last_frame: int = -1           # frames after it are hidden

    def show(self, last_frame: int, conf_percentile: float | None = None) -> None:
        """Show frames 0..last_frame (cameras, trajectory, npz points) and, for the npz cloud, the
        points at or above the `conf_percentile`-th percentile (0..100) of their confidence
        (None: keep the threshold in force)."""
        cloud = self.result.cloud
        self.last_frame = int(last_frame)
        if cloud.conf is not None:
            if conf_percentile is not None:
                self.conf_threshold = _threshold(cloud.conf, conf_percentile)
            keep = (cloud.conf >= self.conf_threshold) & (cloud.frame <= self.last_frame)
            self.points.points, self.points.colors = cloud.xyz[keep], cloud.rgb[keep]
        for handle, i in zip(self.frustums, self.frustum_frames):
            handle.visible = i <= self.last_frame
        if self.trajectory is not None:
            shown = sum(i <= self.last_frame for i in self.frustum_frames[1:])  # segments ending by then
            self.trajectory.visible = shown > 0
            if shown:
                self.trajectory.points = self.segments[:shown]
                self.trajectory.colors = self.segment_colours[:shown]


def _threshold(conf: np.ndarray, percentile: float) -> float:
    """The `percentile`-th percentile (0..100) of conf [M] (0 for no points)."""
    return float(np.percentile(conf, percentile)) if len(conf) else 0.0


# ---------------------------------------------------------------------------------------- reading


def _open_predictions(outdir: Path):
    path = outdir / "predictions.npz"
    if not outdir.is_dir():
        raise ViewError(f"{outdir}: not a directory")
    if not path.is_file():
        raise ViewError(f"{outdir}: no predictions.npz (not an xsvggt output directory)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ViewError(f"{path}: unreadable ({e})") from e


def _array(npz, key: str) -> np.ndarray:
    if key not in npz.files:
        raise ViewError(f"predictions.npz has no '{key}' (not an xsvggt output directory)")
    try:
        return np.asarray(npz[key])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ViewError(f"predictions.npz: '{key}' is damaged ({e})") from e


def _cameras(npz) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    extr = _array(npz, "extrinsics").astype(np.float64)
    intr = _array(npz, "intrinsics").astype(np.float64)
    if extr.ndim != 3 or extr.shape[1:] != (3, 4) or len(extr) == 0:
        raise ViewError(f"predictions.npz: extrinsics must be [S,3,4], got {extr.shape}")
    if intr.shape != (len(extr), 3, 3):
        raise ViewError(f"predictions.npz: intrinsics must be [{len(extr)},3,3], got {intr.shape}")
    # the principal point sits at (W/2, H/2) (see io/exports.py)
    cx, cy = intr[0, 0, 2], intr[0, 1, 2]
    if not (np.isfinite(cx) and np.isfinite(cy) and cx > 0 and cy > 0):
        raise ViewError(f"predictions.npz: intrinsics have no principal point ({cx}, {cy})")
    return extr, intr, (int(round(2 * cy)), int(round(2 * cx)))


def _subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `max_points` of `n` items (all of them when n <= max_points)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def frame_colours(num_frames: int) -> np.ndarray:
    """Colour of each frame along the stream [S,3] uint8 (the `COLORMAP`, first to last)."""
    from matplotlib import colormaps

    t = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    return np.rint(colormaps[COLORMAP](t)[:, :3] * 255).astype(np.uint8)


def _ply_cloud(outdir: Path, max_points: int) -> Cloud:
    from plyfile import PlyData, PlyParseError

    path = outdir / "points.ply"
    if not path.is_file():
        raise ViewError(f"{outdir}: no points.ply (not an xsvggt output directory)")
    try:
        vert = PlyData.read(str(path))["vertex"].data
        xyz = np.stack([vert[c] for c in "xyz"], -1).astype(np.float32)
        rgb = np.stack([vert[c] for c in ("red", "green", "blue")], -1).astype(np.uint8)
    except (PlyParseError, ValueError, KeyError, OSError, EOFError) as e:  # truncated, not a PLY, no x/red
        raise ViewError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    keep = np.isfinite(xyz).all(-1)
    idx = _subsample(int(keep.sum()), max_points)
    return Cloud(xyz[keep][idx], rgb[keep][idx])


def _depth_cloud(npz, extr: np.ndarray, intr: np.ndarray, max_points: int) -> Cloud:
    """Finite, confident (> 1e-5) depth points of the drawable frames, subsampled before they are
    unprojected (one frame at a time: memory stays that of the depth maps), with conf and frame."""
    depth, conf = _array(npz, "depth"), _array(npz, "depth_conf").astype(np.float32)
    if depth.ndim == 3:
        depth = depth[..., None]
    if depth.ndim != 4 or depth.shape[0] != len(extr) or conf.shape != depth.shape[:3]:
        raise ViewError(f"predictions.npz: depth {depth.shape} / depth_conf {conf.shape} do not match "
                        f"{len(extr)} cameras")
    drawable = _drawable(extr, intr)
    if not drawable.any():
        raise ViewError("no camera with a finite pose and field of view to unproject the depth with "
                        "(without --conf-percentile, points.ply is shown)")
    hw = conf.shape[1] * conf.shape[2]
    usable = np.isfinite(depth[..., 0]) & np.isfinite(conf) & (conf > 1e-5) & drawable[:, None, None]
    flat = np.flatnonzero(usable)
    flat = flat[_subsample(len(flat), max_points)]
    frame, pixel = np.divmod(flat, hw)
    xyz = np.empty((len(flat), 3), np.float32)
    for i in np.unique(frame):
        sel = frame == i
        xyz[sel] = unproject_depth(depth[i:i + 1], extr[i:i + 1], intr[i:i + 1]).reshape(hw, 3)[pixel[sel]]
    frame = frame.astype(np.int32)
    return Cloud(xyz, frame_colours(len(extr))[frame], conf.reshape(-1)[flat], frame)


def load_result(outdir: str | Path, max_points: int = DEFAULT_MAX_POINTS,
                conf_percentile: float | None = None) -> Result:
    """Read an OUTDIR written by `xsvggt reconstruct`. The cloud is points.ply, or with
    `conf_percentile` (0..100) the depth points of predictions.npz (all kept here; `build_scene`
    applies the threshold). Raises ViewError on a missing, foreign or damaged OUTDIR."""
    outdir = Path(outdir)
    if max_points < 1:
        raise ViewError(f"--max-points must be positive, got {max_points}")
    if conf_percentile is not None and not 0.0 <= conf_percentile <= 100.0:
        raise ViewError(f"--conf-percentile must be in [0, 100], got {conf_percentile}")
    with _open_predictions(outdir) as npz:
        extr, intr, hw = _cameras(npz)
        cloud = (_ply_cloud(outdir, max_points) if conf_percentile is None
                 else _depth_cloud(npz, extr, intr, max_points))
    if len(cloud.xyz) == 0 and not _drawable(extr, intr).any():
        raise ViewError(f"{outdir}: nothing to show (no finite point, no camera with a finite pose and field of view)")
    if len(cloud.xyz) == 0:
        log.warning("%s: no finite point to draw (%s): showing the cameras only", outdir,
                    "points.ply has none" if conf_percentile is None
                    else "the depth has no finite value with a positive confidence")
    log.info("%s: %d frames of %dx%d, %d points", outdir, len(extr), *hw, len(cloud.xyz))
    return Result(extr, intr, hw, cloud, conf_percentile)


# ---------------------------------------------------------------------------------------- the scene


def _extent(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Robust centre [3] and diameter of a point set [N,3] (5th-95th percentile box)."""
    lo, hi = np.percentile(points, [5, 95], axis=0)
    return (lo + hi) / 2, max(float(np.linalg.norm(hi - lo)), 1e-6)


def _drawable(extr: np.ndarray, intr: np.ndarray) -> np.ndarray:
    """Frames whose camera is finite with a positive focal length [S] bool."""
    focal = intr[:, 1, 1]
    return np.isfinite(extr).all((1, 2)) & np.isfinite(focal) & (focal > 0)


def build_scene(server, outdir: str | Path, max_points: int = DEFAULT_MAX_POINTS,
                conf_percentile: float | None = None) -> Scene:
    """Add OUTDIR's point cloud, camera frustums, trajectory and GUI to a `viser.ViserServer`.

    Returns immediately (the server serves in its own thread). Raises ViewError (before adding
    anything) when OUTDIR is not a readable xsvggt output."""
    return add_result(server, load_result(outdir, max_points, conf_percentile))


def add_result(server, result: Result) -> Scene:
    """`build_scene` on a `Result` already read."""
    extr, intr, (h, w) = result.extrinsics, result.intrinsics, result.hw
    ok = _drawable(extr, intr)
    if not ok.all():
        log.warning("%d of %d frames have a non-finite camera or field of view: not drawn",
                    int((~ok).sum()), len(extr))
    world = invert_extrinsics(extr[ok])  # [K,3,4] world-from-camera
    centres, rots = world[:, :, 3], world[:, :, :3]
    cloud = result.cloud
    centre, size = _extent(np.concatenate([cloud.xyz.reshape(-1, 3), centres]))

    if len(centres):  # OpenCV cameras: y points down, so "up" is the first camera's -y
        up = -rots[0][:, 1]
        server.scene.set_up_direction(up)
        forward = rots[0][:, 2]
        server.initial_camera.position = centres[0] - 0.6 * size * forward + 0.25 * size * up
        server.initial_camera.look_at = centre
        server.initial_camera.up = up
    else:  # a cloud without cameras: look at it from above one corner
        server.initial_camera.position = centre + size * np.array([0.7, 0.7, 0.5])
        server.initial_camera.look_at = centre

    point_size = 0.004 * size
    points = server.scene.add_point_cloud("/points", cloud.xyz, cloud.rgb, point_size=point_size,
                                          point_shading="flat", precision="float32")
    colours = frame_colours(len(extr))
    frames = [int(i) for i in np.flatnonzero(ok)]
    quats = mat_to_quat(rots)  # [K,4] xyzw
    frustums = []
    for k, i in enumerate(frames):
        fov = 2.0 * np.arctan2(h / 2.0, intr[i, 1, 1])
        frustums.append(server.scene.add_camera_frustum(
            f"/cameras/frame_{i:05d}", fov=float(fov), aspect=w / h, scale=0.05 * size,
            thickness=0.004 * size, color=tuple(int(c) for c in colours[i]),
            wxyz=np.roll(quats[k], 1), position=centres[k]))
    segments = np.stack([centres[:-1], centres[1:]], 1).astype(np.float32)  # [K-1,2,3]
    seg_colours = np.repeat(colours[frames[1:]][:, None], 2, 1)  # each segment in its end frame's colour
    trajectory = None
    if len(segments):
        trajectory = server.scene.add_line_segments("/trajectory", segments, seg_colours, thickness=0.003 * size)
    threshold = None if cloud.conf is None else _threshold(cloud.conf, result.conf_percentile)
    scene = Scene(result, points, frustums, frames, trajectory, segments, seg_colours, threshold)
    scene.show(len(extr) - 1)
    _add_gui(server, scene, point_size)
    return scene


def _add_gui(server, scene: Scene, point_size: float) -> None:
    """Point-size, last-frame and (npz cloud) confidence-percentile sliders."""
    num_frames = len(scene.result.extrinsics)
    size = server.gui.add_slider("point size", min=0.1 * point_size, max=5 * point_size,
                                 step=0.1 * point_size, initial_value=point_size)
    last = server.gui.add_slider("last frame", min=0, max=max(num_frames - 1, 1), step=1,
                                 initial_value=num_frames - 1, disabled=num_frames < 2)
    conf = None
    if scene.result.cloud.conf is not None:
        conf = server.gui.add_slider("confidence percentile", min=0.0, max=100.0, step=1.0,
                                     initial_value=float(scene.result.conf_percentile))

    @size.on_update
    def _(_event) -> None:
        scene.points.point_size = size.value

    def redraw(_event) -> None:
        scene.show(last.value, None if conf is None else conf.value)

    last.on_update(redraw)
    if conf is not None:
        conf.on_update(redraw)


# ---------------------------------------------------------------------------------------- serving


def serve(outdir: str | Path, host: str = "127.0.0.1", port: int = 8080,
          max_points: int = DEFAULT_MAX_POINTS, conf_percentile: float | None = None,
          announce: Callable[[str], None] = log.info) -> None:
    """Serve OUTDIR's scene at http://host:port until Ctrl-C or SIGTERM; `announce` gets the URL.

    OUTDIR is read and `host` checked (`listen.listen_address`; ViewError raised) before a port is bound. A
    busy port makes viser try the next ones: the URL announced is the one bound."""
    import viser

    if not 0 <= port <= 65535:
        raise ViewError(f"--port must be in 0..65535, got {port}")
    result = load_result(outdir, max_points, conf_percentile)
    try:
        url_host = listen_address(host)
    except HostError as e:
        raise ViewError(str(e)) from e
    server = viser.ViserServer(host=host, port=port, verbose=False)
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()  # where signal handlers may be set
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if in_main else None
    try:
        add_result(server, result)
        announce(f"serving {outdir} at http://{url_host}:{server.get_port()} (Ctrl-C to stop)")
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        server.stop()
