"""Procedural scenes with exact ground truth: a textured room with boxes and spheres, seen by a camera
that moves and turns inside it; rendered by vectorised analytic ray casting (numpy only).

Everything is a deterministic function of (SceneConfig, seed). Conventions are those of
`xsvggt_jax.data.base`: camera-from-world OpenCV extrinsics, intrinsics with integer pixel indices
(ray of pixel (u, v) = K^-1 [u, v, 1], cx = W / 2 as VGGT's pose encoding), z-depth in scene units.
Colours are quantised to k / 255 at render time, so `Sequence.image(i)` (uint8 / 255) reproduces
`ProceduralScene.images[i]` exactly. Shading is Lambertian (view independent), so a surface point
has the same colour in every frame.

Swap for the demo scene: `from xsvggt_jax.data.procedural import make_demo_scene as make_scene`
(same signature and output fields as `xsvggt_jax.demo.make_scene`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Dataset, DatasetInfo, Sequence

_UP = np.array([0.0, -1.0, 0.0])  # y points down (OpenCV), so "up" is -y
_LIGHT = np.array([0.35, -0.8, -0.45]) / np.linalg.norm([0.35, -0.8, -0.45])


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Size and content of one procedural sequence. focal: fx = fy = focal * width;
    sweep: turns of the camera orbit over the whole sequence (0.35 as the original demo)."""

    frames: int = 24
    height: int = 112
    width: int = 154
    focal: float = 0.9
    num_boxes: int = 3
    num_spheres: int = 2
    sweep: float = 0.35

    def __post_init__(self) -> None:
        if self.frames < 1 or self.height < 1 or self.width < 1:
            raise ValueError(f"frames, height and width must be positive, got {self}")
        if self.focal <= 0:
            raise ValueError(f"focal must be positive, got {self.focal}")


PRESETS: dict[str, SceneConfig] = {
    "demo": SceneConfig(frames=24, height=112, width=154),  # xsvggt demo (392x518 with --published)
    "tiny": SceneConfig(frames=4, height=28, width=42, num_boxes=1, num_spheres=1),
    "eval-small": SceneConfig(frames=16, height=196, width=266),
}


