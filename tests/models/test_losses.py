"""Tests for medanomaly.models.losses: values that can be checked by hand, weights, the registry."""

from __future__ import annotations

import math

import pytest
import torch

from medanomaly.models.losses import LOSSES, bce, bce_dice, ce, get_loss, one_hot, soft_dice, soft_dice_labels

BIG = 50.0


def _target(k: int, shape=(2, 1, 8, 8)) -> torch.Tensor:
    t = torch.zeros(shape)
    t.view(-1)[:k] = 1.0
    return t


@pytest.mark.parametrize("k", [0, 1, 37, 128])
def test_bce_of_zero_logits_is_ln2(k):
    target = _target(k)
    assert bce(torch.zeros_like(target), target).item() == pytest.approx(math.log(2), abs=1e-6)


def test_bce_by_hand():
    logits = torch.tensor([[[[2.0, -1.0]]]])
    target = torch.tensor([[[[1.0, 0.0]]]])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    assert bce(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_bce_accepts_integer_target():
    target = _target(5)
    assert bce(torch.zeros_like(target), target.to(torch.uint8)).item() == pytest.approx(math.log(2), abs=1e-6)


def test_soft_dice_perfect_prediction_is_zero():
    target = _target(20)
    logits = (target * 2 - 1) * BIG
    assert soft_dice(logits, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_soft_dice_empty_prediction_by_hand(k):
    # prob ~ 0 everywhere: 1 - (2*0 + 1) / (0 + k + 1) = 1 - 1/(k+1)
    target = _target(k)
    logits = torch.full_like(target, -BIG)
    assert soft_dice(logits, target).item() == pytest.approx(1 - 1 / (k + 1), abs=1e-6)


def test_soft_dice_empty_target_and_empty_prediction_is_zero():
    target = _target(0)
    assert soft_dice(torch.full_like(target, -BIG), target).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_dice_half_probabilities_by_hand():
    # logits 0 -> p = 0.5 on n pixels, k of them lesion: 1 - (2*0.5k + 1) / (0.5n + k + 1)
    n, k = 2 * 8 * 8, 16
    target = _target(k)
    expected = 1 - (k + 1) / (0.5 * n + k + 1)
    assert soft_dice(torch.zeros_like(target), target).item() == pytest.approx(expected, abs=1e-6)


def test_soft_dice_pools_over_batch():
    target = _target(8)  # all lesion pixels in sample 0
    logits = torch.full_like(target, -BIG)
    logits[0] = (target[0] * 2 - 1) * BIG
    assert soft_dice(logits, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("w", [0.0, 0.25, 0.5, 1.0])
def test_bce_dice_weights(w):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.6).float()
    expected = w * bce(logits, target) + (1 - w) * soft_dice(logits, target)
    assert bce_dice(logits, target, w).item() == pytest.approx(expected.item(), abs=1e-6)
    assert get_loss("bce+dice", bce_weight=w)(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)


def test_bce_dice_default_weight_is_half():
    target = _target(10)
    logits = torch.zeros_like(target)
    expected = 0.5 * bce(logits, target) + 0.5 * soft_dice(logits, target)
    assert bce_dice(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)


def test_registry_names():
    assert get_loss("bce") is bce
    assert get_loss("dice") is soft_dice
    assert set(LOSSES) == {"bce", "dice", "bce+dice"}


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_loss("nope")
    msg = str(info.value)
    assert "nope" in msg
    for name in LOSSES:
        assert name in msg


@pytest.mark.parametrize("name", ["bce", "dice", "bce+dice"])
def test_losses_are_differentiable_and_finite(name):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    loss = get_loss(name)(logits, target)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_half_precision_logits_computed_in_float32():
    target = _target(10)
    loss = get_loss("bce+dice")(torch.zeros_like(target).half(), target)
    assert loss.dtype == torch.float32


def test_one_hot_gives_one_indicator_per_label_background_none():
    labels = torch.tensor([[[[0, 1], [2, 2]]]])
    t = one_hot(labels, 3)
    assert t.shape == (1, 2, 2, 2)
    torch.testing.assert_close(t[0], torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]]))


def test_several_labels_losses_by_hand():
    labels = torch.randint(0, 3, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    target = one_hot(labels, 3)
    perfect = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).float() * BIG
    for name in LOSSES:
        assert get_loss(name, classes=3)(perfect, target).item() == pytest.approx(0.0, abs=1e-4), name
    zeros = torch.zeros((2, 3, 8, 8))
    assert ce(zeros, target).item() == pytest.approx(math.log(3), abs=1e-6)  # uniform softmax over 3 classes
    expected = 0.3 * ce(zeros, target) + 0.7 * soft_dice_labels(zeros, target)
    assert get_loss("bce+dice", 0.3, classes=3)(zeros, target).item() == pytest.approx(expected.item())
    assert get_loss("bce", classes=3) is ce and get_loss("dice", classes=3) is soft_dice_labels


def test_soft_dice_of_several_labels_is_the_mean_over_the_labels():
    target = torch.zeros((1, 2, 4, 4))
    target[0, 0, :2] = 1.0  # label 1: the top half; label 2: nowhere
    logits = torch.zeros((1, 3, 4, 4))
    logits[0, 1, :2], logits[0, 0, 2:] = BIG, BIG  # label 1 exactly right; label 2 never predicted: Dice (0+1)/(0+1)
    assert soft_dice_labels(logits, target).item() == pytest.approx(0.0, abs=1e-4)
    logits[0, 2] = 2 * BIG  # label 2 everywhere: its Dice 1 / (16 + 1), label 1's 1 / (8 + 1)
    assert soft_dice_labels(logits, target).item() == pytest.approx(1 - (1 / 17 + 1 / 9) / 2, abs=1e-4)
