"""Label maps (several lesion labels: oedema, enhancing tumour, necrosis...) as one multi-segment
DICOM SEG, and back.

:func:`write_dicom_seg_labels` writes a (Z, Y, X) label map predicted on a DICOM series folder as one
BINARY DICOM SEG with one segment per label, in label-value order (segment 1: the lowest value), each
segment labelled with the label's name and described as the one segment of
:func:`medanomaly.io.dicomseg.write_dicom_seg` (category "Morphologically abnormal structure", type
"Lesion", algorithm AUTOMATIC). Everything else is the binary writer's: the same slice matching, the
same header attributes copied from the source and no others (privacy: see :mod:`medanomaly.io.dicomseg`),
the same atomic write. Frames that hold none of a segment are left out (all kept for an empty map).

:func:`read_dicom_seg_labels` reads such a SEG back as a label map of segment numbers and the
segments' labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.core.errors import MedanomalyError
from medanomaly.io.dicomseg import read_segments, write_segments

_SEGMENT_LABEL = re.compile(r"^[^\\\x00-\x1f]{1,64}$")  # a DICOM LO: at most 64 characters, no backslash


def label_pairs(labels: Any) -> list[tuple[int, str]]:
    """(value, name) pairs sorted by value from a mapping ``{value: name}``, ``{"value", "name"}``
    records (a model file's ``labels``), objects with ``value`` and ``name`` (``config.labels.Label``)
    or (value, name) pairs; a MedanomalyError for a value not in 1..65535, a value given twice, or a
    name that cannot be a SegmentLabel (1 to 64 characters, no backslash or control character)."""
    items = list(labels.items()) if isinstance(labels, Mapping) else [_pair(r) for r in labels]
    pairs: dict[int, str] = {}
    for value, name in items:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 1 <= int(value) <= 65535 \
                or int(value) in pairs:
            raise MedanomalyError(f"label value {value!r} of the DICOM SEG is not an integer 1..65535 given once; "
                                  "0 is the background and is not listed")
        if not isinstance(name, str) or not _SEGMENT_LABEL.match(name):
            raise MedanomalyError(f"label name {name!r} cannot be a DICOM SegmentLabel: give 1 to 64 characters "
                                  "without backslash or control characters")
        pairs[int(value)] = name
    if not pairs:
        raise MedanomalyError("a DICOM SEG of a label map needs at least one label (value and name)")
    return sorted(pairs.items())


def _pair(record: Any) -> tuple[Any, Any]:
    if isinstance(record, Mapping):
        return record.get("value"), record.get("name")
    if hasattr(record, "value") and hasattr(record, "name"):
        return record.value, record.name
    if isinstance(record, (tuple, list)) and len(record) == 2:
        return record[0], record[1]
    raise MedanomalyError(f"{record!r} is not a label of a DICOM SEG; give (value, name) pairs")


def write_dicom_seg_labels(label_map: np.ndarray, series_dir: Path, out_path: Path, labels: Any, *,
                           algorithm: str = "medanomaly", version: str) -> Path:
    """Write ``label_map`` as a multi-segment BINARY DICOM SEG referencing the series in ``series_dir``;
    return ``out_path``.

    ``label_map``: (Z, Y, X) integer label values (0: background), in the slice order of
    ``read_image(series_dir)``. ``labels``: the labels (:func:`label_pairs`: ``{1: "edema"}``, a model
    file's ``labels`` list, ``config.labels.Label`` objects or (value, name) pairs); segment ``k`` is the
    ``k``-th label by value, labelled with its name. A value of the map that is not a label is an error
    (never silently background). Privacy, slice matching and atomic writing as :func:`write_dicom_seg`.
    """
    pairs = label_pairs(labels)
    arr = np.asarray(label_map)
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)) and not (
            np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
        raise MedanomalyError(f"a label map for a DICOM SEG holds integer label values, not {arr.dtype} values")
    values = np.asarray([v for v, _ in pairs])
    unknown = sorted(set(np.unique(arr).astype(np.int64).tolist()) - {0} - set(values.tolist()))
    if unknown:
        raise MedanomalyError(f"the label map holds value(s) {', '.join(map(str, unknown[:8]))} that are not among "
                              f"its labels ({', '.join(f'{v}={n}' for v, n in pairs)}); list every label")
    # label value -> segment number (1..n, in value order); 0 stays 0
    lookup = np.searchsorted(values, arr.astype(np.int64))
    segments = np.where(arr != 0, lookup + 1, 0)
    return write_segments(segments, [n for _, n in pairs], series_dir, out_path, algorithm=algorithm,
                          version=version)


def read_dicom_seg_labels(path: Path, series_dir: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """A DICOM SEG as ((Z, Y, X) uint16 label map of segment numbers, the segments' labels), in the
    slice order of ``read_image(series_dir)``: pixel value ``k`` belongs to the segment labelled
    ``labels[k - 1]`` (0: none). Where segments overlap, the higher segment number wins."""
    pixels, names = read_segments(path, series_dir)
    out = np.zeros(pixels.shape[:-1], np.uint16)
    for k in range(pixels.shape[-1]):
        out[pixels[..., k]] = k + 1
    return out, names
