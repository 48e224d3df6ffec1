"""Mask matching in discovery: an image with two candidate masks is an error naming both (one of
them, often an empty one, was used silently); a mask that no image takes is reported by a warning
naming it. Real LGG slices copied into tmp_path; the refusals run through ``medanomaly train``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import discover

pytestmark = pytest.mark.shared_data("lgg-flair")


def _empty_like(mask: Path, path: Path) -> Path:
    PILImage.fromarray(np.zeros_like(np.asarray(PILImage.open(mask).convert("L")))).save(path)
    return path


def _images_and_masks(root: Path, real_lgg) -> list[tuple[Path, Path]]:
    """The images/ + masks/ layout: one real slice with tumour per patient, mask under the same name."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pairs = []
    for patient in real_lgg.patients:
        img, mask = real_lgg.slices(patient, True)[0]
        pairs.append((Path(shutil.copy(img, root / "images" / img.name)),
                      Path(shutil.copy(mask, root / "masks" / img.name))))
    keys = [p.name.replace("_flair.png", "") for p, _ in pairs]
    (root / "splits.json").write_text(json.dumps({"train": keys[:2], "val": keys[2:], "test": []}))
    return pairs


def _refuses(cli, tmp_path: Path, data: Path, named: tuple[Path, ...], says: str, flags: list[str]) -> None:
    out = tmp_path / "model"
    err = cli.refuses("train", data, "--out", out, *flags, says=says, untouched=(data, out))
    assert all(cli.names(err, p) for p in named), err


def test_bad_masks_two_sibling_candidates(tmp_path: Path, cli, real_lgg, tiny_train_flags) -> None:
    """X_flair.png with X_mask.png and an empty X_seg.png: the empty one used to win, silently."""
    data = tmp_path / "data"
    img, mask = real_lgg.train_set(data)[real_lgg.patients[0]][0]
    seg = _empty_like(mask, mask.with_name(mask.name.replace("_mask", "_seg")))
    _refuses(cli, tmp_path, data, (img, mask, seg), r"has 2 candidate masks: .*_mask\.png and .*_seg\.png; an image "
             r"needs exactly one: keep the right one and move the other\(s\) out of the data folder", tiny_train_flags)


def test_bad_masks_folder_and_sibling(tmp_path: Path, cli, real_lgg, tiny_train_flags) -> None:
    """images/X.png with masks/X.png and an empty images/X_mask.png beside it."""
    data = tmp_path / "data"
    img, mask = _images_and_masks(data, real_lgg)[0]
    sibling = _empty_like(mask, img.with_name(img.name.replace(".png", "_mask.png")))
    _refuses(cli, tmp_path, data, (img, mask, sibling), r"has 2 candidate masks: \S*masks/\S+ and \S*images/\S+_mask\.png",
             tiny_train_flags)


def test_same_mask_in_two_formats_is_ambiguous(tmp_path: Path, real_lgg) -> None:
    data = tmp_path / "data"
    _, mask = real_lgg.train_set(data)[real_lgg.patients[1]][0]
    PILImage.open(mask).save(mask.with_suffix(".tif"))
    with pytest.raises(MedanomalyError, match=r"2 candidate masks: \S+_mask\.png and \S+_mask\.tif"):
        discover(data)


def test_a_mask_named_after_the_whole_stem_wins_over_one_named_after_the_key(tmp_path: Path, real_lgg,
                                                                                  caplog) -> None:
    """X_flair_mask.png names X_flair.png exactly; X_mask.png then belongs to no image and is reported."""
    data = tmp_path / "data"
    img, mask = real_lgg.train_set(data)[real_lgg.patients[0]][0]
    exact = Path(shutil.copy(mask, img.with_name(img.name.replace(".png", "_mask.png"))))
    with caplog.at_level(logging.WARNING, logger="medanomaly.data.discover"):
        samples = discover(data)
    assert next(s.mask for s in samples if s.image == img) == exact
    assert "1 mask file(s) in" in caplog.text and str(mask) in caplog.text


def test_mask_without_image_is_reported_once(tmp_path: Path, real_lgg, caplog) -> None:
    """A warning, not an error: the images that are there are read right, and a data set may keep the
    labels of images left out on purpose; but a renamed image must not lose its labels unnoticed."""
    data = tmp_path / "data"
    pairs = real_lgg.train_set(data, per=2)[real_lgg.patients[0]]
    pairs[1][0].unlink()
    with caplog.at_level(logging.WARNING, logger="medanomaly.data.discover"):
        samples = discover(data)
        discover(data)  # train discovers its data more than once: one warning per set of files
    assert len(samples) == 5
    warned = [r.getMessage() for r in caplog.records if "have no image" in r.getMessage()]
    assert len(warned) == 1 and str(pairs[1][1]) in warned[0] and "X.png + X_mask.png" in warned[0], warned


def test_masks_folder_without_images_folder_is_reported(tmp_path: Path, real_lgg, caplog) -> None:
    """X.png beside masks/X.png is no supported layout: the masks are named, not silently ignored."""
    data = tmp_path / "data"
    pairs = _images_and_masks(data, real_lgg)
    for img, _ in pairs:
        img.rename(data / img.name)
    (data / "images").rmdir()
    with caplog.at_level(logging.WARNING, logger="medanomaly.data.discover"):
        samples = discover(data)
    assert all(s.mask is None for s in samples) and len(samples) == 3
    assert "3 mask file(s)" in caplog.text and str(pairs[0][1]) in caplog.text


def test_a_mask_beside_the_images_of_an_images_folder_is_no_image(tmp_path: Path, real_lgg) -> None:
    data = tmp_path / "data"
    pairs = _images_and_masks(data, real_lgg)
    img, mask = pairs[0]
    sibling = Path(shutil.move(mask, img.with_name(img.name.replace(".png", "_mask.png"))))
    samples = {s.image: s.mask for s in discover(data)}
    assert sibling not in samples and samples[img] == sibling and len(samples) == 3
