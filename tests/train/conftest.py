"""Fixtures of the training tests: the few-label data of tests/train/test_semisup.py and
test_fewlabels.py, and the tiny GAN of ``synthesize`` with its pairs (tests/train/test_gan.py, and
test_fewlabels.py for ``train --extra``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medanomaly.train.gan import GanConfig, synthesize

# --- few labels: the data of tests/train/test_semisup.py and test_fewlabels.py ----------------------

#: ``medanomaly train`` flags for a 2-epoch CPU run of a 32x32, width-4, depth-2 U-Net, batches of 4
TWO_EPOCHS = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "2", "--batch-size", "4", "--device", "cpu"]


def _case_phantoms(root: Path, cases: list[str], with_masks: bool = True) -> None:
    """Case folders root/<case>/ of 3 slices of 32x32 (a bright 8x8 lesion), with masks or without."""
    rng = np.random.default_rng(abs(hash(root.name)) % 2**32)
    for c in cases:
        d = root / c
        d.mkdir(parents=True)
        for k in range(3):
            img = (rng.random((32, 32)) * 80 + 40).astype(np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            img[10:18, 10:18], mask[10:18, 10:18] = 220, 255
            PILImage.fromarray(img).save(d / f"{c}_{k}.png")
            if with_masks:
                PILImage.fromarray(mask).save(d / f"{c}_{k}_mask.png")


@pytest.fixture(scope="session")
def case_phantoms():
    """The builder of case folders: ``case_phantoms(root, ["a", "b"], with_masks=True)``."""
    return _case_phantoms


@pytest.fixture
def labelled_cases(tmp_path) -> Path:
    """tmp_path/data: labelled cases a, b, c, d of 3 slices each; splits.json: train a, b; val c; test d."""
    _case_phantoms(tmp_path / "data", ["a", "b", "c", "d"])
    (tmp_path / "data" / "splits.json").write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["d"]}))
    return tmp_path / "data"


@pytest.fixture(scope="session")
def two_epoch_train_flags() -> list[str]:
    """``medanomaly train`` flags for a 2-epoch CPU run of a 32x32, width-4, depth-2 U-Net."""
    return list(TWO_EPOCHS)


# --- the GAN of ``synthesize`` and its pairs: tests/train/test_gan.py and test_fewlabels.py (--extra) ---

GAN_TINY = GanConfig(size=32, minutes=0, max_steps=4, batch_size=4, width=8, depth=2, d_width=8, d_layers=2,
                     margin=2)


def _gan_data(root: Path, size: int = 32) -> Path:
    """4 cases x 4 slices: a grey 'head' disk with texture; slice 0 and 1 of each case have a bright lesion."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    head = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2 - 3) ** 2
    for c in range(4):
        d = root / f"case{c}"
        d.mkdir(parents=True)
        for k in range(4):
            img = np.where(head, rng.integers(70, 110, (size, size)), 0).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            if k < 2:
                blob = (yy - 12 - 2 * k) ** 2 + (xx - 14 - c) ** 2 < 16
                img[blob], mask[blob] = 220, 255
            PILImage.fromarray(img).save(d / f"case{c}_{k}.png")
            PILImage.fromarray(mask).save(d / f"case{c}_{k}_mask.png")
    (root / "splits.json").write_text(json.dumps({"train": ["case0", "case1"], "val": ["case2"], "test": ["case3"]}))
    return root


@pytest.fixture(scope="session")
def tiny_gan_config() -> GanConfig:
    """The GAN settings of :func:`synthesized`: 32x32, 4 steps, width 8, depth 2, margin 2."""
    return GAN_TINY


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory) -> tuple[Path, Path]:
    """(data, out): 4 cases x 4 slices of 32x32 (splits 2/1/1), and 5 pairs that a 4-step GAN
    (:func:`tiny_gan_config`) painted into its lesion-free training slices. Shared by the session
    (made once, seconds): tests read both folders and write only elsewhere."""
    root = tmp_path_factory.mktemp("gan")
    data = _gan_data(root / "data")
    return data, synthesize(data, root / "syn", 5, GAN_TINY, progress=False)
