"""The sections of a training configuration, each a frozen dataclass saved with the model: the
network (:class:`UNetConfig`), augmentation (:class:`AugmentConfig`), the anomaly task
(:class:`AnomalyConfig`), post-processing (:class:`PostprocessParams`), and the lesion generator of
``synthesize`` (:class:`GanConfig`). Sizes are pixels (voxels in 3D) at the model input size unless a
field says otherwise."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from medanomaly.config.options import (
    ANOMALY_METHODS,
    DIMS,
    ENCODERS,
    PRECISIONS,
    RESIDUALS,
)
from medanomaly.core.errors import MedanomalyError


def check_nonneg_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


class ConfigError(MedanomalyError, ValueError):
    """An architecture that cannot be built: a ValueError for library callers, one clear message for users."""


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`; saved in the model directory."""

    in_channels: int = 1
    out_channels: int = 1
    dim: int = 2
    depth: int = 4
    width: int = 32
    max_width: int = 320
    norm: str = "batch"
    dropout: float = 0.0
    encoder: str = "plain"  # a key of ENCODERS; model.json files without it are "plain"

    def __post_init__(self) -> None:
        if self.dim not in DIMS:
            raise ConfigError(f"dim must be 2 or 3, got {self.dim}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"unknown encoder {self.encoder!r}; valid: {', '.join(ENCODERS)}")
        if self.encoder != "plain" and self.dim != 2:
            raise ConfigError(f"encoder {self.encoder!r} is 2D only (dim=2), got dim={self.dim}; "
                              "use encoder 'plain' for 3D networks")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (0..1) and ranges of each transform. ``enabled=False`` turns all off."""

    enabled: bool = True
    p_affine: float = 0.8
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.05  # fraction of the image size
    p_flip: float = 0.5  # left-right flip
    p_elastic: float = 0.3
    elastic_alpha: float = 0.03  # displacement, fraction of the image size
    elastic_grid: int = 5  # control points per side: lower = smoother deformation
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_contrast: float = 0.3
    contrast: tuple[float, float] = (0.75, 1.25)
    p_noise: float = 0.15
    noise_std: float = 0.03

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AnomalyConfig:
    """Settings of the anomaly task; sizes are pixels at the model input size."""

    method: str = "denoise"
    noise_res: int = 16  # the noise is drawn on a noise_res x noise_res grid, then upsampled
    noise_std: float = 0.2  # in units of the normalised intensity
    residual: str = "abs"  # |x - x_hat|; "positive": x above x_hat only (hyperintense lesions, e.g. FLAIR)
    erode: int = 3  # foreground erosion, so the body outline does not light up
    median_size: int = 5  # median filter of the residual map
    select_map_on_val: bool = True  # choose residual, erode and median_size by val AUPRC where val has lesions
    normal_only: bool = True  # False (pretrain): learn from every image, masks ignored
    image_quantile: float = 0.995  # image-level score: this quantile of the map inside the foreground
    target_fpr: float = 0.01  # label-free threshold: this fraction of normal foreground pixels above it
    synthetic_p: float = 0.5  # method synthetic: share of training images that get a pasted anomaly

    def __post_init__(self) -> None:
        if self.method not in ANOMALY_METHODS:
            raise MedanomalyError(f"unknown anomaly method {self.method!r}; valid: {', '.join(ANOMALY_METHODS)}")
        if self.residual not in RESIDUALS:
            raise MedanomalyError(f"unknown residual {self.residual!r}; valid: {', '.join(RESIDUALS)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PostprocessParams:
    """Settings of :func:`apply`; sizes in pixels (voxels in 3D)."""

    threshold: float = 0.5
    min_size: int = 0
    fill_holes: bool = False
    smooth_radius: int = 0
    foreground_only: bool = False

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or math.isnan(t):
            raise ValueError(f"threshold must be a number, got {t!r}")
        check_nonneg_int(self.min_size, "min_size")
        check_nonneg_int(self.smooth_radius, "smooth_radius")
        for name in ("fill_holes", "foreground_only"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        """Plain dict of the settings (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PostprocessParams:
        """Build from a dict such as :meth:`to_dict` gives; ValueError on unknown keys."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown postprocess keys {unknown}; valid keys are {valid}")
        return cls(**d)


@dataclass(frozen=True)
class GanConfig:
    """Everything that defines a GAN run of ``synthesize`` (:mod:`medanomaly.train.gan`); sizes in
    pixels at ``size``."""

    size: int = 128  # images are loaded, generated and written at size x size
    minutes: float = 20.0  # training time budget (<= 0: no time limit, max_steps only)
    max_steps: int = 100_000
    batch_size: int = 8
    lr: float = 2e-4  # Adam, both networks; constant, then linear decay over the second half
    betas: tuple[float, float] = (0.5, 0.999)
    l1_weight: float = 100.0
    l1_outside: float = 0.1  # L1 weight outside the erased region, relative to inside
    width: int = 16  # generator U-Net: channels of the first level
    depth: int = 4  # generator U-Net: down-sampling steps
    d_width: int = 32  # discriminator: channels of the first layer
    d_layers: int = 3  # discriminator: stride-2 layers (3: 70x70 patches)
    margin: int = 3  # the erased region is the mask dilated by this many pixels
    seed: int = 0
    precision: str = "auto"  # bf16 autocast where the CPU/GPU supports it (runtime.choose_precision)
    normalization: str = "auto"

    def __post_init__(self) -> None:
        least = {"size": 16, "batch_size": 1, "max_steps": 1, "width": 1, "depth": 1, "d_width": 1, "d_layers": 1,
                 "margin": 0}
        bad = [f"{k} is {getattr(self, k)} but must be >= {v}" for k, v in least.items() if getattr(self, k) < v]
        if bad or self.precision not in PRECISIONS:
            raise MedanomalyError("GAN settings: " + ("; ".join(bad) or f"unknown precision {self.precision!r}; "
                                                      f"valid: {', '.join(PRECISIONS)}"))

    def to_dict(self) -> dict:
        return asdict(self)
