"""Turn anomaly-score maps into clean lesion masks, and describe the lesions found.

Every function works on 2D (H, W) and 3D (Z, Y, X) arrays, returns a new array and never
modifies its inputs. Masks are bool; sizes and radii are in pixels (voxels in 3D).
Connected components use full connectivity (8 neighbours in 2D, 26 in 3D) unless stated, as in
:func:`medanomaly.metrics.functional.lesion_stats`.

:func:`apply` runs the whole chain set by :class:`PostprocessParams`, in this order:

1. threshold: ``scores > threshold``;
2. if ``foreground_only``: keep only pixels inside
   :func:`medanomaly.data.foreground.foreground_mask` of the image;
3. :func:`smooth_mask` (opening then closing, ``smooth_radius``), then the foreground
   restriction again (a closing can bridge concavities of the foreground);
4. :func:`fill_holes` if ``fill_holes``;
5. :func:`remove_small_components` (``min_size``).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from medanomaly.config.sections import PostprocessParams, check_nonneg_int
from medanomaly.data.foreground import _footprint, _spatial_mask, _structure, fill_holes, foreground_mask  # noqa: F401

logger = logging.getLogger(__name__)


def remove_small_components(
    mask: np.ndarray, min_size: int, connectivity: int | None = None
) -> np.ndarray:
    """Drop connected components smaller than ``min_size`` pixels (voxels); keep the rest.

    ``mask``: bool (H, W) or (Z, Y, X). ``min_size`` 0 or 1 returns a copy. ``connectivity``:
    1..ndim, None = full. Implemented with ``ndimage.label`` + ``bincount``.
    """
    m = _spatial_mask(mask)
    min_size = check_nonneg_int(min_size, "min_size")
    if min_size <= 1:
        return m.copy()
    labels, n = ndimage.label(m, structure=_structure(m.ndim, connectivity))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def smooth_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Smooth boundaries: binary opening then closing with a disk (2D) / ball (3D) of ``radius``.

    The opening removes spurs and specks thinner than the footprint, the closing fills narrow
    gaps. The array is edge-padded first so objects touching the border are not eroded there.
    ``radius`` 0 returns a copy.
    """
    m = _spatial_mask(mask)
    radius = check_nonneg_int(radius, "radius")
    if radius == 0:
        return m.copy()
    fp = _footprint(m.ndim, radius)
    pad = 4 * radius  # four operations, each reaching `radius` further from the padded edge
    padded = np.pad(m, pad, mode="edge")
    out = ndimage.binary_opening(padded, structure=fp)
    out = ndimage.binary_closing(out, structure=fp)
    return out[tuple(slice(pad, -pad) for _ in range(m.ndim))]


def _float_scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores)
    if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise ValueError(f"scores must be a real numeric array, got dtype {s.dtype}")
    floating = np.issubdtype(s.dtype, np.floating)
    return s.astype(np.result_type(s.dtype, np.float32) if floating else np.float64, copy=True)


def smooth_scores(scores: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a score map (``ndimage.gaussian_filter``, reflect at borders).

    ``sigma``: standard deviation in pixels (same on every axis); 0 returns a float copy.
    Output is floating point (float32/float64 kept, integers become float64).
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    s = _float_scores(scores)
    if sigma == 0:
        return s
    return ndimage.gaussian_filter(s, sigma=float(sigma))


def median_filter_scores(scores: np.ndarray, size: int) -> np.ndarray:
    """Median filter of a score map with a cubic window of ``size`` pixels per axis.

    ``size`` 0 or 1 returns a float copy. Output dtype as in :func:`smooth_scores`.
    """
    size = check_nonneg_int(size, "size")
    s = _float_scores(scores)
    if size <= 1:
        return s
    return ndimage.median_filter(s, size=size)


def _image_foreground(
    image: np.ndarray | None, shape: tuple[int, ...], channel_axis: int | None
) -> np.ndarray:
    if image is None:
        raise ValueError("foreground_only=True needs the image: pass image=...")
    fg = foreground_mask(image, channel_axis=channel_axis)
    if fg.shape != shape:
        raise ValueError(
            f"image spatial shape {fg.shape} differs from scores shape {shape}"
            " (set channel_axis for a multi-channel image)"
        )
    return fg


def apply(
    scores: np.ndarray,
    params: PostprocessParams,
    image: np.ndarray | None = None,
    channel_axis: int | None = None,
) -> np.ndarray:
    """Score map (H, W) or (Z, Y, X) -> bool lesion mask, in the order of the module docstring.

    ``image`` (same spatial shape, channels on ``channel_axis`` if any) is needed only when
    ``params.foreground_only`` is set.
    """
    s = np.asarray(scores)
    if s.ndim not in (2, 3):
        raise ValueError(f"scores must be 2D or 3D, got shape {s.shape}")
    mask = s > params.threshold
    fg = _image_foreground(image, s.shape, channel_axis) if params.foreground_only else None
    if fg is not None:
        mask &= fg
    if params.smooth_radius > 0:
        mask = smooth_mask(mask, params.smooth_radius)
        if fg is not None:
            mask &= fg
    if params.fill_holes:
        mask = fill_holes(mask)
    return remove_small_components(mask, params.min_size)


def region_table(
    mask: np.ndarray, scores: np.ndarray, spacing: tuple[float, ...] | None = None
) -> list[dict]:
    """One dict per connected component (full connectivity) of ``mask``, largest first.

    ``scores``: same shape as ``mask``. ``spacing``: pixel size in mm per axis (array order), or
    None. Keys: ``label`` (id from ``scipy.ndimage.label`` with full connectivity), ``area_px``,
    ``area_mm`` (mm² in 2D, mm³ in 3D; None without spacing), ``centroid`` (pixels, array index
    order), ``bbox`` (``[min..., max...]``, max exclusive), ``max_score``, ``mean_score``.
    """
    m = _spatial_mask(mask)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != m.shape:
        raise ValueError(f"scores shape {s.shape} differs from mask shape {m.shape}")
    if spacing is not None and len(spacing) != m.ndim:
        raise ValueError(f"spacing needs {m.ndim} values (one per axis), got {spacing}")
    labels, n = ndimage.label(m, structure=_structure(m.ndim, None))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    centroids = ndimage.center_of_mass(m, labels, index)
    maxima = ndimage.maximum(s, labels, index)
    means = ndimage.mean(s, labels, index)
    voxel_mm = float(np.prod(spacing)) if spacing is not None else None
    rows = []
    for i, sl in enumerate(ndimage.find_objects(labels)):
        rows.append({
            "label": int(index[i]),
            "area_px": int(areas[i]),
            "area_mm": None if voxel_mm is None else float(areas[i]) * voxel_mm,
            "centroid": [float(c) for c in centroids[i]],
            "bbox": [int(x.start) for x in sl] + [int(x.stop) for x in sl],
            "max_score": float(maxima[i]),
            "mean_score": float(means[i]),
        })
    return sorted(rows, key=lambda r: -r["area_px"])
