"""Volumes for 3D training and inference: cases as volumes, resampling to a common spacing,
and the foreground-oversampled patch sampler.

A *volume case* is one 3D file (NIfTI, NRRD, MetaImage), one DICOM series folder, or the 2D
slices of one case that sit in one folder (an LGG patient folder ``<patient>/<patient>_<n>_flair.png``),
stacked in :func:`medanomaly.data.discover.discover`'s order (the slice number in the name) into
(C, Z, H, W). Stacked slices carry no spacing: their grid is 1 x 1 x 1 *voxel*, so a target
spacing for them is in voxels of the stored grid ((1, 2, 2) halves the in-plane size).

Spacing and shapes are in array axis order (Z, Y, X); spacing in mm (voxels for stacked
slices); patch sizes and sampler coordinates in voxels of the resampled grid. Images are
resampled trilinearly, masks trilinearly then thresholded at 0.5 (as nnU-Net's linear
resampling of segmentations), score maps trilinearly back to the original grid.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medanomaly.core.errors import MedanomalyError
from medanomaly.core.progress import track
from medanomaly.data.discover import Sample
from medanomaly.data.foreground import foreground_mask
from medanomaly.data.slices import normalize
from medanomaly.io import Geometry, Image, full_suffix, read_channels, read_image, read_mask
from medanomaly.io.orient import CANONICAL, PLANES, canonical, reorients

log = logging.getLogger(__name__)

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")  # 2D files, stacked per folder
PATCH_VOXELS = {"cpu": 2**18, "cuda": 2**21}  # default patch budget: 64^3 voxels on a CPU, 128^3 on a GPU
MAX_CENTRES = 10_000  # oversampling centres kept per volume (nnU-Net keeps 10 000 voxels per class)
GEOMETRY_VOLUMES = 16  # volumes read for the model file's geometry record (headers vary little in a data set)


@dataclass(frozen=True)
class VolumeCase:
    """One volume of a case: a 3D file or DICOM series (one path), or ordered 2D slices. Images of
    one file per channel (nnU-Net ``_0000``, ``_0001``...): ``channels`` holds each image's channel
    files (() for one file each) and ``channel_names`` their names (() if unnamed)."""

    case: str
    images: tuple[Path, ...]
    masks: tuple[Path | None, ...]
    channels: tuple[tuple[Path, ...], ...] = ()
    channel_names: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.images[0].parent.name if len(self.images) > 1 else self.images[0].name


def group_volumes(samples: Sequence[Sample]) -> list[VolumeCase]:
    """Volume cases of ``samples`` (as :func:`~medanomaly.data.discover.discover` orders them): the 2D
    files (:data:`SLICE_SUFFIXES`) of one case and folder become one stacked volume, in order;
    every other sample is a volume of its own."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        stack = s.image.is_file() and full_suffix(s.image) in SLICE_SUFFIXES
        groups.setdefault((s.case, s.image.parent) if stack else (s.case, s.image), []).append(s)
    return [VolumeCase(g[0].case, tuple(s.image for s in g), tuple(s.mask for s in g),
                       tuple(s.files for s in g) if any(s.channels for s in g) else (), g[0].channel_names)
            for g in groups.values()]


def stack_slices(slices: Sequence[Image]) -> Image:
    """2D images (C, H, W) of one size -> one (C, Z, H, W) Image on a 1-voxel grid (spacing unknown)."""
    first = slices[0]
    for im in slices[1:]:
        if im.array.shape != first.array.shape:
            raise MedanomalyError(f"{im.path} is {'x'.join(map(str, im.array.shape))} but {first.path} is "
                                  f"{'x'.join(map(str, first.array.shape))} (channels x H x W); the slices of one "
                                  "volume must share size and channels: resize them, or train in 2D (--dim 2)")
    g = first.geometry
    geometry = Geometry(kind=g.kind, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).ravel()), spacing_known=False,
                        meta={"dtype": g.meta.get("dtype"), "stacked_slices": len(slices)})
    return Image(np.stack([im.array for im in slices], axis=1), geometry, first.path.parent)


