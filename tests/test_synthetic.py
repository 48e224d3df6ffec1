"""Synthetic lesions: the mask is exactly where the image changed; seeded; used by train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medanomaly.synthetic import LesionStats, add_synthetic_lesions, paste_lesion

STATS = LesionStats(mean=0.8, std=0.05, contrast=0.3)


def _head(size: int = 64) -> torch.Tensor:
    img = torch.zeros(1, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img[0][(yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size // 2 - 6) ** 2] = 0.45
    return img


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_mask_equals_where_the_image_changed(seed):
    img = _head()
    out, mask = paste_lesion(img, STATS, torch.Generator().manual_seed(seed))
    changed = (out != img)[0]
    assert torch.equal(changed, mask[0].bool())
    assert mask.sum() > 0 and not (mask[0].bool() & (img[0] <= 0.1)).any()  # inside the foreground only


def test_boundary_is_blended_not_a_step():
    img = _head(128)
    out, mask = paste_lesion(img, STATS, torch.Generator().manual_seed(3))
    m = mask[0].bool()
    def erode(k):
        return (-torch.nn.functional.max_pool2d(-m.float()[None, None], k, 1, k // 2))[0, 0] > 0.5

    border, core = m & ~erode(3), erode(5)
    assert border.any() and core.any()
    # at the border the paste is partly transparent: closer to the tissue than the core is
    assert (out[0][border] - 0.45).abs().mean() < (out[0][core] - 0.45).abs().mean()


def test_lesion_stats_measured_on_real_like_slices():
    imgs = torch.full((2, 1, 32, 32), 0.4)
    masks = torch.zeros(2, 1, 32, 32)
    imgs[:, :, 10:20, 10:20] = 0.9
    masks[:, :, 10:20, 10:20] = 1
    s = LesionStats.from_slices(imgs, masks)
    assert s.mean == pytest.approx(0.9) and s.contrast == pytest.approx(0.5) and s.std == pytest.approx(0.0)


def test_batch_paste_touches_only_lesion_free_samples_and_is_seeded():
    imgs = torch.stack([_head(), _head(), _head()])
    masks = torch.zeros(3, 1, 64, 64)
    masks[0, 0, 30:34, 30:34] = 1  # already has a lesion: left alone
    a = add_synthetic_lesions(imgs, masks, 1.0, STATS, torch.Generator().manual_seed(5))
    b = add_synthetic_lesions(imgs, masks, 1.0, STATS, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0][0], imgs[0]) and torch.equal(a[1][0], masks[0])
    assert a[1][1].sum() > 0 and a[1][2].sum() > 0
    assert masks[1].sum() == 0  # inputs not modified
    none = add_synthetic_lesions(imgs, masks, 0.0, STATS, torch.Generator().manual_seed(5))
    assert torch.equal(none[0], imgs)


def test_train_with_synthetic_lesions(tmp_path):
    from PIL import Image as PILImage

    from medanomaly.cli import main

    rng = np.random.default_rng(0)
    for c in range(4):
        d = tmp_path / "data" / f"case{c}"
        d.mkdir(parents=True)
        for k in range(3):
            img = (rng.random((32, 32)) * 80 + 60).astype(np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            if k == 0:
                img[8:16, 8:16], mask[8:16, 8:16] = 230, 255
            PILImage.fromarray(img).save(d / f"case{c}_{k}.png")
            PILImage.fromarray(mask).save(d / f"case{c}_{k}_mask.png")
    (tmp_path / "data" / "splits.json").write_text(
        json.dumps({"train": ["case0", "case1"], "val": ["case2"], "test": ["case3"]}))
    rc = main(["-q", "train", str(tmp_path / "data"), "--out", str(tmp_path / "m"), "--synthetic-lesions", "0.5",
               "--size", "32", "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu"])
    assert rc == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["synthetic_lesions"] == 0.5
