"""Batch sources (medanomaly.train.sources): what the loop draws in 2D (slices) and 3D (patches),
the step loss of both, and validation by image or by volume with per-case Dice pooling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medanomaly.config import schema as config
from medanomaly.config.schema import TrainConfig
from medanomaly.data.slices import SliceSet
from medanomaly.data.volumes import Volume
from medanomaly.metrics.functional import Stats, dice
from medanomaly.models.losses import get_loss
from medanomaly.models.unet import UNet, UNetConfig
from medanomaly.train import sources

CPU = torch.device("cpu")


def _slices(n: int = 8, lesion_every: int = 4, cases: int = 2) -> SliceSet:
    g = torch.Generator().manual_seed(0)
    images = torch.rand((n, 1, 16, 16), generator=g).half()
    masks = torch.zeros((n, 1, 16, 16), dtype=torch.uint8)
    lesion = torch.zeros(n, dtype=torch.bool)
    for i in range(0, n, lesion_every):
        masks[i, 0, 4:10, 4:10], lesion[i] = 1, True
    return SliceSet(images, masks, [f"c{i % cases}" for i in range(n)], [Path(f"s{i}.png") for i in range(n)],
                    lesion, torch.ones(n, dtype=torch.bool))


def _volume(case: str, lesion: bool = True) -> Volume:
    g = torch.Generator().manual_seed(len(case))
    mask = torch.zeros((6, 20, 20), dtype=torch.uint8)
    if lesion:
        mask[2:4, 5:12, 5:12] = 1
    return Volume(case, torch.rand((1, 6, 20, 20), generator=g), mask, torch.nonzero(mask), lesion)


def _cfg(**changes) -> TrainConfig:
    return config.load(None, {"batch_size": 4, "precision": "fp32", "max_minutes": 0, **changes})


def _cfg3d(**changes) -> TrainConfig:
    return _cfg(**{"model.dim": 3, "model.norm": "instance", "patches_per_epoch": 4, "patch": (4, 16, 16),
                   **changes})


def _net(dim: int = 2) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(width=4, depth=2, dim=dim, norm="instance" if dim == 3 else "batch"))


def test_batch_indices_put_lesion_slices_first_and_follow_the_seed():
    train, cfg = _slices(), _cfg(positive_fraction=0.5)
    batches = sources.batch_indices(train, cfg, torch.Generator().manual_seed(3))
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)
    assert all(bool(train.lesion[b[:2]].all()) for b in batches)  # round(0.5 * 4) positives first
    again = sources.batch_indices(train, cfg, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    plain = sources.batch_indices(train, _cfg(task="anomaly"), torch.Generator().manual_seed(3))
    assert sorted(torch.cat(plain).tolist()) == list(range(8))  # anomaly: a plain permutation


def test_slice_source_counts_steps_and_images():
    src = sources.SliceSource(_slices(10), _slices(4), _cfg(), CPU, "fp32", get_loss("bce+dice", 0.5))
    assert (src.steps, src.batch_size, src.images_per_epoch, src.unit) == (2, 4, 8, "batch")
    assert src.describe() == "training on 10 slices (4 val)" and src.teacher is None and src.extra_state() == {}


def test_slice_source_loss_and_validation():
    cfg, loss_fn = _cfg(), get_loss("bce+dice", 0.5)
    src = sources.SliceSource(_slices(), _slices(4), cfg, CPU, "fp32", loss_fn)
    model, gen = _net().train(), torch.Generator().manual_seed(0)
    batch = src.batches(gen)[0]
    loss = src.loss(model, batch, gen, 0)
    assert loss.ndim == 0 and loss.requires_grad and math.isfinite(loss.item())
    val_loss, score = src.validate(model)
    assert (val_loss, score) == sources.validate_slices(model, src.val, loss_fn, "fp32", CPU)
    assert not model.training


class _Threshold(torch.nn.Module):
    """Logits +1 where the image is above 0.5, else -1: a known prediction."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x[:, :1] > 0.5, 1.0, -1.0) * self.w


def test_validation_pools_the_slices_of_a_case_into_one_dice():
    val = _slices(4, lesion_every=1, cases=2)  # cases c0 (slices 0, 2), c1 (1, 3)
    val.images = torch.zeros_like(val.images)
    val.images[0, 0, 4:10, 4:10] = 1.0  # c0: one slice found, the other missed
    val.images[1, 0, 4:10, 4:10] = val.images[3, 0, 4:10, 4:10] = 1.0  # c1: both found
    _, score = sources.validate_slices(_Threshold(), val, get_loss("bce", 1.0), "fp32", CPU)
    c0 = dice(Stats(36, 0, 36, 0))
    assert score == pytest.approx((c0 + 1.0) / 2)