def read_volume(vc: VolumeCase) -> tuple[Image, list[Image] | None]:
    """(volume (C, Z, Y, X), its 2D slice Images or None for a 3D file). A lone 2D image is a 1-slice stack."""
    def read(i: int) -> Image:  # all channel files of image i, where it has several
        return read_channels(vc.channels[i], vc.channel_names) if vc.channels else read_image(vc.images[i])

    if len(vc.images) == 1:
        img = read(0)
        return (img, None) if img.ndim_spatial == 3 else (stack_slices([img]), [img])
    slices = [read(i) for i in range(len(vc.images))]
    bad = [im.path for im in slices if im.ndim_spatial != 2]
    if bad:
        raise MedanomalyError(f"{bad[0]} is a volume, not a 2D slice; keep volumes and slices in separate folders")
    return stack_slices(slices), slices


def read_volume_mask(vc: VolumeCase, image: Image, slices: list[Image] | None) -> np.ndarray:
    """The case's mask as bool (Z, Y, X) matching ``image``; all False where a slice has no mask."""
    if slices is None:
        m = vc.masks[0]
        return read_mask(m, like=image) if m is not None else np.zeros(image.spatial_shape, bool)
    return np.stack([read_mask(m, like=im) if m is not None else np.zeros(im.spatial_shape, bool)
                     for m, im in zip(vc.masks, slices)])


def volume_spacing(vc: VolumeCase) -> tuple[float, float, float]:
    """Voxel spacing of a volume case (Z, Y, X) in the canonical orientation (:mod:`medanomaly.io.orient`):
    its header's for a 3D file, 1 voxel for stacked slices."""
    if len(vc.images) > 1 or full_suffix(vc.images[0]) in SLICE_SUFFIXES[:6]:
        return (1.0, 1.0, 1.0)
    sp = canonical(read_image(vc.images[0]))[0].geometry.spacing
    return tuple(float(s) for s in sp) if len(sp) == 3 else (1.0, *map(float, sp))  # type: ignore[return-value]


