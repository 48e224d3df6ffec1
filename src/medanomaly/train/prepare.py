"""Data preparation of a training run: discover the samples, split them by case, load the train and
val splits into memory (2D slices at the training size, or 3D volumes at one target spacing) and
write ``splits.json`` and ``config.json`` into the model directory.

3D volumes (:mod:`medanomaly.data.volumes`: a 3D file, a DICOM series, or a folder of ordered 2D
slices) are normalised and resampled to ``cfg.spacing`` (default: the median spacing of the training
volumes); the patch (default: from the median shape and the device's voxel budget) and the spacing
are resolved into the saved configuration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medanomaly.anomaly.methods import foreground
from medanomaly.config import schema as config_mod
from medanomaly.config.labels import parse_labels, several
from medanomaly.config.schema import TrainConfig
from medanomaly.core import distributed, jsonio
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import discover, resolve_splits
from medanomaly.data.slices import SliceSet, concat_slices, load_slices
from medanomaly.data.volumes import (
    PATCH_VOXELS,
    Volume,
    default_patch,
    group_volumes,
    load_volumes,
    median_spacing,
    volume_spacing,
    with_resolved,
)
from medanomaly.train.fewlabels import load_extra

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """The loaded data of a run: train and val (a SliceSet in 2D, Volumes in 3D), the split by case,
    the configuration with what the data resolved (3D: patch and spacing), the image channels."""

    train: SliceSet | list[Volume]
    val: SliceSet | list[Volume]
    splits: dict[str, list[str]]
    cfg: TrainConfig
    in_channels: int


def prepare(data: Path, out: Path, cfg: TrainConfig, splits_file: str | Path | None, device: torch.device,
            progress: bool) -> Prepared:
    """Slices (``cfg.model.dim`` 2) or volumes (3) of the train and val splits; splits.json and
    config.json written by rank 0 (under torchrun the others write nothing)."""
    if cfg.model.dim == 3:
        prep = prepare_volumes(data, cfg, splits_file, device, progress)
    else:
        prep = prepare_slices(data, cfg, splits_file, progress)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        jsonio.write_json(out / "splits.json", prep.splits, indent=1)
        config_mod.save(prep.cfg, out / "config.json")
    return prep


def usable_and_splits(data: Path, cfg: TrainConfig,
                      splits_file: str | Path | None) -> tuple[list, dict[str, list[str]]]:
    """The samples the task trains on (supervised: those with a mask) and the split by case."""
    samples = discover(data)
    usable = [s for s in samples if s.mask is not None] if cfg.task == "supervised" else samples
    if not usable:
        raise MedanomalyError(f"no image/mask pairs found in {data}: supervised training needs masks named like "
                              "X_mask.png (or .nii.gz, .nrrd...) beside X.png, or images/ + masks/ folders "
                              "(see README, 'Data layouts')")
    return usable, resolve_splits(data, usable, splits_file, cfg.seed)


def split_parts(items: list, splits: dict[str, list[str]], data: Path, what: str) -> dict[str, list]:
    """The items (samples or volume cases, each with a ``case``) of each split; at least one
    training and one validation item, else a clear error counting ``what`` (images, volumes)."""
    parts = {k: [s for s in items if s.case in set(v)] for k, v in splits.items()}
    if not parts["train"] or not parts["val"]:
        raise MedanomalyError(f"the split leaves {len(parts['train'])} training and {len(parts['val'])} validation "
                              f"{what} in {data}; at least one of each is needed (add cases or fix --splits)")
    return parts


def _no_lesion(data: Path) -> MedanomalyError:
    return MedanomalyError(f"every training mask in {data} is empty; supervised training needs lesions to learn "
                           "from (use --task anomaly for normal-only data)")


def prepare_slices(data: Path, cfg: TrainConfig, splits_file: str | Path | None, progress: bool) -> Prepared:
    """Train and val slices (plus ``cfg.extra`` pairs, appended to the training slices only); for
    the anomaly task only the normal slices, their masks replaced by foreground masks."""
    if cfg.extra and cfg.task != "supervised":
        raise MedanomalyError(f"--extra {cfg.extra} adds image/mask pairs to supervised training; the anomaly task "
                              "learns from normal images only: drop --extra")
    usable, splits = usable_and_splits(data, cfg, splits_file)
    parts = split_parts(usable, splits, data, "images")
    with_masks = True if cfg.task == "supervised" else (None if cfg.anomaly.normal_only else False)
    values = [lb.value for lb in parse_labels(cfg.labels)] if several(cfg.labels) else []  # label maps
    train = load_slices(parts["train"], cfg.size, cfg.normalization, with_masks, progress=progress, labels=values)
    val = load_slices(parts["val"], cfg.size, cfg.normalization, with_masks, progress=progress, labels=values)
    if cfg.extra:  # never val/test: the extra pairs only add training slices
        train = concat_slices(train, load_extra(cfg, data, parts, train.images.shape[1], progress))
    if cfg.task == "anomaly":
        train, val = normal_only(train, data, "train"), normal_only(val, data, "val")
    elif int(train.masks.sum()) == 0:
        raise _no_lesion(data)
    return Prepared(train, val, splits, cfg, int(train.images.shape[1]))


def normal_only(slices: SliceSet, data: Path, split: str) -> SliceSet:
    """Slices without lesion (no mask, or an empty one); masks replaced by foreground masks,
    which the anomaly task uses to restrict noise and loss (lesion masks are used for nothing else)."""
    normal = slices.subset(~slices.lesion)
    if len(normal) == 0:
        raise MedanomalyError(f"no normal image in the {split} split of {data}: the anomaly task learns from images "
                              "without lesions (a folder without masks, or slices whose mask is empty)")
    normal.masks = foreground(normal.images).to(torch.uint8)
    return normal


def prepare_volumes(data: Path, cfg: TrainConfig, splits_file: str | Path | None, device: torch.device,
                    progress: bool) -> Prepared:
    """Train and val volumes at the target spacing; the patch and spacing resolved into the config
    (the default patch fits the voxel budget of ``device``'s type)."""
    usable, splits = usable_and_splits(data, cfg, splits_file)
    parts = split_parts(group_volumes(usable), splits, data, "volumes")
    source = "given" if cfg.spacing else "median of the training volumes"
    spacing = cfg.spacing or median_spacing([volume_spacing(vc) for vc in parts["train"]])
    train = load_volumes(parts["train"], spacing, cfg.normalization, cfg.task, progress)
    val = load_volumes(parts["val"], spacing, cfg.normalization, cfg.task, progress)
    if cfg.task == "anomaly" and cfg.anomaly.normal_only:
        train, val = _normal_volumes(train, data, "train"), _normal_volumes(val, data, "val")
    elif cfg.task == "supervised" and not any(v.lesion for v in train):
        raise _no_lesion(data)
    shapes = np.median([v.image.shape[1:] for v in train], axis=0)
    patch = cfg.patch or default_patch(shapes, spacing, cfg.model.depth, PATCH_VOXELS.get(device.type, 2**18))
    cfg = with_resolved(cfg, patch, spacing)
    log.info("3D: %d train / %d val volumes at spacing %s (%s), median shape %s voxels, patch %s voxels",
             len(train), len(val), cfg.spacing, source, tuple(int(s) for s in shapes), cfg.patch)
    return Prepared(train, val, splits, cfg, int(train[0].image.shape[0]))


def _normal_volumes(vols: list[Volume], data: Path, split: str) -> list[Volume]:
    normal = [v for v in vols if not v.lesion]
    if not normal:
        raise MedanomalyError(f"no volume without lesion in the {split} split of {data}: the 3D anomaly task learns "
                              "from normal volumes (no mask, or an empty one)")
    return normal
