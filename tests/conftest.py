"""Shared test settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a busy 2-core machine: one intra-op thread avoids costly oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """medanomaly's demo phantoms, 5 cases x 4 slices of 48x48: 12 training slices (3 steps of 4),
    4 val, 4 test."""
    from medanomaly.apps.demo import make_phantoms

    return make_phantoms(tmp_path_factory.mktemp("phantoms"), n_cases=5, slices=4, size=48)


def labelled_phantoms(root: Path, n_cases: int = 4, rgb: bool = False) -> Path:
    """Tiny 32x32 image/mask pairs (a bright 8x8 lesion) in case folders, with a 2/1/1 splits.json."""
    rng = np.random.default_rng(0)
    for c in range(n_cases):
        d = root / f"case{c}"
        d.mkdir(parents=True)
        for k in range(3):
            img = (rng.random((32, 32) + ((3,) if rgb else ())) * 100).astype(np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            mask[8:16, 8:16] = 255
            img[8:16, 8:16] = 220
            PILImage.fromarray(img).save(d / f"case{c}_{k}.png")
            PILImage.fromarray(mask).save(d / f"case{c}_{k}_mask.png")
    (root / "splits.json").write_text(json.dumps({"train": ["case0", "case1"], "val": ["case2"], "test": ["case3"]}))
    return root