def training_geometry(samples: Sequence[Sample], max_volumes: int = GEOMETRY_VOLUMES) -> dict:
    """The model file's ``geometry`` record of training data: the canonical orientation's axis codes,
    the median canonical spacing (mm, Z Y X) and the most common acquisition plane of up to
    ``max_volumes`` 3D volumes with a known spacing, spread over ``samples`` (both None for 2D data)."""
    cases = [vc for vc in group_volumes(samples)
             if len(vc.images) == 1 and full_suffix(vc.images[0]) not in SLICE_SUFFIXES]
    spacings, planes = [], []
    for vc in cases[::max(1, math.ceil(len(cases) / max_volumes))]:
        img = read_image(vc.images[0])
        if reorients(img.geometry, img.ndim_spatial):
            c, turn = canonical(img)
            spacings.append(c.geometry.spacing)
            planes.append(PLANES[turn.slice_axis])
    return {"orientation": list(CANONICAL), "median_spacing": list(median_spacing(spacings)) if spacings else None,
            "slice_plane": max(PLANES, key=planes.count) if planes else None}


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> tuple[int, ...]:
    """Voxels per axis at ``target`` spacing of a grid of ``shape`` voxels at ``spacing`` (same extent in mm)."""
    if target is None:
        return tuple(int(s) for s in shape)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample(array: np.ndarray | torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(C, *S) image or score map -> new float32 tensor (C, *shape), trilinear (bilinear in 2D),
    voxel centres aligned (``align_corners=False``); a copy when the shape is unchanged."""
    x = torch.as_tensor(np.asarray(array) if isinstance(array, np.ndarray) else array).float()
    if tuple(x.shape[1:]) == tuple(shape):
        return x.clone()
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(x[None], size=tuple(int(s) for s in shape), mode=mode, align_corners=False)[0]


def resample_mask(mask: np.ndarray | torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """bool (*S) mask -> bool tensor (*shape): linear interpolation of the mask, then >= 0.5."""
    m = torch.as_tensor(np.asarray(mask)).float()
    return resample(m[None], shape)[0] >= 0.5


def median_spacing(spacings: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """Per-axis median of the volumes' spacings (nnU-Net's default target spacing)."""
    return tuple(round(float(v), 4) for v in np.median(np.asarray(spacings, float), axis=0))  # type: ignore[return-value]


def default_patch(median_shape: Sequence[int], spacing: Sequence[float], depth: int,
                  max_voxels: int = PATCH_VOXELS["cpu"]) -> tuple[int, int, int]:
    """Patch (voxels, Z, Y, X): the median resampled volume rounded up to a multiple of
    2**depth, then (as nnU-Net) shrunk by 2**depth along the axis of largest extent in mm until
    it has at most ``max_voxels`` voxels."""
    m = 2**depth
    p = [max(m, math.ceil(s / m) * m) for s in median_shape]
    while math.prod(p) > max_voxels:
        shrinkable = [i for i in range(3) if p[i] > m]
        if not shrinkable:
            break
        i = max(shrinkable, key=lambda k: p[k] * spacing[k])
        p[i] -= m
    return (p[0], p[1], p[2])


@dataclass
class Volume:
    """A training volume at the target spacing. image (C, Z, Y, X) float32 in about [0, 1];
    mask (Z, Y, X) uint8: lesion (supervised) or body foreground (anomaly); centres (K, 3) int64
    voxels the sampler centres oversampled patches on (lesion, or foreground voxels)."""

    case: str
    image: torch.Tensor
    mask: torch.Tensor
    centres: torch.Tensor
    lesion: bool  # the mask at full resolution has lesion voxels (False for the anomaly foreground)


def load_volume(vc: VolumeCase, spacing: Sequence[float] | None, normalization: str, task: str,
                seed: int = 0) -> Volume:
    """Read, reorient (:mod:`medanomaly.io.orient`), normalise (whole volume) and resample one volume
    case to ``spacing`` (None: as stored)."""
    stored, slices = read_volume(vc)
    img, turn = canonical(stored)  # the one orientation (io.orient); identity for stacked slices
    truth = np.ascontiguousarray(turn.apply(read_volume_mask(vc, stored, slices)))
    a = normalize(np.ascontiguousarray(img.array), normalization, img.geometry.kind, img.geometry.meta.get("dtype"),
                  vc.channel_names)
    shape = resampled_shape(img.spatial_shape, img.geometry.spacing, spacing)
    x = resample(a, shape)
    if task == "anomaly":
        mask = torch.from_numpy(foreground_mask(x.mean(0).numpy())).to(torch.uint8)
    else:
        mask = resample_mask(truth, shape).to(torch.uint8)
    centres = torch.nonzero(mask)
    if len(centres) > MAX_CENTRES:
        keep = np.random.default_rng(seed).choice(len(centres), MAX_CENTRES, replace=False)
        centres = centres[torch.from_numpy(np.sort(keep))]
    return Volume(vc.case, x, mask, centres, bool(truth.any()))


def load_volumes(cases: Sequence[VolumeCase], spacing: Sequence[float] | None, normalization: str, task: str,
                 progress: bool = False) -> list[Volume]:
    """:func:`load_volume` for each case, with a progress bar."""
    if not cases:
        raise MedanomalyError("no volumes to load: the selected split is empty")
    out = [load_volume(vc, spacing, normalization, task, seed=i)
           for i, vc in enumerate(track(cases, desc="loading volumes", unit="vol", enabled=progress))]
    channels = {v.image.shape[0] for v in out}
    if len(channels) > 1:
        raise MedanomalyError(f"the volumes have different channel counts {sorted(channels)}; all images of a data "
                              "set must have the same channels (convert them, or split the folder)")
    return out


def patch_start(size: int, patch: int, gen: torch.Generator, centre: int | None = None) -> int:
    """First voxel of a patch along one axis: uniform over the placements that keep the patch
    inside (or, for a volume smaller than the patch, the padding split at random); around
    ``centre`` (+- patch // 4) when given, clamped to the same range, so ``centre`` is inside."""
    need = max(patch - size, 0)
    lo, hi = -(need // 2), size + need // 2 + need % 2 - patch
    if centre is None:
        return lo + int(torch.randint(hi - lo + 1, (1,), generator=gen))
    jitter = int(torch.randint(-(patch // 4), patch // 4 + 1, (1,), generator=gen)) if patch >= 4 else 0
    return min(max(centre - patch // 2 + jitter, lo), hi)


def crop(x: torch.Tensor, start: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """x (..., Z, Y, X) -> (..., *patch) window at ``start`` (may be negative or run past the end:
    zeros there). A new tensor."""
    out = x.new_zeros(x.shape[:-3] + tuple(patch))
    src, dst = [], []
    for a, p, n in zip(start, patch, x.shape[-3:]):
        lo, hi = max(a, 0), min(a + p, n)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - a, lo - a + max(hi - lo, 0)))
    out[(..., *dst)] = x[(..., *src)]
    return out


def sample_patches(volumes: Sequence[Volume], n: int, patch: Sequence[int], foreground_fraction: float,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n random patches: volume uniform; with probability ``foreground_fraction`` (nnU-Net: 0.33)
    the patch is centred (+- patch/4) on a random voxel of the volume's ``centres``, else placed
    uniformly. Returns images (n, C, *patch) float32, masks (n, 1, *patch) float32 and
    ``forced`` (n,) bool. Zero-padded where a volume is smaller than the patch. Draws come from
    ``gen`` only: a seeded generator gives the same patches."""
    xs, ys, forced = [], [], []
    for _ in range(n):
        v = volumes[int(torch.randint(len(volumes), (1,), generator=gen))]
        force = bool(torch.rand(1, generator=gen) < foreground_fraction) and len(v.centres) > 0
        c = v.centres[int(torch.randint(len(v.centres), (1,), generator=gen))].tolist() if force else [None] * 3
        start = [patch_start(int(s), int(p), gen, ci) for s, p, ci in zip(v.image.shape[1:], patch, c)]
        xs.append(crop(v.image, start, patch))
        ys.append(crop(v.mask, start, patch)[None].float())
        forced.append(force)
    return torch.stack(xs), torch.stack(ys), torch.tensor(forced)


def check_3d_config(cfg) -> None:
    """Clear errors for TrainConfig values 3D training cannot use."""
    if cfg.patch is not None and (len(cfg.patch) != 3 or min(cfg.patch) < 1):
        raise MedanomalyError(f"patch must be 3 positive voxel counts (Z Y X), got {cfg.patch}; e.g. --patch 32 128 128")
    if cfg.spacing is not None and (len(cfg.spacing) != 3 or min(cfg.spacing) <= 0):
        raise MedanomalyError(f"spacing must be 3 positive values in mm (Z Y X), got {cfg.spacing}; e.g. --spacing 1 1 1")
    if not 0.0 <= cfg.foreground_fraction <= 1.0:
        raise MedanomalyError(f"foreground_fraction must be in [0, 1], got {cfg.foreground_fraction}")
    if cfg.patches_per_epoch < 1 or cfg.patch_batch < 1:
        raise MedanomalyError(f"patches_per_epoch and patch_batch must be >= 1 (got {cfg.patches_per_epoch}, "
                              f"{cfg.patch_batch})")
    unsupported = {"--extra": cfg.extra, "--unlabelled": cfg.unlabelled, "--synthetic-lesions": cfg.synthetic_lesions,
                   "--method synthetic": cfg.task == "anomaly" and cfg.anomaly.method == "synthetic",
                   "--encoder": cfg.model.encoder != "plain", "--compile": cfg.compile}
    used = [k for k, v in unsupported.items() if v]
    if used:
        raise MedanomalyError(f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} 2D only; drop "
                              f"{'it' if len(used) == 1 else 'them'} for --dim 3, or train in 2D (--dim 2)")


def plan_overrides_3d(gpu: bool) -> dict:
    """What a plan sets for a 3D run (its other settings are for 2D slices): instance norm (batches
    of 2 patches are too small for batch norm, as in nnU-Net) and a narrower network on a CPU."""
    return {"model.norm": "instance", "model.width": 32 if gpu else 16, "model.depth": 4}


def with_resolved(cfg, patch: Sequence[int], spacing: Sequence[float] | None):
    """``cfg`` with the patch and spacing a run resolved from its data (saved in config.json)."""
    return replace(cfg, patch=tuple(int(p) for p in patch),
                   spacing=None if spacing is None else tuple(float(s) for s in spacing))