def test_patch_source_draws_its_patches_step_by_step():
    vols = [_volume("a"), _volume("b")]
    cfg, loss_fn = _cfg3d(), get_loss("bce+dice", 0.5)
    src = sources.PatchSource(vols, [_volume("v")], cfg, CPU, "fp32", loss_fn)
    assert (src.steps, src.batch_size, src.images_per_epoch, src.unit) == (2, 2, 4, "step")
    assert src.describe() == "3D training on 2 volumes (1 val), patch (4, 16, 16), 4 patches per epoch"
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state()
    assert list(src.batches(gen)) == [0, 1] and torch.equal(gen.get_state(), before)  # nothing drawn up front
    model = _net(3).train()
    first = src.loss(model, 0, gen, 0)
    assert first.ndim == 0 and first.requires_grad
    again = src.loss(model, 0, torch.Generator().manual_seed(0), 0)
    assert again.item() == first.item()  # the same seed, the same patches and augmentation


def test_patch_source_validation_by_volume_and_anomaly_patches():
    model = _net(3)
    loss_fn = get_loss("bce+dice", 0.5)
    src = sources.PatchSource([_volume("a")], [_volume("v"), _volume("w")], _cfg3d(), CPU, "fp32", loss_fn)
    val_loss, score = src.validate(model)
    assert math.isfinite(val_loss) and 0.0 <= score <= 1.0
    anomaly = _cfg3d(task="anomaly")
    src = sources.PatchSource([_volume("a")], [_volume("v", False)], anomaly, CPU, "fp32", loss_fn)
    first = src.validate(model)
    assert first == src.validate(model) and first[1] == -first[0]  # fixed patches and noise every epoch


def test_step_loss_of_the_anomaly_task_uses_no_intensity_augmentation(monkeypatch):
    seen = []
    real = sources.augment_batch

    def spy(image, mask, cfg, gen):
        seen.append((cfg.p_gamma, cfg.p_contrast, cfg.p_noise))
        return real(image, mask, cfg, gen)

    monkeypatch.setattr(sources, "augment_batch", spy)
    x, fg = torch.rand(2, 1, 16, 16), torch.ones(2, 1, 16, 16)
    loss = sources.step_loss(_net().train(), x, fg, _cfg(task="anomaly"), torch.Generator().manual_seed(0), CPU,
                             "fp32", get_loss("bce+dice", 0.5))
    assert seen == [(0.0, 0.0, 0.0)] and math.isfinite(loss.item())


def test_precision_3d_keeps_fp32():
    model = _net(3)
    assert sources.precision_3d(model, _cfg3d(), CPU, 1) == "fp32"



class _Classes(torch.nn.Module):
    """Three softmax logits: label 1 where the image is above 0.75, label 2 where in (0.25, 0.75], else background."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1]
        return torch.cat([(x <= 0.25).float(), (x > 0.75).float(), ((x > 0.25) & (x <= 0.75)).float()], 1) * 9 * self.w


def test_validation_of_several_labels_averages_each_labels_mean_case_dice():
    val = _slices(2, lesion_every=1, cases=2)  # c0: slice 0, c1: slice 1; both hold label 1 at 4:10, 4:10
    val.masks[:, 0, 12:14, 12:14] = 2  # and label 2 at 12:14, 12:14
    val.images = torch.zeros_like(val.images)
    val.images[:, 0, 4:10, 4:10] = 1.0  # label 1 found in both
    val.images[0, 0, 12:14, 12:14] = 0.5  # label 2 found in c0 only
    loss_fn = get_loss("bce+dice", 0.5, classes=3)
    loss, score = sources.validate_slices(_Classes(), val, loss_fn, "fp32", CPU, classes=3)
    assert math.isfinite(loss) and score == pytest.approx((1.0 + (1.0 + 0.0) / 2) / 2)


def test_a_step_of_several_labels_moves_each_label_with_the_image():
    seen = {}

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen["target"] = target
        return logits.float().mean()

    masks = torch.zeros((2, 1, 16, 16))
    masks[:, 0, 2:6, 2:6], masks[:, 0, 9:14, 9:14] = 1, 2
    cfg = _cfg(labels="1=a,2=b")
    net = UNet(UNetConfig(out_channels=3, width=4, depth=2)).train()
    sources.step_loss(net, torch.rand((2, 1, 16, 16)), masks, cfg, torch.Generator().manual_seed(0), CPU, "fp32",
                      loss_fn)
    target = seen["target"]
    assert target.shape == (2, 2, 16, 16) and set(target.unique().tolist()) <= {0.0, 1.0}
    assert float((target.sum(1) > 1).sum()) == 0  # augmentation never gives a pixel two labels
