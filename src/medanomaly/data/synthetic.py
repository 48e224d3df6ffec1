"""Synthetic lesions pasted into lesion-free images (``train --synthetic-lesions P``).

A lesion is a smooth random shape (a coarse-noise-perturbed ellipse), filled with an intensity and a
texture drawn from the real lesions of the training split, and blended in with an opacity that
rises from 0 at its border to 1 a few pixels inside, so the boundary is not a give-away. The mask
is exactly the set of pixels the paste changed.

Shapes: images (N, C, H, W) float in about [0, 1], masks (N, 1, H, W) in {0, 1}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LesionStats:
    """Intensity of real lesions in the training images: mean and spread of lesion pixels, and the
    mean contrast to the tissue around them (all in normalised intensity units)."""

    mean: float
    std: float
    contrast: float

    @classmethod
    def from_slices(cls, images: torch.Tensor, masks: torch.Tensor) -> LesionStats:
        """Measured on (N, C, H, W) images and (N, 1, H, W) masks (the training split)."""
        x, m = images.float().mean(1, keepdim=True), masks.float() > 0.5
        if not m.any():
            return cls(mean=0.8, std=0.05, contrast=0.3)
        ring = (F.max_pool2d(m.float(), 9, 1, 4) > 0) & ~m  # tissue just outside the lesions
        inside = x[m]
        contrast = float(inside.mean() - x[ring].mean()) if ring.any() else 0.3
        return cls(mean=float(inside.mean()), std=float(inside.std()), contrast=contrast)


def random_shape(size: tuple[int, int], gen: torch.Generator, radius: tuple[float, float] = (0.04, 0.12)) -> torch.Tensor:
    """(H, W) bool: a blob around (0, 0) in normalised coordinates [-1, 1], radius a fraction of the side."""
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    r = radius[0] + (radius[1] - radius[0]) * torch.rand(2, generator=gen)
    angle = torch.rand(1, generator=gen) * torch.pi
    u = xx * torch.cos(angle) + yy * torch.sin(angle)
    v = -xx * torch.sin(angle) + yy * torch.cos(angle)
    wobble = F.interpolate(torch.randn(1, 1, 6, 6, generator=gen), size=size, mode="bicubic", align_corners=True)[0, 0]
    return (u / (2 * r[0])) ** 2 + (v / (2 * r[1])) ** 2 < 1.0 + 0.35 * wobble


def paste_lesion(image: torch.Tensor, stats: LesionStats, gen: torch.Generator,
                 ramp: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste one synthetic lesion into image (C, H, W); returns (new image, mask (1, H, W) float).

    The lesion is centred on a random foreground pixel (intensity above 0.1). The opacity is
    ``min(1, depth / ramp)`` where depth is the distance in pixels to the shape's border, so the
    changed pixels are exactly the mask.
    """
    c, h, w = image.shape
    grey = image.float().mean(0)
    shape = _placed_shape(grey > 0.1, gen)
    if shape is None:
        return image.clone(), torch.zeros(1, h, w)
    alpha = _ramp(shape, ramp)
    texture = F.interpolate(torch.randn(1, 1, h // 8 + 1, w // 8 + 1, generator=gen), size=(h, w), mode="bilinear",
                            align_corners=False)[0, 0]
    level = max(stats.mean, float(grey[shape].mean()) + stats.contrast) if shape.any() else stats.mean
    fill = level + stats.std * texture
    out = image.float() * (1 - alpha) + fill * alpha
    return out.to(image.dtype), shape.float()[None]


def _placed_shape(valid: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    """(H, W) bool: a random shape centred on a random pixel of ``valid`` (H, W) and cut to it;
    None where ``valid`` is empty."""
    h, w = valid.shape
    where = torch.nonzero(valid)
    if len(where) == 0:
        return None
    cy, cx = where[torch.randint(len(where), (1,), generator=gen)][0].tolist()
    shape = random_shape((h, w), gen)
    return torch.roll(shape, shifts=(cy - h // 2, cx - w // 2), dims=(0, 1)) & valid


def paste_anomaly(image: torch.Tensor, fg: torch.Tensor, donor: torch.Tensor, gen: torch.Generator,
                  ramp: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A self-supervised anomaly for the anomaly task (no real lesion is ever seen): a random
    shape inside the foreground ``fg`` (1, H, W) of ``image`` (C, H, W) is replaced, with a soft
    border, either by the same region of another normal image ``donor`` (C, H, W) (Foreign Patch
    Interpolation, Tan et al. 2020) or by a brighter/darker textured fill (a lesion-like intensity
    change, as DRAEM's texture anomalies). Returns (new image, mask (1, H, W) float); pixels outside
    the mask are unchanged.
    """
    c, h, w = image.shape
    shape = _placed_shape(fg[0] > 0.5, gen)
    if shape is None:
        return image.clone(), torch.zeros(1, h, w)
    u = torch.rand(4, generator=gen)
    alpha = _ramp(shape, ramp) * (0.5 + 0.5 * u[0])  # peak opacity 0.5..1: faint anomalies too
    if u[1] < 0.5:  # foreign patch: anatomy of another slice where it does not belong
        fill = donor.float()
    else:  # intensity change of 0.15..0.6 (normalised units), up or down, with a coarse texture
        texture = F.interpolate(torch.randn(1, 1, h // 8 + 1, w // 8 + 1, generator=gen), size=(h, w),
                                mode="bilinear", align_corners=False)[0]
        level = float(image.float().mean(0)[shape].mean()) + (0.15 + 0.45 * float(u[2])) * (1 if u[3] < 0.7 else -1)
        fill = level + 0.08 * texture
    out = image.float() * (1 - alpha) + fill * alpha
    out = torch.where(shape[None], out, image.float())  # outside the mask exactly as before
    return out.to(image.dtype), shape.float()[None]


def add_synthetic_anomalies(images: torch.Tensor, fg: torch.Tensor, p: float,
                            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``p`` per sample, :func:`paste_anomaly` (donor: another sample of the batch).

    images (N, C, H, W), fg (N, 1, H, W) foreground -> (images, anomaly masks (N, 1, H, W)); new tensors.
    """
    out, masks = images.clone(), torch.zeros(images.shape[0], 1, *images.shape[2:])
    n = images.shape[0]
    for i in range(n):
        if float(torch.rand(1, generator=gen)) >= p:
            continue
        donor = images[(i + 1 + int(torch.randint(max(1, n - 1), (1,), generator=gen))) % n]
        out[i], masks[i] = paste_anomaly(images[i], fg[i], donor, gen)
    return out, masks


def _ramp(shape: torch.Tensor, ramp: int) -> torch.Tensor:
    """Opacity (H, W): 0 outside ``shape``, k/ramp at k pixels inside its border, 1 from ``ramp`` on."""
    inside = shape.float()[None, None]
    depth = torch.zeros_like(inside)
    cur = inside
    for _ in range(ramp):
        depth = depth + cur
        cur = -F.max_pool2d(-cur, 3, 1, 1)  # erosion by one pixel
    return (depth / ramp)[0, 0].clamp(0, 1)


def add_synthetic_lesions(images: torch.Tensor, masks: torch.Tensor, p: float, stats: LesionStats,
                          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``p``, a lesion-free sample of the batch gets a synthetic lesion.

    images (N, C, H, W), masks (N, 1, H, W); returns new tensors (inputs are not modified).
    """
    images, masks = images.clone(), masks.clone()
    for i in range(images.shape[0]):
        if masks[i].any() or float(torch.rand(1, generator=gen)) >= p:
            continue
        images[i], masks[i] = paste_lesion(images[i], stats, gen)
    return images, masks