@dataclasses.dataclass(frozen=True)
class World:
    """Scene geometry and materials. half [3]: room |x|, |y|, |z| bounds (floor at y = +half[1]);
    boxes: centres [B, 3], half sizes [B, 3], yaw [B] (rotation about y); spheres: centres [P, 3],
    radii [P]; colours [N, 2, 3] two colours per surface (6 walls, then boxes, then spheres);
    freq [N] noise frequency; offset [N, 3] noise-space offset per surface."""

    half: np.ndarray
    box_centre: np.ndarray
    box_half: np.ndarray
    box_yaw: np.ndarray
    sphere_centre: np.ndarray
    sphere_radius: np.ndarray
    colours: np.ndarray
    freq: np.ndarray
    offset: np.ndarray

    def cast(self, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest hit of rays origin [3] + t dirs [..., 3] -> (t [...], surface id [...] int,
        unit normal [..., 3] facing the ray). With dirs = R^T K^-1 [u, v, 1], t is the z-depth."""
        with np.errstate(divide="ignore", invalid="ignore"):
            tw = np.where(dirs > 0, (self.half - origin) / dirs, (-self.half - origin) / dirs)
        tw = np.where(np.isfinite(tw) & (tw > 0), tw, np.inf)
        t = tw.min(-1)
        axis = tw.argmin(-1)
        positive = np.take_along_axis(dirs, axis[..., None], -1)[..., 0] > 0
        surf = 2 * axis + positive
        normal = -np.sign(np.take_along_axis(dirs, axis[..., None], -1)) * (np.arange(3) == axis[..., None])
        for b in range(len(self.box_yaw)):
            rot = _yaw(self.box_yaw[b])  # box-from-world rotation is rot.T
            o = rot.T @ (origin - self.box_centre[b])
            d = dirs @ rot  # rows: rot.T @ d
            with np.errstate(divide="ignore", invalid="ignore"):
                t1, t2 = (-self.box_half[b] - o) / d, (self.box_half[b] - o) / d
            near, far = np.minimum(t1, t2), np.maximum(t1, t2)
            t_in, t_out = near.max(-1), far.min(-1)
            hit = (t_in <= t_out) & (t_in > 0) & (t_in < t)
            face = near.argmax(-1)
            d_face = np.take_along_axis(d, face[..., None], -1)
            n_box = -np.sign(d_face) * (np.arange(3) == face[..., None])
            t = np.where(hit, t_in, t)
            surf = np.where(hit, 6 + b, surf)
            normal = np.where(hit[..., None], n_box @ rot.T, normal)
        for s in range(len(self.sphere_radius)):
            oc = origin - self.sphere_centre[s]
            a2 = (dirs * dirs).sum(-1)
            half_b = dirs @ oc
            disc = half_b * half_b - a2 * (oc @ oc - self.sphere_radius[s] ** 2)
            ts = (-half_b - np.sqrt(np.maximum(disc, 0.0))) / a2
            hit = (disc > 0) & (ts > 0) & (ts < t)
            t = np.where(hit, ts, t)
            surf = np.where(hit, 6 + len(self.box_yaw) + s, surf)
            p = origin + ts[..., None] * dirs
            normal = np.where(hit[..., None], (p - self.sphere_centre[s]) / self.sphere_radius[s], normal)
        return t, surf, normal

    def shade(self, points: np.ndarray, surf: np.ndarray, normal: np.ndarray) -> np.ndarray:
        """Colour of surface points [..., 3] with surface ids [...] and normals [..., 3] -> RGB in [0, 1]."""
        p = points * self.freq[surf][..., None] + self.offset[surf]
        n1 = _value_noise(p)
        n2 = _value_noise(2.7 * p + 17.0)
        check = (np.floor(points * self.freq[surf][..., None] * 0.5).sum(-1) % 2)[..., None]
        mix = np.clip(0.65 * n1 + 0.35 * n2, 0, 1)[..., None]
        c = self.colours[surf]
        albedo = (c[..., 0, :] * (1 - mix) + c[..., 1, :] * mix) * (0.8 + 0.2 * check)
        light = 0.55 + 0.45 * np.clip(normal @ _LIGHT, 0, 1)
        return np.clip(albedo * light[..., None], 0, 1)

    def surface_distance(self, points: np.ndarray) -> np.ndarray:
        """Distance of points [..., 3] to the nearest surface (walls, boxes, spheres) -> [...]; an
        independent check of rendered depth: unprojected depth lies on a surface (distance 0)."""
        dist = (self.half - np.abs(points)).min(-1)  # inside the room: distance to the nearest wall
        for b in range(len(self.box_yaw)):
            q = np.abs((points - self.box_centre[b]) @ _yaw(self.box_yaw[b])) - self.box_half[b]
            sdf = np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)
            dist = np.minimum(dist, np.abs(sdf))
        for s in range(len(self.sphere_radius)):
            sdf = np.linalg.norm(points - self.sphere_centre[s], axis=-1) - self.sphere_radius[s]
            dist = np.minimum(dist, np.abs(sdf))
        return dist


@dataclasses.dataclass(frozen=True)
class ProceduralScene:
    """A rendered sequence. images [S, 3, H, W] float32 in [0, 1] (multiples of 1/255); depth
    [S, H, W] float32 z-depth (every pixel valid); extrinsics [S, 3, 4] float32 camera-from-world
    (as `xsvggt_jax.demo.Scene`); intrinsics [S, 3, 3] float32; query_points [N, 2] (x, y) pixels of
    frame 0; world: the geometry, for exact checks."""

    images: np.ndarray
    depth: np.ndarray
    extrinsics: np.ndarray
    intrinsics: np.ndarray
    query_points: np.ndarray
    world: World

    def to_sequence(self, name: str = "procedural") -> Sequence:
        """This scene behind the common `Sequence` interface (extrinsics padded to [S, 4, 4] float64)."""
        s = self.images.shape[0]
        extr = np.tile(np.eye(4), (s, 1, 1))
        extr[:, :3] = self.extrinsics
        rgb = np.round(self.images.transpose(0, 2, 3, 1) * 255).astype(np.uint8)  # exact: k / 255
        return Sequence(name=name, frame_ids=tuple(f"{i:06d}" for i in range(s)),
                        load_rgb=rgb.__getitem__, load_depth=self.depth.__getitem__,
                        intrinsics=self.intrinsics.astype(np.float64), extrinsics=extr, info=PROCEDURAL_INFO,
                        pose_valid=np.ones(s, bool))


PROCEDURAL_INFO = DatasetInfo(name="procedural", depth_scale=None, max_depth=None,
                              tasks=("recon", "video-depth", "pose"),
                              sampling="every rendered frame (deterministic from the seed)")


def _yaw(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _hash01(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray) -> np.ndarray:
    """Integer lattice coordinates -> pseudo-random values in [0, 1] (a 32-bit integer hash)."""
    m = np.uint64(0xFFFFFFFF)
    h = (ix.astype(np.uint64) * np.uint64(0x8DA6B343) + iy.astype(np.uint64) * np.uint64(0xD8163841)
         + iz.astype(np.uint64) * np.uint64(0xCB1AB31F)) & m
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & m
    h ^= h >> np.uint64(12)
    h = (h * np.uint64(0x297A2D39)) & m
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFF)).astype(np.float64) / 65535.0


def _value_noise(p: np.ndarray) -> np.ndarray:
    """Smooth 3D value noise of points [..., 3] -> [...] in [0, 1] (trilinear, smoothstep weights)."""
    cell = np.floor(p)
    f = p - cell
    w = f * f * (3 - 2 * f)
    i = cell.astype(np.int64)
    out = np.zeros(p.shape[:-1])
    for dx in (0, 1):
        wx = w[..., 0] if dx else 1 - w[..., 0]
        for dy in (0, 1):
            wy = w[..., 1] if dy else 1 - w[..., 1]
            for dz in (0, 1):
                wz = w[..., 2] if dz else 1 - w[..., 2]
                out += wx * wy * wz * _hash01(i[..., 0] + dx, i[..., 1] + dy, i[..., 2] + dz)
    return out


def _random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n pairs of distinct saturated colours [n, 2, 3] in [0.1, 1]."""
    hue = rng.uniform(0, 1, (n, 2))
    hue[:, 1] = (hue[:, 0] + rng.uniform(0.25, 0.75, n)) % 1.0
    phases = np.array([0.0, 1 / 3, 2 / 3])
    rgb = 0.55 + 0.45 * np.cos(2 * np.pi * (hue[..., None] - phases))
    return np.clip(rgb * rng.uniform(0.6, 1.0, (n, 2, 1)), 0.1, 1.0)


def make_world(config: SceneConfig, seed: int) -> World:
    """Random room contents for `seed`: objects in the room's centre, clear of the camera orbit."""
    rng = np.random.default_rng(seed)
    half = np.array([rng.uniform(2.5, 4.0), rng.uniform(1.2, 1.6), rng.uniform(2.5, 4.0)])
    nb, ns = config.num_boxes, config.num_spheres
    inner = 0.3 * half[[0, 2]]
    box_half = rng.uniform(0.2, 0.5, (nb, 3))
    box_centre = np.stack([rng.uniform(-inner[0], inner[0], nb), half[1] - box_half[:, 1],
                           rng.uniform(-inner[1], inner[1], nb)], -1)
    radius = rng.uniform(0.2, 0.45, ns)
    floating = rng.uniform(0, 1, ns) < 0.5
    sphere_y = np.where(floating, rng.uniform(-0.3, 0.3, ns) * half[1], half[1] - radius)
    sphere_centre = np.stack([rng.uniform(-inner[0], inner[0], ns), sphere_y,
                              rng.uniform(-inner[1], inner[1], ns)], -1)
    n = 6 + nb + ns
    return World(half=half, box_centre=box_centre, box_half=box_half, box_yaw=rng.uniform(0, np.pi, nb),
                 sphere_centre=sphere_centre, sphere_radius=radius, colours=_random_colours(rng, n),
                 freq=rng.uniform(1.5, 4.0, n), offset=rng.uniform(0, 100, (n, 3)))


def camera_path(config: SceneConfig, world: World, seed: int) -> np.ndarray:
    """Smooth camera-from-world extrinsics [S, 3, 4] float64: an elliptic orbit at 0.65 of the room's
    half size with vertical bob, looking at a slowly drifting point near the objects, small roll."""
    rng = np.random.default_rng([seed, 1])
    phase, bob_phase, roll_phase = rng.uniform(0, 2 * np.pi, 3)
    s = config.frames
    a = phase + 2 * np.pi * config.sweep * np.arange(s) / max(s - 1, 1)
    hx, hy, hz = world.half
    extr = np.empty((s, 3, 4))
    for i, ai in enumerate(a):
        eye = np.array([0.65 * hx * np.sin(ai), 0.2 * hy * np.sin(2 * ai + bob_phase), -0.65 * hz * np.cos(ai)])
        target = np.array([0.25 * hx * np.sin(0.7 * ai), 0.35 * hy, 0.25 * hz * np.cos(1.3 * ai)])
        z = (target - eye) / np.linalg.norm(target - eye)
        x = np.cross(z, _UP)
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        roll = np.deg2rad(6.0) * np.sin(ai + roll_phase)
        c, sn = np.cos(roll), np.sin(roll)
        x, y = c * x + sn * y, -sn * x + c * y
        rot = np.stack([x, y, z])  # rows: camera axes in world coordinates
        extr[i] = np.concatenate([rot, -rot @ eye[:, None]], 1)
    return extr


def default_intrinsics(config: SceneConfig) -> np.ndarray:
    """[3, 3]: fx = fy = focal * width, principal point (W / 2, H / 2)."""
    f = config.focal * config.width
    return np.array([[f, 0, config.width / 2], [0, f, config.height / 2], [0, 0, 1.0]])


def render_frame(world: World, extrinsic: np.ndarray, intrinsic: np.ndarray, height: int,
                 width: int) -> tuple[np.ndarray, np.ndarray]:
    """One view: extrinsic [3, 4] camera-from-world, intrinsic [3, 3] -> (image [3, H, W] float32
    quantised to k / 255, z-depth [H, W] float32)."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    pix = np.stack([u, v, np.ones_like(u)], -1)
    rot, t = extrinsic[:, :3], extrinsic[:, 3]
    dirs = pix @ np.linalg.inv(intrinsic).T @ rot  # R^T K^-1 [u, v, 1]: unit z in the camera frame
    eye = -rot.T @ t
    depth, surf, normal = world.cast(eye, dirs)
    colour = world.shade(eye + depth[..., None] * dirs, surf, normal)
    image = np.round(colour * 255) / 255
    return image.transpose(2, 0, 1).astype(np.float32), depth.astype(np.float32)


def make_scene(config: SceneConfig = PRESETS["demo"], seed: int = 0, num_queries: int = 8,
               intrinsics: np.ndarray | None = None) -> ProceduralScene:
    """Render one sequence for (config, seed); `intrinsics` [3, 3] overrides `default_intrinsics`
    (e.g. to mimic a dataset's camera)."""
    world = make_world(config, seed)
    extr = camera_path(config, world, seed)
    k = default_intrinsics(config) if intrinsics is None else np.asarray(intrinsics, np.float64)
    frames = [render_frame(world, e, k, config.height, config.width) for e in extr]
    rng = np.random.default_rng([seed, 2])
    margin = min(8, config.width // 4, config.height // 4)
    qp = np.stack([rng.uniform(margin, config.width - margin, num_queries),
                   rng.uniform(margin, config.height - margin, num_queries)], -1)
    return ProceduralScene(images=np.stack([f[0] for f in frames]), depth=np.stack([f[1] for f in frames]),
                           extrinsics=extr.astype(np.float32),
                           intrinsics=np.repeat(k[None], config.frames, 0).astype(np.float32),
                           query_points=qp.astype(np.float32), world=world)


def make_demo_scene(frames: int = 24, height: int = 112, width: int = 154, num_queries: int = 8,
                    seed: int = 0) -> ProceduralScene:
    """Drop-in for `xsvggt_jax.demo.make_scene` (same arguments and output fields), from the "demo"
    preset with the given size."""
    config = dataclasses.replace(PRESETS["demo"], frames=frames, height=height, width=width)
    return make_scene(config, seed=seed, num_queries=num_queries)


def procedural_dataset(preset: str = "eval-small", num_sequences: int = 2, seed: int = 0,
                       config: SceneConfig | None = None) -> Dataset:
    """`num_sequences` scenes (seeds seed, seed + 1, ...) of a preset (or an explicit config) as a
    `Dataset`; each is rendered when this is called."""
    if config is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown procedural preset {preset!r}; choose from {sorted(PRESETS)}")
        config = PRESETS[preset]
    seqs = tuple(make_scene(config, seed=seed + i).to_sequence(f"{preset}-{seed + i:04d}")
                 for i in range(num_sequences))
    return Dataset(info=PROCEDURAL_INFO, sequences=seqs)
