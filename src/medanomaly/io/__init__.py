"""Read medical images and masks, and write masks and anomaly scores next to them.

Every reader returns an :class:`Image` whose ``array`` is float32, channels first:
``(C, H, W)`` for 2D and ``(C, Z, Y, X)`` for 3D. Spatial geometry is kept in array axis order:
``spacing``, ``origin`` and ``direction`` are all reversed from the ITK/DICOM (x, y, z) order, so
``world_zyx = origin + D @ diag(spacing) @ index_zyx``. :func:`affine_from_geometry` gives the usual
4x4 RAS affine on (x, y, z) indices. Every reading problem is raised as :class:`MedanomalyError`.

Images larger than the size limit are refused from the header, before any pixel is decoded, so a
crafted or corrupt header cannot exhaust memory. The limit (:func:`medanomaly.io.safety.pixel_limit`)
is the smaller of :data:`medanomaly.io.safety.MAX_PIXELS` (2**28 = 268 million values, 1 GiB as
float32: e.g. a 16384 x 16384 grey slice, 9459 x 9459 RGB, or a 645^3 volume; voxels x channels) and
what the available memory (MemAvailable, or the room under a container's cgroup limit) allows at
160 bytes per value, the peak measured for predict.

DICOM values follow the standard: Modality LUT or rescale (also from enhanced files' functional
groups), MONOCHROME1 inverted so that high means bright, PALETTE COLOR expanded to RGB, Pixel
Padding Value pixels set to the darkest other value. A DICOM series folder must hold one series of
one slice geometry (orientation, pixel spacing, size); gaps in the slice spacing are reported.

The package's modules, one job each: :mod:`~medanomaly.io.image` (Geometry, Image, suffix and
geometry helpers), :mod:`~medanomaly.io.safety` (size limit, capture of the libraries' warnings
and output, error conversion), :mod:`~medanomaly.io.dicom` (files, geometry),
:mod:`~medanomaly.io.dicom_values` (pixel values), :mod:`~medanomaly.io.dicom_series` (series
folders), :mod:`~medanomaly.io.volume` (NIfTI, NRRD, MetaImage) and :mod:`~medanomaly.io.raster`
(Pillow, TIFF) readers,
:mod:`~medanomaly.io.read` (:func:`read_image`, :func:`read_channels`, :func:`read_mask`) and :mod:`~medanomaly.io.write`.
"""

from __future__ import annotations

from medanomaly.io.dicom import is_dicom_series_dir, series_files
from medanomaly.io.image import IMAGE_SUFFIXES, Geometry, Image, affine_from_geometry, full_suffix, stem_of
from medanomaly.io.read import read_channels, read_image, read_label_map, read_mask
from medanomaly.io.safety import MAX_PIXELS, library_notes
from medanomaly.io.write import mask_suffix, score_suffix, write_labels, write_mask, write_score

#: the former private names of :func:`series_files` and :func:`library_notes`
_series_files = series_files
_library_notes = library_notes

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "Geometry", "Image", "affine_from_geometry", "full_suffix",
           "is_dicom_series_dir", "library_notes", "mask_suffix", "read_channels", "read_image", "read_label_map",
           "read_mask", "score_suffix",
           "series_files", "stem_of", "write_labels", "write_mask", "write_score"]
