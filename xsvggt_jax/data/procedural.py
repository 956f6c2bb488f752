"""Procedural scenes with exact ground truth: a textured room with boxes and spheres, seen by a camera
that moves and turns inside it; rendered by vectorised analytic ray casting (numpy only).

Everything is a deterministic function of (SceneConfig, seed). Conventions are those of
`xsvggt_jax.data.base`: camera-from-world OpenCV extrinsics, intrinsics with integer pixel indices
(ray of pixel (u, v) = K^-1 [u, v, 1], cx = W / 2 as VGGT's pose encoding), z-depth in scene units.
Colours are quantised to k / 255 at render time, so `Sequence.image(i)` (uint8 / 255) reproduces
`ProceduralScene.images[i]` exactly. Shading is Lambertian (view independent), so a surface point
has the same colour in every frame.

`make_demo_scene` is the scene of `xsvggt demo` (the "demo" preset at a given size).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xsvggt_jax.data.base import DataError, Dataset, DatasetInfo, Sequence

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
            raise DataError(f"frames, height and width must be positive, got {self}")
        if self.focal <= 0:
            raise DataError(f"focal must be positive, got {self.focal}")
        if self.num_boxes < 0 or self.num_spheres < 0:
            raise DataError(f"object counts must be >= 0, got {self.num_boxes} boxes, {self.num_spheres} spheres")


PRESETS: dict[str, SceneConfig] = {
    "demo": SceneConfig(frames=24, height=112, width=154),  # xsvggt demo's scene (rendered at the shipped model's size)
    "tiny": SceneConfig(frames=4, height=28, width=42, num_boxes=1, num_spheres=1),
    "eval-small": SceneConfig(frames=16, height=196, width=266),
}


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: identity equality
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
        unit normal [..., 3] facing the ray). With dirs = R^T K^-1 [u, v, 1], t is the z-depth.

        Works on the three direction components separately (reductions over a length-3 last axis are
        slow in numpy); planar hits record a facet id whose normal is looked up at the end."""
        d = [dirs[..., a] for a in range(3)]
        nb = len(self.box_yaw)
        # facets: 6 walls, then 6 faces per box; facet 2 a + s is the face whose outward normal in its
        # own frame is -(2 s - 1) e_a (the face a ray with direction sign s along axis a enters / hits)
        facet_normal = np.zeros((6 + 6 * nb, 3))
        for a in range(3):
            facet_normal[2 * a, a], facet_normal[2 * a + 1, a] = 1.0, -1.0
        t = np.full(dirs.shape[:-1], np.inf)
        facet = np.zeros(dirs.shape[:-1], np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            for a in range(3):  # the room, from inside: the wall ahead along each axis
                pos = d[a] > 0
                ta = np.where(pos, self.half[a] - origin[a], -self.half[a] - origin[a]) / d[a]
                closer = (ta > 0) & (ta < t)
                t = np.where(closer, ta, t)
                facet = np.where(closer, 2 * a + pos, facet)
            for b in range(nb):
                rot = _yaw(self.box_yaw[b])  # box-from-world rotation is rot.T
                o = rot.T @ (origin - self.box_centre[b])
                db = [rot[0, a] * d[0] + rot[1, a] * d[1] + rot[2, a] * d[2] for a in range(3)]
                near, far = [], []
                for a in range(3):
                    t1 = (-self.box_half[b, a] - o[a]) / db[a]
                    t2 = (self.box_half[b, a] - o[a]) / db[a]
                    near.append(np.minimum(t1, t2))
                    far.append(np.maximum(t1, t2))
                t_in = np.maximum(np.maximum(near[0], near[1]), near[2])
                t_out = np.minimum(np.minimum(far[0], far[1]), far[2])
                face = np.where((near[0] >= near[1]) & (near[0] >= near[2]), 0, np.where(near[1] >= near[2], 1, 2))
                d_face = np.where(face == 0, db[0], np.where(face == 1, db[1], db[2]))
                hit = (t_in <= t_out) & (t_in > 0) & (t_in < t)
                t = np.where(hit, t_in, t)
                facet = np.where(hit, 6 + 6 * b + 2 * face + (d_face > 0), facet)
                facet_normal[6 + 6 * b:12 + 6 * b] = facet_normal[:6] @ rot.T
        surf = np.where(facet < 6, facet, 6 + (facet - 6) // 6)
        normal = facet_normal[facet]
        a2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        for s in range(len(self.sphere_radius)):
            oc = origin - self.sphere_centre[s]
            half_b = d[0] * oc[0] + d[1] * oc[1] + d[2] * oc[2]
            disc = half_b * half_b - a2 * (oc @ oc - self.sphere_radius[s] ** 2)
            ts = (-half_b - np.sqrt(np.maximum(disc, 0.0))) / a2
            hit = (disc > 0) & (ts > 0) & (ts < t)
            t = np.where(hit, ts, t)
            surf = np.where(hit, 6 + nb + s, surf)
            normal = np.where(hit[..., None], (origin + ts[..., None] * dirs - self.sphere_centre[s])
                              / self.sphere_radius[s], normal)
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


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: identity equality
class ProceduralScene:
    """A rendered sequence. images [S, H, W, 3] float32 in [0, 1] (multiples of 1/255); depth
    [S, H, W] float32 z-depth (every pixel valid); extrinsics [S, 3, 4] float32 camera-from-world
    intrinsics [S, 3, 3] float32; query_points [N, 2] (x, y) pixels of
    frame 0; world: the geometry, for exact checks."""

    images: np.ndarray
    depth: np.ndarray
    extrinsics: np.ndarray
    intrinsics: np.ndarray
    query_points: np.ndarray
    world: World

    def to_sequence(self, name: str = "procedural") -> Sequence:
        """This scene behind the common `Sequence` interface (extrinsics padded to [S, 4, 4] float64)."""
        rgb = np.round(self.images * 255).astype(np.uint8)  # exact: k / 255
        return _as_sequence(name, self.extrinsics, self.intrinsics[0], rgb.__getitem__, self.depth.__getitem__)


def _as_sequence(name: str, extrinsics: np.ndarray, intrinsic: np.ndarray, load_rgb, load_depth) -> Sequence:
    """Cameras [S, 3, 4] and [3, 3] (float32 values, as ProceduralScene stores them) -> a Sequence."""
    s = len(extrinsics)
    extr = np.tile(np.eye(4), (s, 1, 1))
    extr[:, :3] = extrinsics.astype(np.float32)
    k = np.repeat(intrinsic.astype(np.float32)[None], s, 0).astype(np.float64)
    return Sequence(name=name, frame_ids=tuple(f"{i:06d}" for i in range(s)), load_rgb=load_rgb,
                    load_depth=load_depth, intrinsics=k, extrinsics=extr, info=PROCEDURAL_INFO,
                    pose_valid=np.ones(s, bool))


PROCEDURAL_INFO = DatasetInfo(name="procedural", depth_scale=None, max_depth=None,
                              tasks=("recon", "video-depth", "pose"),
                              sampling="every rendered frame (deterministic from the seed)")


def _yaw(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _mix32(h: np.ndarray) -> np.ndarray:
    """A 32-bit integer finaliser (xorshift-multiply): uint32 [...] -> values in [0, 1] float32."""
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x2C1B3C6D)
    h = h ^ (h >> np.uint32(12))
    h = h * np.uint32(0x297A2D39)
    h = h ^ (h >> np.uint32(15))
    return (h >> np.uint32(16)).astype(np.float32) / np.float32(65535.0)


_LATTICE = (np.uint32(0x8DA6B343), np.uint32(0xD8163841), np.uint32(0xCB1AB31F))


def _value_noise(p: np.ndarray) -> np.ndarray:
    """Smooth 3D value noise of points [..., 3] -> [...] float32 in [0, 1]: hashed integer lattice
    values, trilinear interpolation with smoothstep weights."""
    cell = np.floor(p)
    f = (p - cell).astype(np.float32)
    w = f * f * (3 - 2 * f)
    i = cell.astype(np.int64).astype(np.uint32)  # wraps modulo 2^32, as the hash does
    # per-axis lattice terms of the hash for the two corners along each axis (uint32 arithmetic wraps)
    terms = [(i[..., a] * _LATTICE[a], (i[..., a] + np.uint32(1)) * _LATTICE[a]) for a in range(3)]
    out = np.zeros(p.shape[:-1], np.float32)
    for dx in (0, 1):
        wx = w[..., 0] if dx else 1 - w[..., 0]
        for dy in (0, 1):
            wxy = wx * (w[..., 1] if dy else 1 - w[..., 1])
            hxy = terms[0][dx] + terms[1][dy]
            for dz in (0, 1):
                wz = w[..., 2] if dz else 1 - w[..., 2]
                out += wxy * wz * _mix32(hxy + terms[2][dz])
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
    """One view: extrinsic [3, 4] camera-from-world, intrinsic [3, 3] -> (image [H, W, 3] float32
    quantised to k / 255, z-depth [H, W] float32)."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    pix = np.stack([u, v, np.ones_like(u)], -1)
    rot, t = extrinsic[:, :3], extrinsic[:, 3]
    dirs = pix @ np.linalg.inv(intrinsic).T @ rot  # R^T K^-1 [u, v, 1]: unit z in the camera frame
    eye = -rot.T @ t
    depth, surf, normal = world.cast(eye, dirs)
    colour = world.shade(eye + depth[..., None] * dirs, surf, normal)
    image = np.round(colour * 255) / 255
    return image.astype(np.float32), depth.astype(np.float32)


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
    """The scene of `xsvggt demo`: the "demo" preset at the given size."""
    config = dataclasses.replace(PRESETS["demo"], frames=frames, height=height, width=width)
    return make_scene(config, seed=seed, num_queries=num_queries)


class _LazyFrames:
    """Renders frame i of a camera path on demand and keeps the last one, so that reading rgb(i)
    then depth(i) renders once; memory stays one frame for any sequence length."""

    def __init__(self, world: World, extrinsics: np.ndarray, intrinsics: np.ndarray, height: int, width: int):
        self._args = (world, extrinsics, intrinsics, height, width)
        self._index, self._rgb, self._depth = -1, None, None

    def _render(self, i: int) -> None:
        if i != self._index:
            world, extr, k, h, w = self._args
            image, self._depth = render_frame(world, extr[i], k, h, w)
            self._rgb = np.round(image * 255).astype(np.uint8)  # exact: k / 255
            self._index = i

    def rgb(self, i: int) -> np.ndarray:
        self._render(i)
        return self._rgb

    def depth(self, i: int) -> np.ndarray:
        self._render(i)
        return self._depth


def procedural_sequence(config: SceneConfig, seed: int, name: str | None = None) -> Sequence:
    """The scene `make_scene(config, seed)` as a lazy `Sequence`: cameras now, each frame rendered when
    it is read (for long streams and training clips)."""
    world = make_world(config, seed)
    extr = camera_path(config, world, seed)
    k = default_intrinsics(config)
    frames = _LazyFrames(world, extr, k, config.height, config.width)
    return _as_sequence(name or f"procedural-{seed:04d}", extr, k, frames.rgb, frames.depth)


def procedural_dataset(preset: str = "eval-small", num_sequences: int = 2, seed: int = 0,
                       config: SceneConfig | None = None) -> Dataset:
    """`num_sequences` lazy scenes (seeds seed, seed + 1, ...) of a preset (or an explicit config)."""
    if config is None:
        if preset not in PRESETS:
            raise DataError(f"unknown procedural preset {preset!r}; choose from {sorted(PRESETS)}")
        config = PRESETS[preset]
    seqs = tuple(procedural_sequence(config, seed + i, f"{preset}-{seed + i:04d}") for i in range(num_sequences))
    return Dataset(info=PROCEDURAL_INFO, sequences=seqs)
