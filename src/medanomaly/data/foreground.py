"""Body / brain foreground of an image (Otsu, largest components, holes filled, optional erosion):
the region the anomaly task learns and scores inside, the planner measures and the GAN paints into.
Masks are bool arrays (H, W) or (Z, Y, X); sizes and radii in pixels (voxels in 3D)."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import ball, disk

from medanomaly.config.sections import check_nonneg_int
from medanomaly.metrics.functional import as_bool_mask

logger = logging.getLogger(__name__)


def _spatial_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    m = as_bool_mask(mask, name)
    if m.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2D (H, W) or 3D (Z, Y, X), got shape {m.shape}")
    return m


def _structure(ndim: int, connectivity: int | None) -> np.ndarray:
    conn = ndim if connectivity is None else connectivity
    if not 1 <= conn <= ndim:
        raise ValueError(f"connectivity must be between 1 and {ndim}, got {connectivity}")
    return ndimage.generate_binary_structure(ndim, conn)


def _footprint(ndim: int, radius: int) -> np.ndarray:
    return (disk(radius) if ndim == 2 else ball(radius)).astype(bool)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes (background regions not connected to the array border).

    2D: ``ndimage.binary_fill_holes``. 3D: the union of a 3D fill and a slice-wise 2D fill along
    axis 0, so that a hole closed within an axial slice is filled even if it opens to the
    border through a neighbouring slice.
    """
    m = _spatial_mask(mask)
    filled = ndimage.binary_fill_holes(m)
    if m.ndim == 3:
        for z in range(m.shape[0]):
            filled[z] |= ndimage.binary_fill_holes(m[z])
    return filled


def _keep_large_components(mask: np.ndarray, keep_fraction: float) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=_structure(mask.ndim, None))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    keep = sizes >= keep_fraction * sizes.max()
    keep[0] = False
    return keep[labels]


def foreground_mask(
    image: np.ndarray,
    erode: int = 0,
    channel_axis: int | None = None,
    mode: str = "otsu",
    keep_fraction: float = 0.1,
) -> np.ndarray:
    """Body / brain foreground of an image, as a bool mask of its spatial shape.

    ``image``: (H, W) or (Z, Y, X), any real dtype; with ``channel_axis`` set, channels are
    averaged first. ``mode="otsu"``: pixels above the Otsu threshold, then the largest connected
    component plus any at least ``keep_fraction`` of its size (both hemispheres of a low slice),
    then :func:`fill_holes`, then erosion by a disk/ball of ``erode`` pixels (the array border
    does not count as an edge). Non-finite pixels are background; a constant image gives all
    False. ``mode="all"``: everything is foreground (dermoscopy), ``erode`` is ignored.
    """
    img = np.asarray(image, dtype=np.float64)
    if channel_axis is not None:
        img = img.mean(axis=channel_axis)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be 2D or 3D after channel averaging, got shape {img.shape}")
    erode = check_nonneg_int(erode, "erode")
    if mode == "all":
        return np.ones(img.shape, dtype=bool)
    if mode != "otsu":
        raise ValueError(f"mode must be 'otsu' or 'all', got {mode!r}")
    finite = np.isfinite(img)
    values = img[finite]
    if values.size == 0 or values.min() == values.max():
        logger.debug("constant or empty image: empty foreground")
        return np.zeros(img.shape, dtype=bool)
    fg = finite & (np.where(finite, img, values.min()) > threshold_otsu(values))
    fg = fill_holes(_keep_large_components(fg, keep_fraction))
    if erode > 0:
        fg = ndimage.binary_erosion(fg, structure=_footprint(fg.ndim, erode), border_value=1)
    return fg
