"""Intensity normalisation and in-memory 2D datasets: slices of the discovered images
(:mod:`medanomaly.data.discover`) at one input size, with their masks."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medanomaly.config.options import NORMALIZATIONS
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.progress import track
from medanomaly.data.discover import Sample, read_sample
from medanomaly.io import Image, read_label_map, stem_of
from medanomaly.io.orient import Reorientation, canonical

log = logging.getLogger(__name__)

def normalize(array: np.ndarray, mode: str = "auto", kind: str = "raster", dtype: str | None = None,
              names: Sequence[str] = ()) -> np.ndarray:
    """Intensities to about [0, 1], per channel. array (C, *S) float32 -> new float32 array.

    ``auto``: 8-bit rasters (``dtype`` "uint8", the stored type; RGB too) / 255 (keeps the volume-level
    scaling of exported slices); otherwise each channel by its modality, as nnU-Net does: a CT channel
    (its name in ``names`` says CT, or ``kind`` dicom with values below -500 HU) as ``ct``, any other
    (MR...) as ``percentile``.
    ``percentile``: 0.5th..99.5th percentile of each channel of the image (a whole volume for volumes) to 0..1.
    ``ct``: window -1000..1000 HU to 0..1. ``none``: unchanged.
    """
    if mode not in NORMALIZATIONS:
        raise MedanomalyError(f"unknown normalization {mode!r}; valid: {', '.join(NORMALIZATIONS)}")
    a = array.astype(np.float32, copy=True)
    modes = [mode] * a.shape[0]
    if mode == "auto":
        eight_bit = dtype == "uint8" if dtype else bool(a.min() >= 0 and a.max() <= 255 and np.all(a == np.round(a)))
        if kind == "raster" and eight_bit:
            return a / 255.0
        modes = [channel_mode(a[c], kind, names[c] if c < len(names) else "") for c in range(a.shape[0])]
    for c, m in enumerate(modes):
        if m == "ct":
            a[c] = np.clip((a[c] + 1000.0) / 2000.0, 0.0, 1.0)
        elif m == "percentile":
            lo, hi = np.percentile(a[c], [0.5, 99.5])
            a[c] = np.clip((a[c] - lo) / (hi - lo), 0, 1) if hi > lo else 0.0
    return a


def channel_mode(channel: np.ndarray, kind: str, name: str = "") -> str:
    """The ``auto`` normalisation of one channel (*S) that is not an 8-bit raster: ``ct`` for a CT
    channel (named CT, e.g. "CT" or "ct_venous", or DICOM values below -500 HU), else ``percentile``."""
    if _CT_NAME.search(name) or (kind == "dicom" and channel.min() < -500):
        return "ct"
    return "percentile"


_CT_NAME = re.compile(r"(?<![a-z])ct(?![a-z])", re.IGNORECASE)  # "CT", "ct_venous"; not "contrast" or "direct"


def to_slices(image: Image | np.ndarray) -> np.ndarray:
    """(C, H, W) -> (1, C, H, W); (C, Z, Y, X) -> (Z, C, Y, X): a stack of 2D slices (a view)."""
    a = image.array if isinstance(image, Image) else image
    return a[None] if a.ndim == 3 else np.moveaxis(a, 1, 0)


def plane_spacing(image: Image) -> tuple[float, float]:
    """In-plane pixel spacing (Y, X) of an image's 2D slices (mm); (1, 1) where it is unknown."""
    g = image.geometry
    return (float(g.spacing[-2]), float(g.spacing[-1])) if g.spacing_known else (1.0, 1.0)


