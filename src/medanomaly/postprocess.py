"""Turn anomaly-score maps into clean lesion masks, and describe the lesions found.

Every function works on 2D (H, W) and 3D (Z, Y, X) arrays, returns a new array and never
modifies its inputs. Masks are bool; sizes and radii are in pixels (voxels in 3D).
Connected components use full connectivity (8 neighbours in 2D, 26 in 3D) unless stated, as in
:func:`medanomaly.metrics.lesion_stats`.

:func:`apply` runs the whole chain set by :class:`PostprocessParams`, in this order:

1. threshold: ``scores > threshold``;
2. if ``foreground_only``: keep only pixels inside :func:`foreground_mask` of the image;
3. :func:`smooth_mask` (opening then closing, ``smooth_radius``), then the foreground
   restriction again (a closing can bridge concavities of the foreground);
4. :func:`fill_holes` if ``fill_holes``;
5. :func:`remove_small_components` (``min_size``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import ball, disk

from medanomaly.metrics import as_bool_mask

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


def _check_nonneg_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def remove_small_components(
    mask: np.ndarray, min_size: int, connectivity: int | None = None
) -> np.ndarray:
    """Drop connected components smaller than ``min_size`` pixels (voxels); keep the rest.

    ``mask``: bool (H, W) or (Z, Y, X). ``min_size`` 0 or 1 returns a copy. ``connectivity``:
    1..ndim, None = full. Implemented with ``ndimage.label`` + ``bincount``.
    """
    m = _spatial_mask(mask)
    min_size = _check_nonneg_int(min_size, "min_size")
    if min_size <= 1:
        return m.copy()
    labels, n = ndimage.label(m, structure=_structure(m.ndim, connectivity))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


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


def smooth_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Smooth boundaries: binary opening then closing with a disk (2D) / ball (3D) of ``radius``.

    The opening removes spurs and specks thinner than the footprint, the closing fills narrow
    gaps. The array is edge-padded first so objects touching the border are not eroded there.
    ``radius`` 0 returns a copy.
    """
    m = _spatial_mask(mask)
    radius = _check_nonneg_int(radius, "radius")
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
    size = _check_nonneg_int(size, "size")
    s = _float_scores(scores)
    if size <= 1:
        return s
    return ndimage.median_filter(s, size=size)


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
    erode = _check_nonneg_int(erode, "erode")
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
        _check_nonneg_int(self.min_size, "min_size")
        _check_nonneg_int(self.smooth_radius, "smooth_radius")
        for name in ("fill_holes", "foreground_only"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        """Plain dict of the settings (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PostprocessParams:
        """Build from a dict such as :meth:`to_dict` gives; ValueError on unknown keys."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown postprocess keys {unknown}; valid keys are {valid}")
        return cls(**d)


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
