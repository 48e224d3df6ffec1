"""Batched, seeded data augmentation on tensors.

Everything runs on whole batches with ``torch`` ops (one ``grid_sample`` per batch), so on
this 2-core CPU augmentation costs a few percent of a training step and training never waits
on it (``bench/speed.py`` prints the measured cost). Geometry (rotation, scaling, flips,
translation, elastic deformation) is drawn once per sample and applied identically to image
and mask; intensity changes (gamma, contrast, brightness, Gaussian noise) touch the image only.

3D patches (N, C, D, H, W) get nnU-Net's default spatial augmentation (rotation about each axis,
isotropic scaling, elastic deformation, each drawn per sample with probability 0.2:
:data:`SPATIAL_3D`), then left-right flips and the intensity transforms; the mask follows the image
through the same grid, resampled nearest-neighbour.

Images are expected normalised to about [0, 1] (see :mod:`medanomaly.data.slices`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medanomaly.config.sections import AugmentConfig

#: 3D spatial augmentation, nnU-Net's defaults: per-sample probabilities, rotation range about each
#: axis (degrees), isotropic scale range; the elastic field uses the config's grid and amplitude
SPATIAL_3D = {"p_rotate": 0.2, "rotate_deg": 30.0, "p_scale": 0.2, "scale": (0.7, 1.4), "p_elastic": 0.2}


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _coin(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def _affine_theta(n: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(N, 2, 3) affine matrices mapping output to input coordinates (normalised, 2D)."""
    on = _coin(n, cfg.p_affine, gen)
    angle = torch.where(on, _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, gen), torch.zeros(n)) * math.pi / 180
    scale = torch.where(on, _uniform(n, *cfg.scale, gen), torch.ones(n))
    shift = torch.where(on[:, None], _uniform(2 * n, -cfg.translate, cfg.translate, gen).view(n, 2) * 2, torch.zeros(n, 2))
    flip = torch.where(_coin(n, cfg.p_flip, gen), -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, :, 2] = shift
    return theta


def _elastic_field(n: int, size: tuple[int, int], cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(N, H, W, 2) smooth displacement in normalised coordinates (zero where not drawn)."""
    coarse = torch.randn(n, 2, cfg.elastic_grid, cfg.elastic_grid, generator=gen) * cfg.elastic_alpha * 2
    coarse = coarse * _coin(n, cfg.p_elastic, gen).view(n, 1, 1, 1)
    field = F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)


def _rotation_3d(on: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(N, 3, 3) rotations (about the three axes, each angle uniform in +-rotate_deg) where ``on``
    (N,) bool, identity elsewhere, in (x, y, z) order."""
    n = len(on)
    deg = SPATIAL_3D["rotate_deg"]
    angles = _uniform(3 * n, -deg, deg, gen).view(n, 3) * math.pi / 180 * on[:, None]
    rot = torch.eye(3).repeat(n, 1, 1)
    for axis in range(3):
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3).repeat(n, 1, 1)
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        rot = rot @ r
    return rot


def _spatial_grid_3d(n: int, size: tuple[int, int, int], cfg: AugmentConfig,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D, H, W, 3) sampling grid (normalised) of a random rotation, scaling and elastic field
    per sample (:data:`SPATIAL_3D`), computed in voxel units so a non-cubic patch is not sheared,
    and (N,) bool: the samples that drew any of them."""
    rotate, scaled = _coin(n, SPATIAL_3D["p_rotate"], gen), _coin(n, SPATIAL_3D["p_scale"], gen)
    scale = torch.where(scaled, _uniform(n, *SPATIAL_3D["scale"], gen), torch.ones(n))
    half = torch.tensor([size[2], size[1], size[0]], dtype=torch.float32) / 2  # voxels per unit, (x, y, z)
    linear = torch.diag(1 / half) @ _rotation_3d(rotate, gen) @ torch.diag(half) / scale.view(n, 1, 1)
    theta = torch.cat([linear, torch.zeros(n, 3, 1)], dim=2)
    grid = F.affine_grid(theta, [n, 1, *size], align_corners=False)
    g = cfg.elastic_grid
    coarse = torch.randn(n, 3, g, g, g, generator=gen) * cfg.elastic_alpha * 2
    elastic = _coin(n, SPATIAL_3D["p_elastic"], gen)
    coarse = coarse * elastic.view(n, 1, 1, 1, 1)
    field = F.interpolate(coarse, size=size, mode="trilinear", align_corners=True).permute(0, 2, 3, 4, 1)
    return grid + field, rotate | scaled | elastic


def _augment_3d(image: torch.Tensor, mask: torch.Tensor | None, cfg: AugmentConfig,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """3D: spatial (:func:`_spatial_grid_3d`; the mask nearest-neighbour), left-right flip, intensity."""
    n, size = image.shape[0], tuple(int(s) for s in image.shape[2:])
    grid, moved = _spatial_grid_3d(n, size, cfg, gen)  # type: ignore[arg-type]
    if bool(moved.any()):  # the samples that drew no spatial transform keep their voxels exactly
        keep = ~moved.view(-1, 1, 1, 1, 1)
        image = torch.where(keep, image.float(), F.grid_sample(image.float(), grid, mode="bilinear",
                                                               padding_mode="zeros", align_corners=False))
        if mask is not None:
            mask = torch.where(keep, mask.float(), F.grid_sample(mask.float(), grid, mode="nearest",
                                                                 padding_mode="zeros", align_corners=False))
    flip = _coin(n, cfg.p_flip, gen)
    image = torch.where(flip.view(-1, 1, 1, 1, 1), image.flip(-1), image)
    if mask is not None:
        mask = torch.where(flip.view(-1, 1, 1, 1, 1), mask.flip(-1), mask)
    return _intensity(image, cfg, gen), mask


def _intensity(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    shape = (n,) + (1,) * (x.ndim - 1)
    gamma = torch.where(_coin(n, cfg.p_gamma, gen), _uniform(n, *cfg.gamma, gen), torch.ones(n)).view(shape)
    x = x.clamp_min(0).pow(gamma)
    contrast = torch.where(_coin(n, cfg.p_contrast, gen), _uniform(n, *cfg.contrast, gen), torch.ones(n)).view(shape)
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    x = (x - mean) * contrast + mean
    noise_on = _coin(n, cfg.p_noise, gen).view(shape).to(x.dtype)
    noise = torch.randn(x.shape, generator=gen) * cfg.noise_std * noise_on
    return x + noise


def augment_batch(
    image: torch.Tensor, mask: torch.Tensor | None, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a batch. image (N, C, H, W) float, mask (N, 1, H, W) float in {0, 1} or None.

    3D batches (N, C, D, H, W) get rotation, scaling and elastic deformation (nnU-Net's defaults,
    :data:`SPATIAL_3D`; the mask nearest-neighbour), flips along the last axis and the intensity
    transforms.
    Returns new tensors (inputs are not modified); the mask stays binary (bilinear resampling,
    then > 0.5). Draws come from ``gen`` only, so a seeded generator reproduces the batch.
    """
    if not cfg.enabled:
        return image, mask
    if image.ndim == 5:
        return _augment_3d(image, mask, cfg, gen)
    n, _, h, w = image.shape
    grid = F.affine_grid(_affine_theta(n, cfg, gen), [n, 1, h, w], align_corners=False)
    grid = grid + _elastic_field(n, (h, w), cfg, gen)
    image = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if mask is not None:
        mask = (F.grid_sample(mask.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    return _intensity(image, cfg, gen), mask