def square_padding(h: int, w: int, spacing: tuple[float, float] = (1.0, 1.0)) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixels of zero padding that make an h x w slice with pixel
    ``spacing`` (Y, X) square in physical extent (mm, or pixels when the spacing is unknown): the
    shorter side is padded, split evenly (the extra pixel at the bottom / right)."""
    sy, sx = spacing
    if h * sy < w * sx:
        extra = max(int(round(w * sx / sy)) - h, 0)
        return extra // 2, extra - extra // 2, 0, 0
    extra = max(int(round(h * sy / sx)) - w, 0)
    return 0, 0, extra // 2, extra - extra // 2


def fit(x: torch.Tensor, size: int, spacing: tuple[float, float] = (1.0, 1.0), mode: str = "bilinear") -> torch.Tensor:
    """(N, C, H, W) slices with pixel ``spacing`` (Y, X) -> (N, C, size, size) keeping the aspect
    ratio: zero-padded to a physical square (:func:`square_padding`), then resized (:func:`resize`), so
    nothing is squashed. A square slice of square pixels is only resized. :func:`unfit` inverts it."""
    top, bottom, left, right = square_padding(int(x.shape[-2]), int(x.shape[-1]), spacing)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom))
    return resize(x, (size, size), mode)


def unfit(y: torch.Tensor, shape: tuple[int, int], spacing: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """The inverse of :func:`fit`: (N, C, size, size) maps -> (N, C, *shape), resized (bilinear) to
    the padded square and cropped back to the slice's ``shape`` (H, W) exactly."""
    h, w = shape
    top, bottom, left, right = square_padding(h, w, spacing)
    up = F.interpolate(y, size=(h + top + bottom, w + left + right), mode="bilinear", align_corners=False)
    return up[..., top:top + h, left:left + w]


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize (N, C, H, W) to (N, C, *size); antialiased when shrinking images."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


@dataclass
class SliceSet:
    """2D training slices held in memory at the training size.

    images (N, C, S, S) float16 in about [0, 1]; masks (N, 1, S, S) uint8 or None; one case id
    and source path per slice; ``lesion`` (N,) bool: the slice's mask, at full resolution, is not
    empty (False where there is no mask); ``labelled`` (N,) bool: a mask was read for the slice.
    """

    images: torch.Tensor
    masks: torch.Tensor | None
    cases: list[str]
    sources: list[Path]
    lesion: torch.Tensor
    labelled: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, keep: torch.Tensor) -> SliceSet:
        """The slices where ``keep`` (N,) bool is True."""
        idx = torch.nonzero(keep).flatten().tolist()
        return SliceSet(self.images[idx], None if self.masks is None else self.masks[idx],
                        [self.cases[i] for i in idx], [self.sources[i] for i in idx],
                        self.lesion[idx], self.labelled[idx])


def concat_slices(*sets: SliceSet) -> SliceSet:
    """One SliceSet with the slices of ``sets`` in order; all must have the same channels and size,
    and either all have masks or none has."""
    if len({tuple(s.images.shape[1:]) for s in sets}) != 1 or len({s.masks is None for s in sets}) != 1:
        raise ValueError("concat_slices: the sets differ in channels, size or in having masks")
    masks = None if sets[0].masks is None else torch.cat([s.masks for s in sets])
    return SliceSet(torch.cat([s.images for s in sets]), masks,
                    [c for s in sets for c in s.cases], [p for s in sets for p in s.sources],
                    torch.cat([s.lesion for s in sets]), torch.cat([s.labelled for s in sets]))


def load_slices(samples: list[Sample], size: int, normalization: str = "auto", with_masks: bool | None = True,
                progress: bool = False, labels: Sequence[int] = ()) -> SliceSet:
    """Read, normalise and fit every image to size x size (:func:`fit`: padded to a physical square,
    never squashed); volumes are brought to the canonical orientation (:mod:`medanomaly.io.orient`)
    and cut into axial slices.

    ``with_masks``: True = every image needs a mask; None = masks read where present (an image
    without one gets an empty mask and ``labelled`` False); False = masks ignored.
    ``labels``: the label values of a multi-label run (two or more): masks are then label maps of
    class indices (0 background, ``i + 1`` for ``labels[i]``); () (binary): any value > 0 is lesion.
    Raises MedanomalyError naming the file when channel counts differ, a required mask is
    missing, or a mask does not match its image.
    """
    if not samples:
        raise MedanomalyError("no images to load: the selected split is empty")
    images, masks, cases, sources, lesion, labelled = [], [], [], [], [], []
    channels = None
    for s in track(samples, desc="loading", unit="img", enabled=progress):
        raw = read_sample(s)  # all its channel files (nnU-Net _0000, _0001...) as one image
        img, turn = canonical(raw)  # a volume in the one orientation: its slices are axial (io.orient)
        if channels is None:
            channels = img.channels
        elif img.channels != channels:
            raise MedanomalyError(
                f"{s.image} has {img.channels} channels but {samples[0].image} has {channels}; "
                "all images of a data set must have the same channels (convert them, or split the folder)"
            )
        x = torch.from_numpy(np.ascontiguousarray(to_slices(_normalized(img, normalization, s.channel_names))))
        spacing = plane_spacing(img)
        images.append(fit(x, size, spacing).half())
        n = x.shape[0]
        if with_masks and s.mask is None:
            raise MedanomalyError(f"no mask found for {s.image}; name it like {stem_of(s.image)}_mask.png or "
                                  "put images and masks in images/ and masks/ folders")
        if with_masks is not False:
            mt = _mask_slices(s, raw, turn, (n, 1) + tuple(x.shape[-2:]), labels)
            lesion.append(mt.flatten(1).amax(1) > 0)
            labelled.append(torch.full((n,), s.mask is not None))
            masks.append(fit_mask(mt, size, spacing, len(labels)))
        cases += [s.case] * n
        sources += [s.image] * n
    n_all = sum(len(x) for x in images)
    return SliceSet(torch.cat(images), torch.cat(masks) if masks else None, cases, sources,
                    torch.cat(lesion) if lesion else torch.zeros(n_all, dtype=torch.bool),
                    torch.cat(labelled) if labelled else torch.zeros(n_all, dtype=torch.bool))


