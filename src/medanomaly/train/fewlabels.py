"""What a supervised run can add to its labelled slices when labels are few (README, "Learning
from few labels"): extra image/mask pairs (``--extra``, e.g. from ``medanomaly synthesize``),
unlabelled images (``--unlabelled``: a mean teacher here; the pretraining on them is a stage of
:func:`medanomaly.train.run.train`), and the statistics behind synthetic lesions
(``--synthetic-lesions``). Data preparation (:mod:`medanomaly.train.prepare`) calls
:func:`load_extra`, the run :func:`build_extras`; each source is checked before minutes are spent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage

from medanomaly.config.schema import TrainConfig
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import Sample, discover, read_sample
from medanomaly.data.slices import SliceSet, load_slices
from medanomaly.data.synthetic import LesionStats
from medanomaly.io import read_image
from medanomaly.train.checkpoint import load_state
from medanomaly.train.semisup import MeanTeacher, resolve_method

log = logging.getLogger(__name__)


@dataclass
class Extras:
    """Optional parts of a supervised step: synthetic lesions and the mean teacher's unlabelled data."""

    lesion_stats: LesionStats | None = None
    teacher: MeanTeacher | None = None
    unlabelled: SliceSet | None = None


def load_extra(cfg: TrainConfig, data: Path, parts: dict[str, list], channels: int, progress: bool) -> SliceSet:
    """The image/mask pairs of the folder ``cfg.extra`` (e.g. written by ``medanomaly synthesize``),
    loaded like the training slices, with case ids prefixed ``extra:`` so they never clash with real ones.

    ``parts``: the samples of each split of ``data``. Refused, naming the file and the fix, when
    the folder is missing or holds no pair, when it holds images of ``data`` itself or (per its
    manifest.json) was painted into val/test images of this split (a leak), when a pair's native
    size (read from the file header, before any resizing) is not cfg.size, or when its channels
    differ from ``channels`` (those of the training images).
    """
    source = Path(cfg.extra)
    pairs = check_extra(cfg, data, parts)
    extra = load_slices(pairs, cfg.size, cfg.normalization, with_masks=True, progress=progress)
    if extra.images.shape[1] != channels:
        raise MedanomalyError(f"extra pair {pairs[0].image} has {extra.images.shape[1]} channels but the training "
                              f"images have {channels}; give pairs of the same modality and channels (regenerate "
                              "them with 'medanomaly synthesize' on this data)")
    extra.cases = [f"extra:{c}" for c in extra.cases]
    log.info("adding %d extra pairs (%d slices) from %s to the training split", len(pairs), len(extra), source)
    return extra


def check_extra(cfg: TrainConfig, data: Path, parts: dict[str, list], channels: int | None = None) -> list[Sample]:
    """The pairs of ``cfg.extra``, checked as :func:`load_extra` describes (before any is loaded; the
    channels of the first pair, read from its file, against ``channels`` where given)."""
    source = Path(cfg.extra)
    pairs = _extra_pairs(source)
    _check_no_leak(source, pairs, data, parts)
    for s in pairs:
        _check_extra_size(s.image, cfg.size)
    if channels is not None and (found := read_sample(pairs[0]).channels) != channels:
        raise MedanomalyError(f"extra pair {pairs[0].image} has {found} channels but the training images have "
                              f"{channels}; give pairs of the same modality and channels (regenerate them with "
                              "'medanomaly synthesize' on this data)")
    return pairs


def _extra_pairs(source: Path) -> list[Sample]:
    """The image/mask pairs of the --extra folder; refused when it is no folder or holds none."""
    if not source.is_dir():
        raise MedanomalyError(f"--extra {source} is not a folder; pass the --out folder of 'medanomaly synthesize' "
                              "(or any folder of image/mask pairs)")
    try:
        pairs = [s for s in discover(source) if s.mask is not None]
    except MedanomalyError as exc:
        raise MedanomalyError(f"--extra {source}: {exc}") from None
    if not pairs:
        raise MedanomalyError(f"--extra {source} holds no image/mask pair; put images in images/ and masks in "
                              "masks/ (as 'medanomaly synthesize' writes them), or X.png beside X_mask.png")
    return pairs


