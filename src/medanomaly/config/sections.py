"""The sections of a training configuration, each a frozen dataclass saved with the model: the
network (:class:`UNetConfig`), augmentation (:class:`AugmentConfig`), the anomaly task
(:class:`AnomalyConfig`), post-processing (:class:`PostprocessParams`), and the lesion generator of
``synthesize`` (:class:`GanConfig`). Sizes are pixels (voxels in 3D) at the model input size unless a
field says otherwise. Each field declares its rule (type, range, choices) with
:func:`medanomaly.config.rules.setting`; ``__post_init__`` checks them all at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from medanomaly.config.options import (
    ANOMALY_METHODS,
    DIMS,
    ENCODERS,
    NORMALIZATIONS,
    NORMS,
    PRECISIONS,
    RESIDUALS,
)
from medanomaly.config.rules import ConfigError, check, setting

#: probabilities and fractions
UNIT = {"kind": "float", "ge": 0, "le": 1}
#: a seed: numpy takes 32 bits
SEED = {"ge": 0, "le": 2**32 - 1}


def check_nonneg_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`; saved in the model directory."""

    in_channels: int = setting(1, ge=1, le=1024)
    out_channels: int = setting(1, ge=1, le=1024)
    dim: int = setting(2, choices=DIMS)
    depth: int = setting(4, ge=1, le=10)  # down-sampling steps
    width: int = setting(32, ge=1, le=1024)  # channels of the first level
    max_width: int = setting(320, ge=1, le=8192)
    norm: str = setting("batch", choices=NORMS)
    dropout: float = setting(0.0, ge=0, lt=1)
    encoder: str = setting("plain", choices=ENCODERS)  # model.json files without it are "plain"

    def __post_init__(self) -> None:
        check(self)
        if self.encoder != "plain" and self.dim != 2:
            raise ConfigError(f"encoder {self.encoder!r} is 2D only (dim=2), got dim={self.dim}; "
                              "use encoder 'plain' for 3D networks")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (0..1) and ranges of each transform. ``enabled=False`` turns all off."""

    enabled: bool = setting(True)
    p_affine: float = setting(0.8, **UNIT)
    rotate_deg: float = setting(15.0, ge=0, le=180)  # rotation in [-rotate_deg, rotate_deg] degrees
    scale: tuple[float, float] = setting((0.85, 1.15), kind="float", length=2, ordered=True, gt=0, le=10)
    translate: float = setting(0.05, **UNIT)  # fraction of the image size
    p_flip: float = setting(0.5, **UNIT)  # left-right flip
    p_elastic: float = setting(0.3, **UNIT)
    elastic_alpha: float = setting(0.03, **UNIT)  # displacement, fraction of the image size
    elastic_grid: int = setting(5, ge=1, le=1024)  # control points per side: lower = smoother deformation
    p_gamma: float = setting(0.3, **UNIT)
    gamma: tuple[float, float] = setting((0.7, 1.5), kind="float", length=2, ordered=True, gt=0, le=100)
    p_contrast: float = setting(0.3, **UNIT)
    contrast: tuple[float, float] = setting((0.75, 1.25), kind="float", length=2, ordered=True, gt=0, le=100)
    p_noise: float = setting(0.15, **UNIT)
    noise_std: float = setting(0.03, ge=0, le=100)  # normalised intensity units

    def __post_init__(self) -> None:
        check(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AnomalyConfig:
    """Settings of the anomaly task; sizes are pixels at the model input size."""

    method: str = setting("denoise", choices=ANOMALY_METHODS)
    noise_res: int = setting(16, ge=1, le=4096)  # the noise is drawn on a noise_res x noise_res grid, then upsampled
    noise_std: float = setting(0.2, ge=0, le=100)  # in units of the normalised intensity
    # |x - x_hat|; "positive": x above x_hat only (hyperintense lesions, e.g. FLAIR)
    residual: str = setting("abs", choices=RESIDUALS)
    erode: int = setting(3, ge=0, le=4096)  # foreground erosion, so the body outline does not light up
    median_size: int = setting(5, ge=0, le=4096)  # median filter of the residual map (0 or 1: none)
    select_map_on_val: bool = setting(True)  # choose residual, erode and median_size by val AUPRC where val has lesions
    normal_only: bool = setting(True)  # False (pretrain): learn from every image, masks ignored
    image_quantile: float = setting(0.995, **UNIT)  # image-level score: this quantile of the map inside the foreground
    target_fpr: float = setting(0.01, gt=0, lt=1)  # label-free threshold: this fraction of normal foreground pixels above it
    synthetic_p: float = setting(0.5, **UNIT)  # method synthetic: share of training images that get a pasted anomaly

    def __post_init__(self) -> None:
        check(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PostprocessParams:
    """Settings of :func:`apply`; sizes in pixels (voxels in 3D)."""

    threshold: float = setting(0.5, finite=False, what="a number")  # +-inf: nothing / everything positive
    min_size: int = setting(0, ge=0)  # components smaller than this many pixels are dropped
    fill_holes: bool = setting(False)
    smooth_radius: int = setting(0, ge=0)
    foreground_only: bool = setting(False)

    def __post_init__(self) -> None:
        check(self)

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

    size: int = setting(128, ge=16, le=4096)  # images are loaded, generated and written at size x size
    minutes: float = setting(20.0, ge=0, le=1_000_000)  # training time budget (0: no time limit, max_steps only)
    max_steps: int = setting(100_000, ge=1, le=1_000_000_000)
    batch_size: int = setting(8, ge=1, le=4096)
    lr: float = setting(2e-4, gt=0, le=10)  # Adam, both networks; constant, then linear decay over the second half
    betas: tuple[float, float] = setting((0.5, 0.999), kind="float", length=2, ge=0, lt=1)  # Adam's
    l1_weight: float = setting(100.0, ge=0, le=1_000_000)
    l1_outside: float = setting(0.1, ge=0, le=1_000_000)  # L1 weight outside the erased region, relative to inside
    width: int = setting(16, ge=1, le=1024)  # generator U-Net: channels of the first level
    depth: int = setting(4, ge=1, le=10)  # generator U-Net: down-sampling steps
    d_width: int = setting(32, ge=1, le=1024)  # discriminator: channels of the first layer
    d_layers: int = setting(3, ge=1, le=10)  # discriminator: stride-2 layers (3: 70x70 patches)
    margin: int = setting(3, ge=0, le=4096)  # the erased region is the mask dilated by this many pixels
    seed: int = setting(0, **SEED)
    precision: str = setting("auto", choices=PRECISIONS)  # bf16 autocast where supported (runtime.choose_precision)
    normalization: str = setting("auto", choices=NORMALIZATIONS)

    def __post_init__(self) -> None:
        check(self, "GAN settings")

    def to_dict(self) -> dict:
        return asdict(self)
