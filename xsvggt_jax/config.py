"""Model configuration: frozen dataclasses with named presets.

`ModelConfig.published()` equals upstream `StreamVGGT()` defaults; `ModelConfig.from_spec` builds a
configuration from the reference `spec.json` format (used for the small test models).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

_PRECISIONS = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
               "highest": jax.lax.Precision.HIGHEST}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class DinoConfig:
    """DINOv2 ViT with registers used as the patch embedder (published: ViT-L/14 + 4 registers)."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class CameraHeadConfig:
    """Camera head: AdaLN-modulated transformer trunk refined `iterations` times."""

    trunk_depth: int = 4
    num_heads: int = 16
    mlp_ratio: float = 4.0
    iterations: int = 4


@dataclasses.dataclass(frozen=True)
class DPTConfig:
    """DPT heads (depth, point map) and the track head's feature extractor share these."""

    features: int = 256
    out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23)


@dataclasses.dataclass(frozen=True)
class TrackHeadConfig:
    """Track head: DPT feature extractor (stride 2) + iterative correlation tracker."""

    features: int = 128
    stride: int = 2
    corr_levels: int = 7
    corr_radius: int = 4
    hidden_size: int = 384
    depth: int = 6
    max_scale: float = 518.0
    iters: int = 4
    num_heads: int = 8
    num_virtual_tracks: int = 64


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Whole-network configuration.

    `img_size` only fixes the DINOv2 position-embedding grid (img_size // patch_size squared); any
    frame whose sides are multiples of `patch_size` is accepted at run time.
    `dtype` is the compute dtype; `precision` the matmul precision (parity needs float32+highest).
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    rope_freq: float = 100.0
    qk_norm: bool = True
    dino: DinoConfig = DinoConfig()
    camera: CameraHeadConfig = CameraHeadConfig()
    dpt: DPTConfig = DPTConfig()
    track: TrackHeadConfig = TrackHeadConfig()
    dtype: str = "float32"
    precision: str = "highest"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {self.precision!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError("2D RoPE needs a head dim divisible by 4")
        if max(self.dpt.intermediate_layer_idx) >= self.depth:
            raise ValueError(f"dpt.intermediate_layer_idx {self.dpt.intermediate_layer_idx} out of range "
                             f"for depth {self.depth}")
        if self.dino.embed_dim != self.embed_dim:
            raise ValueError("the aggregator consumes DINOv2 tokens directly: dino.embed_dim must equal embed_dim")

    # ----------------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_special_tokens(self) -> int:
        """Camera token + register tokens, placed before the patch tokens of every frame."""
        return 1 + self.num_register_tokens

    @property
    def pos_grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def jax_precision(self) -> jax.lax.Precision:
        return _PRECISIONS[self.precision]

    def tokens_per_frame(self, height: int, width: int) -> int:
        check_frame_size(self, height, width)
        return self.num_special_tokens + (height // self.patch_size) * (width // self.patch_size)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ----------------------------------------------------------------------------------------- presets
    @classmethod
    def published(cls) -> "ModelConfig":
        """Upstream `StreamVGGT()` defaults (the released checkpoint)."""
        return cls()

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """A small model with the published model's structure (head dim 64, every head), the size of
        the reference test model: for demos, benchmarks and tests with random weights."""
        return cls(img_size=70, embed_dim=128, depth=4, num_heads=2,
                   dino=DinoConfig(embed_dim=128, depth=2, num_heads=2),
                   camera=CameraHeadConfig(trunk_depth=2, num_heads=8),
                   dpt=DPTConfig(features=32, out_channels=(16, 32, 64, 64), intermediate_layer_idx=(0, 1, 2, 3)),
                   track=TrackHeadConfig(features=32, corr_levels=3, corr_radius=2, hidden_size=64, depth=2,
                                         max_scale=70.0, iters=2))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        presets = {"published": cls.published, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return presets[name]()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | str | Path, **overrides) -> "ModelConfig":
        """Build from the reference `spec.json` format (see ../shared/reference/README.md)."""
        if not isinstance(spec, Mapping):
            path = Path(spec)
            try:
                spec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read spec {path}: {e}") from e
        pe, cam = spec.get("patch_embed", {}), spec.get("camera_head", {})
        dpt, trk = spec.get("dpt", {}), spec.get("track_head", {})
        known = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                 "num_register_tokens", "patch_embed", "camera_head", "dpt", "track_head"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown spec keys: {unknown}")
        d = cls()
        embed_dim = spec.get("embed_dim", d.embed_dim)
        cfg = cls(
            img_size=spec.get("img_size", d.img_size),
            patch_size=spec.get("patch_size", d.patch_size),
            embed_dim=embed_dim,
            depth=spec.get("depth", d.depth),
            num_heads=spec.get("num_heads", d.num_heads),
            mlp_ratio=float(spec.get("mlp_ratio", d.mlp_ratio)),
            num_register_tokens=spec.get("num_register_tokens", d.num_register_tokens),
            dino=DinoConfig(embed_dim=pe.get("embed_dim", embed_dim), depth=pe.get("depth", d.dino.depth),
                            num_heads=pe.get("num_heads", d.dino.num_heads),
                            mlp_ratio=float(pe.get("mlp_ratio", d.dino.mlp_ratio))),
            camera=CameraHeadConfig(trunk_depth=cam.get("trunk_depth", d.camera.trunk_depth),
                                    num_heads=cam.get("num_heads", d.camera.num_heads)),
            dpt=DPTConfig(features=dpt.get("features", d.dpt.features),
                          out_channels=tuple(dpt.get("out_channels", d.dpt.out_channels)),
                          intermediate_layer_idx=tuple(dpt.get("intermediate_layer_idx",
                                                               d.dpt.intermediate_layer_idx))),
            track=TrackHeadConfig(**{k: trk[k] for k in trk}) if trk else d.track,
        )
        return cfg.replace(**overrides) if overrides else cfg

    def to_spec(self) -> dict:
        """Inverse of `from_spec` (round-trips through JSON)."""
        return {
            "img_size": self.img_size, "patch_size": self.patch_size, "embed_dim": self.embed_dim,
            "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
            "num_register_tokens": self.num_register_tokens,
            "patch_embed": {"embed_dim": self.dino.embed_dim, "depth": self.dino.depth,
                            "num_heads": self.dino.num_heads, "mlp_ratio": self.dino.mlp_ratio},
            "camera_head": {"trunk_depth": self.camera.trunk_depth, "num_heads": self.camera.num_heads},
            "dpt": {"features": self.dpt.features, "out_channels": list(self.dpt.out_channels),
                    "intermediate_layer_idx": list(self.dpt.intermediate_layer_idx)},
            "track_head": dataclasses.asdict(self.track),
        }


def check_frame_size(cfg: ModelConfig, height: int, width: int) -> None:
    """Frames must be at least one patch and have sides that are multiples of the patch size."""
    p = cfg.patch_size
    if height < p or width < p or height % p or width % p:
        raise ValueError(f"frame size {height}x{width} must be positive multiples of the patch size {p}")