def fit_mask(mt: torch.Tensor, size: int, spacing: tuple[float, float], classes: int = 0) -> torch.Tensor:
    """Mask slices (n, 1, H, W) float -> (n, 1, size, size) uint8 as :func:`fit` moves the image: 0/1
    (``classes`` 0: binary), else class indices 1..classes, each class fitted on its own (> 0.5)."""
    if not classes:
        return (fit(mt, size, spacing) > 0.5).to(torch.uint8)
    out = torch.zeros((mt.shape[0], 1, size, size), dtype=torch.uint8)
    for k in range(1, classes + 1):
        out[fit((mt == k).float(), size, spacing) > 0.5] = k
    return out


def class_indices(m: np.ndarray, labels: Sequence[int], path: Path) -> np.ndarray:
    """A label map's values -> class indices (0 background, ``i + 1`` for ``labels[i]``); a value that
    no label names is a MedanomalyError naming the mask."""
    values = np.unique(m).astype(int)
    odd = sorted(set(values.tolist()) - {0, *labels})
    if odd:
        raise MedanomalyError(f"mask {path} holds the value {odd[0]}, which none of the labels "
                              f"({', '.join(map(str, labels))}) names; name it (--labels or DATA/dataset.json "
                              "'labels') or fix the mask")
    lut = np.zeros(max(int(values.max()), *labels) + 1, np.float32)
    lut[list(labels)] = np.arange(1, len(labels) + 1)
    return lut[m.astype(np.intp)]


def _note_label_values(m: np.ndarray, path: Path) -> None:
    """One INFO line per data set whose masks hold several label values while no labels are named."""
    if _NOTED or m.max() <= 1:
        return
    lesion = m[m != 0]
    if lesion.min() == lesion.max():  # one value (0/255 masks): nothing to split, and no sort per mask
        return
    _NOTED.add(path)
    shown = ", ".join(f"{v:g}" for v in np.unique(lesion)[:6])
    log.info("masks hold several label values (%s in %s); they are trained as one lesion label (any value > 0). To "
             "train the labels separately name them: --labels 1=NAME,2=NAME (or 'labels' in DATA/dataset.json)",
             shown, path)


#: the mask of the INFO line of :func:`_note_label_values` (said once per process)
_NOTED: set[Path] = set()


def _mask_slices(s: Sample, img: Image, turn: Reorientation, shape: tuple[int, ...],
                 labels: Sequence[int] = ()) -> torch.Tensor:
    """The sample's mask (on ``img``'s stored grid, brought to the canonical orientation by
    ``turn``) as float slices of ``shape`` (n, 1, H, W): 0/1, or class indices where ``labels`` (the
    values of several labels) are given; zeros when it has none."""
    if s.mask is None:
        return torch.zeros(shape)
    m = read_label_map(s.mask, like=img)
    if labels:
        m = class_indices(m, labels, s.mask)
    else:
        _note_label_values(m, s.mask)
        m = m != 0
    m = turn.apply(m) if m.ndim == 3 else m
    mt = torch.from_numpy(m[None].astype(np.float32))
    return mt[None] if m.ndim == 2 else mt.permute(1, 0, 2, 3)


def _normalized(img: Image, mode: str, names: Sequence[str] = ()) -> Image:
    return replace(img, array=normalize(img.array, mode, img.geometry.kind, img.geometry.meta.get("dtype"), names))