def _check_no_leak(source: Path, pairs: list[Sample], data: Path, parts: dict[str, list]) -> None:
    """Refuse extra pairs that are images of ``data`` itself, or that its manifest.json says were
    painted into val/test images of this split."""
    own = {p.resolve() for v in parts.values() for s in v for p in (s.image, s.mask) if p is not None}
    clash = [s.image for s in pairs if s.image.resolve() in own]
    if clash:
        raise MedanomalyError(f"--extra {source} holds images of the data folder {data} itself (e.g. {clash[0]}); "
                              "give a folder of additional pairs outside it")
    try:  # a synthesize output names the real images it painted into
        files = json.loads((source / "manifest.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        files = []
    held_out = {p.resolve() for k in ("val", "test") for s in parts.get(k, []) for p in (s.image, s.mask) if p}
    leaked = [f.get("image") for f in files if isinstance(f, dict) and any(
        f.get(k) and Path(f[k]).resolve() in held_out for k in ("source_image", "source_mask"))]
    if leaked:
        raise MedanomalyError(f"--extra {source}: {len(leaked)} pairs (e.g. {leaked[0]}) were made from val/test "
                              "images of this split, which would leak them into training; regenerate them with "
                              "'medanomaly synthesize' and the same --splits")


def _check_extra_size(image: Path, size: int) -> None:
    """An extra pair must have the training size natively (read from the header, before any resizing)."""
    try:
        with PILImage.open(image) as im:  # the header only: no pixel decoded
            h, w = im.height, im.width
    except Exception:  # noqa: BLE001 - not a Pillow format (NIfTI, NRRD, DICOM...): read it
        h, w = read_image(image).spatial_shape[-2:]
    if (h, w) != (size, size):
        fix = f"train with --size {h}" if h == w else f"resize the pairs to {size}x{size}"
        raise MedanomalyError(f"extra pair {image} is {h}x{w} but training runs at {size}x{size}: "
                              f"regenerate with `medanomaly synthesize --size {size}` or {fix}")


def build_extras(cfg: TrainConfig, data: Path, train_set: SliceSet, model, resume_from: Path | None,
                 progress: bool, splits: dict[str, list[str]] | None = None) -> Extras:
    """Synthetic-lesion statistics and the mean teacher with its unlabelled images, where asked for
    (the teacher starts from ``model``, or from the checkpoint ``resume_from``)."""
    extras = Extras()
    if cfg.task != "supervised":
        return extras
    if cfg.synthetic_lesions > 0:  # intensities of the real training lesions
        extras.lesion_stats = LesionStats.from_slices(train_set.images, train_set.masks)
        log.info("synthetic lesions with p=%.2f, from real lesions: %s", cfg.synthetic_lesions, extras.lesion_stats)
    if cfg.unlabelled and "mean-teacher" in resolve_method(cfg.unlabelled_method):
        extras.unlabelled = load_unlabelled(cfg, data, train_set, progress, splits)
        steps = max(1, len(train_set) // cfg.batch_size)
        extras.teacher = MeanTeacher(model, cfg.ema_decay, cfg.consistency_weight, rampup_steps=5 * steps)
        if resume_from is not None:
            st = load_state(resume_from)
            if "teacher" in st:
                extras.teacher.teacher.load_state_dict(st["teacher"])
        log.info("mean teacher on %d unlabelled slices", len(extras.unlabelled))
    return extras


def load_unlabelled(cfg: TrainConfig, data: Path, train_set: SliceSet, progress: bool,
                    splits: dict[str, list[str]] | None = None) -> SliceSet:
    """The images of :func:`unlabelled_samples`, loaded like the training slices, masks ignored."""
    samples = unlabelled_samples(cfg, data, train_set.sources, splits)
    return load_slices(samples, cfg.size, cfg.normalization, with_masks=False, progress=progress)


def unlabelled_samples(cfg: TrainConfig, data: Path, train_images: Iterable[Path],
                       splits: dict[str, list[str]] | None = None) -> list:
    """The samples of ``cfg.unlabelled`` (a folder, or the name of a list of case ids in the split
    file in use: ``--splits``, else DATA/splits.json); refused when empty or when it holds any of
    the labelled ``train_images`` themselves."""
    source = Path(cfg.unlabelled)
    if source.exists():
        samples = discover(source)
    else:
        splits_file = data / "splits.json"
        names = splits if splits is not None else (json.loads(splits_file.read_text()) if splits_file.is_file() else {})
        if cfg.unlabelled not in names:
            raise MedanomalyError(f"--unlabelled {cfg.unlabelled}: neither a folder nor a split (a list of case "
                                  f"ids) of the split file in use (lists there: {sorted(names)}); pass a folder of "
                                  "images without masks, or a split file (--splits) with a list of that name")
        cases = set(names[cfg.unlabelled])
        samples = [s for s in discover(data) if s.case in cases]
    if not samples:
        raise MedanomalyError(f"--unlabelled {cfg.unlabelled} holds no images")
    labelled = {Path(p).resolve() for p in train_images}
    overlap = [s.image for s in samples if s.image.resolve() in labelled]
    if overlap:
        raise MedanomalyError(f"--unlabelled {cfg.unlabelled} holds {len(overlap)} of the labelled training images "
                              f"(e.g. {overlap[0]}); give images that are not in the training split")
    return samples
