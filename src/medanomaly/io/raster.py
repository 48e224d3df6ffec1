"""Raster reading: PNG, JPEG and BMP (Pillow) and TIFF (tifffile)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image as PILImage

from medanomaly.core.errors import MedanomalyError
from medanomaly.io.image import Geometry
from medanomaly.io.safety import _check_size

#: the package's logger, shared by its modules: records keep the name "medanomaly.io"
logger = logging.getLogger("medanomaly.io")


def _raster_geometry(meta: dict) -> Geometry:
    return Geometry("raster", (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False, meta=meta)


def _open_pillow(path: Path) -> PILImage.Image:
    """PILImage.open with Pillow's own decompression-bomb check replaced by MAX_PIXELS (checked
    by the caller from the header, with a message that says what to do)."""
    saved = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = None
    try:
        return PILImage.open(path)
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved


def _read_pillow(path: Path) -> tuple[np.ndarray, Geometry]:
    with _open_pillow(path) as im:
        _check_size(path, (len(im.getbands()), im.height, im.width))
        im.load()
        mode, info = im.mode, dict(im.info)
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in info else "RGB")
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            logger.info("%s: dropping the alpha channel of a %s image", path, mode)
            im = im.convert("RGB" if im.mode.startswith(("RGB", "P")) else "L")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        arr = np.asarray(im)
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    meta = {"mode": mode, "dtype": str(arr.dtype), "bits": 1 if mode == "1" else arr.itemsize * 8,
            "dpi": info.get("dpi")}
    return arr, _raster_geometry(meta)


def _check_pages(path: Path, tf: tifffile.TiffFile) -> None:
    """Refuse a multi-page TIFF whose pages differ in size or type: its pages are not the channels
    or slices of one image, and reading the first one alone would drop the others unnoticed."""
    kinds: dict[tuple[tuple[int, ...], str], int] = {}
    for page in tf.pages:
        key = (tuple(int(s) for s in page.shape), str(page.dtype))
        kinds[key] = kinds.get(key, 0) + 1
    if len(kinds) > 1:
        listed = "; ".join(f"{n} page{'s' if n > 1 else ''} {'x'.join(map(str, shape))} {dtype}"
                           for (shape, dtype), n in kinds.items())
        raise MedanomalyError(f"{path}: its {sum(kinds.values())} pages differ in size or type ({listed}), so they "
                              "are not one image; save each page as its own file (or keep only the image page)")


def _read_tiff(path: Path) -> tuple[np.ndarray, Geometry]:
    with tifffile.TiffFile(path) as tf:
        if not tf.series:
            raise MedanomalyError(f"{path}: the TIFF holds no image; re-export it")
        _check_pages(path, tf)
        series, n_pages, first = tf.series[0], len(tf.pages), tf.pages[0]
        if len(series.pages) < n_pages:  # agreeing pages that the writer put in several series: all of them
            _check_size(path, (n_pages, *first.shape))
            arr, axes = tf.asarray(key=range(n_pages)), "I" + first.axes
        else:
            _check_size(path, series.shape)
            arr, axes = series.asarray(), series.axes
        photometric = first.photometric
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and axes.endswith("S"):
        if arr.shape[-1] == 4 and photometric == tifffile.PHOTOMETRIC.RGB:
            logger.info("%s: dropping the alpha channel of an RGBA TIFF", path)
            arr = arr[..., :3]
        arr = np.moveaxis(arr, -1, 0)
    elif arr.ndim != 3:
        raise MedanomalyError(f"{path}: TIFF layout {axes} {arr.shape} is not supported; expected "
                              "a 2D image (H, W), (H, W, C) or a stack of channel pages (C, H, W)")
    meta = {"dtype": str(arr.dtype), "bits": arr.itemsize * 8, "axes": axes}
    return arr, _raster_geometry(meta)
