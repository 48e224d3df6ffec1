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


def _read_tiff(path: Path) -> tuple[np.ndarray, Geometry]:
    with tifffile.TiffFile(path) as tf:
        if not tf.series:
            raise MedanomalyError(f"{path}: the TIFF holds no image; re-export it")
        series = tf.series[0]
        _check_size(path, series.shape)
        arr, axes, photometric = series.asarray(), series.axes, tf.pages[0].photometric
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
