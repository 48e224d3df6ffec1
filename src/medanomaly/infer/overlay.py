"""Turn images, score maps and masks into RGB pictures for reports and quick looks.

Everything here works on numpy arrays and returns new arrays (inputs are never modified).
Colours: truth contour green ``(60, 255, 60)``, predicted contour red ``(255, 60, 60)``,
score as an ``inferno`` heat map whose opacity grows with the score, so low scores stay
transparent and the anatomy remains visible underneath.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medanomaly.core.atomic import atomic_path

logger = logging.getLogger(__name__)

TRUTH_RGB = (60, 255, 60)
PRED_RGB = (255, 60, 60)
HEAT_CMAP = "inferno"
BIG_SIDE = 400  # contours are thickened (dilated once) on images with a side larger than this


def _scale01(values: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0) -> np.ndarray:
    """Robustly rescale ``values`` (any shape) to [0, 1] with percentiles of its finite values."""
    arr = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.float32)
    lo, hi = np.percentile(arr[finite], [low_pct, high_pct])
    if hi <= lo:  # (nearly) constant image: fall back to the full range
        lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi <= lo:
        return np.where(finite, 0.5 if lo != 0 else 0.0, 0.0).astype(np.float32)
    out = (np.where(finite, arr, lo) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def to_display(image: np.ndarray) -> np.ndarray:
    """Convert an image to a displayable RGB float picture.

    Args:
        image: ``(H, W)`` or channels-first ``(C, H, W)``, any dtype and range (NaN allowed).
            1 channel is shown as grey, 3 channels as RGB, 2 or more than 3 channels as the
            first channel in grey.

    Returns:
        ``(H, W, 3)`` float32 in [0, 1], scaled per image between its 1st and 99th percentiles.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        grey = arr
    elif arr.ndim == 3:
        if arr.shape[0] == 3:
            return np.moveaxis(_scale01(arr), 0, -1).copy()
        grey = arr[0]
    else:
        raise ValueError(f"to_display expects (H, W) or (C, H, W), got shape {arr.shape}")
    scaled = _scale01(grey)
    return np.repeat(scaled[..., None], 3, axis=-1)


def _contour(mask: np.ndarray, dilate: int) -> np.ndarray:
    """Inner 1-px outline of a boolean ``(H, W)`` mask (``mask XOR erosion(mask)``), dilated
    ``dilate`` times (each adds 1 px on both sides)."""
    m = np.asarray(mask).astype(bool)
    edge = m ^ ndimage.binary_erosion(m, border_value=0)
    if dilate > 0 and edge.any():
        edge = ndimage.binary_dilation(edge, structure=np.ones((3, 3), bool), iterations=dilate)
    return edge


def _check_2d(name: str, arr: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """Return ``arr`` as an array after checking that it is ``(H, W)`` like the image."""
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape} like the image")
    return arr


def overlay_rgb(
    image: np.ndarray,
    score: np.ndarray | None = None,
    pred: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    alpha: float = 0.45,
    score_range: tuple[float, float] = (0.0, 1.0),
    contour_dilate: int | None = None,
) -> np.ndarray:
    """Draw the score heat map and the mask contours on top of the image.

    Args:
        image: ``(H, W)`` or ``(C, H, W)``, any range (see :func:`to_display`).
        score: ``(H, W)`` float score/probability, blended with opacity ``alpha * s`` where
            ``s`` is the score normalised to [0, 1] by ``score_range`` (NaN counts as 0).
        pred: ``(H, W)`` predicted mask, outlined in red.
        truth: ``(H, W)`` true mask, outlined in green (drawn last, so it wins on overlap).
        alpha: maximum opacity of the heat map.
        score_range: scores mapped to the colormap ends.
        contour_dilate: how many times the 1-px contours are dilated; None = once when a side is
            larger than 400 px, else never (use more when the picture is shown shrunk).

    Returns:
        ``(H, W, 3)`` uint8 RGB picture.
    """
    from matplotlib import colormaps  # on use: matplotlib costs 0.4 s to import (commands that draw nothing skip it)

    rgb = to_display(image)
    shape = rgb.shape[:2]
    score, pred, truth = (_check_2d(n, a, shape) for n, a in (("score", score), ("pred", pred), ("truth", truth)))
    if score is not None:
        lo, hi = float(score_range[0]), float(score_range[1])
        span = hi - lo if hi > lo else 1.0
        s = np.clip((np.nan_to_num(score.astype(np.float64), nan=lo) - lo) / span, 0.0, 1.0)
        heat = colormaps[HEAT_CMAP](s)[..., :3]
        a = (float(alpha) * s)[..., None]
        rgb = (1.0 - a) * rgb + a * heat
    out = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    if contour_dilate is None:
        contour_dilate = 1 if max(shape) > BIG_SIDE else 0
    for mask, colour in ((pred, PRED_RGB), (truth, TRUTH_RGB)):
        if mask is not None:
            out[_contour(mask, int(contour_dilate))] = colour
    return out


def save_png(rgb: np.ndarray, path: Path) -> Path:
    """Write an ``(H, W, 3)`` (or ``(H, W)``) uint8 picture as PNG, atomically.

    Parent folders are created; a temporary file beside ``path`` replaces it only when complete.
    Returns ``path`` as a :class:`~pathlib.Path`.
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8 pixels, got {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"save_png expects (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    logger.debug("wrote %s", path)
    return path


def best_slice(score: np.ndarray, pred: np.ndarray | None = None, truth: np.ndarray | None = None) -> int:
    """Pick the most informative slice of a volume.

    Args:
        score: ``(Z, Y, X)`` score volume.
        pred: optional ``(Z, Y, X)`` predicted mask.
        truth: optional ``(Z, Y, X)`` true mask.

    Returns:
        Index along Z of the slice with the largest truth area if the truth has any voxel, else
        the largest predicted area if the prediction has any, else the highest maximum score
        (ties: the first such slice).
    """
    score = np.asarray(score)
    if score.ndim != 3:
        raise ValueError(f"best_slice expects a (Z, Y, X) volume, got shape {score.shape}")
    for mask in (truth, pred):
        if mask is None:
            continue
        m = np.asarray(mask)
        if m.shape != score.shape:
            raise ValueError(f"mask shape {m.shape} differs from score shape {score.shape}")
        areas = m.astype(bool).reshape(m.shape[0], -1).sum(axis=1)
        if areas.any():
            return int(np.argmax(areas))
    peaks = np.nan_to_num(score.reshape(score.shape[0], -1).astype(np.float64), nan=-np.inf).max(axis=1)
    return int(np.argmax(peaks))
