"""Synthetic lesions: the mask is exactly where the image changed; seeded; used by train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medanomaly.data.synthetic import LesionStats, add_synthetic_lesions, paste_lesion

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

    from medanomaly.apps.cli import main

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


# --- the anomaly task's self-supervised objective (method "synthetic", FPI/DRAEM-like) ---------------

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_pasted_anomaly_changes_only_its_mask_inside_the_foreground(seed):
    from medanomaly.data.synthetic import paste_anomaly

    img, donor = _head(), torch.rand(1, 64, 64)
    fg = (img > 0.1).float()
    out, mask = paste_anomaly(img, fg, donor, torch.Generator().manual_seed(seed))
    m = mask[0].bool()
    assert m.any() and not (m & ~fg[0].bool()).any()
    assert torch.equal(out[0][~m], img[0][~m])  # outside the mask: untouched
    assert (out[0][m] != img[0][m]).float().mean() > 0.5  # inside: (almost everywhere) changed


def test_add_synthetic_anomalies_rate_and_inputs_unchanged():
    from medanomaly.data.synthetic import add_synthetic_anomalies

    imgs = torch.stack([_head(32)] * 40)
    fg = (imgs > 0.1).float()
    before = imgs.clone()
    out, masks = add_synthetic_anomalies(imgs, fg, 0.5, torch.Generator().manual_seed(0))
    hit = masks.flatten(1).any(1)
    assert 10 <= int(hit.sum()) <= 30  # about half of 40
    assert torch.equal(imgs, before)  # inputs are never modified in place
    assert torch.equal(out[~hit], imgs[~hit])


def test_synthetic_anomaly_method_trains_predicts_and_exports(tmp_path):
    """method 'synthetic': a 1-channel logit network, its sigmoid is the map; model.json and ONNX agree."""
    from PIL import Image as PILImage

    from medanomaly.apps.cli import main
    from medanomaly.infer.predictor import Predictor
    from medanomaly.io import read_image

    data = tmp_path / "normals"
    rng = np.random.default_rng(0)
    for case in range(4):
        (data / f"case{case}").mkdir(parents=True)
        for k in range(6):
            img = (_head(48)[0].numpy() * 255 * (0.9 + 0.2 * rng.random())).astype(np.uint8)
            PILImage.fromarray(img).save(data / f"case{case}" / f"s{k}.png")
    (data / "splits.json").write_text(json.dumps({"train": ["case0", "case1"], "val": ["case2"], "test": ["case3"]}))
    model = tmp_path / "m"
    assert main(["-q", "train", str(data), "--out", str(model), "--task", "anomaly", "--method", "synthetic",
                 "--size", "48", "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "4"]) == 0
    meta = json.loads((model / "model.json").read_text())
    assert meta["anomaly"]["method"] == "synthetic" and meta["model"]["out_channels"] == 1
    p = Predictor(model)
    score = p.scores(read_image(data / "case3" / "s0.png"))
    assert score.shape == (48, 48) and 0.0 <= score.min() and score.max() <= 1.0
    assert main(["-q", "export", str(model)]) == 0
    sidecar = json.loads((model / "model.onnx.json").read_text())
    onnx_score = Predictor(model, runtime="onnx").scores(read_image(data / "case3" / "s0.png"))
    assert np.abs(onnx_score - score).max() < 1e-3
    assert sidecar["output"]["name"] == "logits" and sidecar["output"]["shape"][1] == 1
