"""Segmentation losses on logits: pure functions, and a registry whose errors list the keys."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy. logits, target (N, 1, *S); target in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, pooled over the batch (as nnU-Net's batch Dice), so that slices without
    lesion do not each contribute a noisy 0/0 term. logits, target (N, 1, *S)."""
    prob = torch.sigmoid(logits.float())
    target = target.float()
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + smooth) / (prob.sum() + target.sum() + smooth)


def bce_dice(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.5) -> torch.Tensor:
    """bce_weight * BCE + (1 - bce_weight) * soft Dice loss."""
    return bce_weight * bce(logits, target) + (1.0 - bce_weight) * soft_dice(logits, target)


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Class indices (N, 1, *S) (0 background, 1..K the labels; any dtype) -> (N, K, *S) float
    indicators of the K = ``classes`` - 1 labels (background: none of them): the multi-label target."""
    index = labels[:, 0].long()
    return torch.stack([(index == k) for k in range(1, classes)], dim=1).float()


def _indices(target: torch.Tensor) -> torch.Tensor:
    """(N, K, *S) label indicators -> (N, *S) class indices (0 where no label is on)."""
    weights = torch.arange(1, target.shape[1] + 1, device=target.device, dtype=torch.float32)
    return torch.einsum("nk...,k->n...", target.float(), weights).round().long()


def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of softmax logits (N, K + 1, *S) against label indicators (N, K, *S)."""
    return F.cross_entropy(logits.float(), _indices(target))


def soft_dice_labels(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - the mean over the K foreground labels of the soft Dice of their softmax probability,
    pooled over the batch (as :func:`soft_dice`). logits (N, K + 1, *S), target (N, K, *S)."""
    prob = torch.softmax(logits.float(), dim=1)[:, 1:]
    target = target.float()
    dims = (0,) + tuple(range(2, prob.ndim))
    inter = (prob * target).sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (prob.sum(dims) + target.sum(dims) + smooth)).mean()


def ce_dice(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.5) -> torch.Tensor:
    """Several labels: bce_weight * cross-entropy + (1 - bce_weight) * soft Dice over the labels."""
    return bce_weight * ce(logits, target) + (1.0 - bce_weight) * soft_dice_labels(logits, target)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"bce": bce, "dice": soft_dice, "bce+dice": bce_dice}
#: the same names for several labels (softmax): bce is the cross-entropy
LABEL_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"bce": ce, "dice": soft_dice_labels, "bce+dice": ce_dice}


def get_loss(name: str, bce_weight: float = 0.5,
             classes: int = 1) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss called ``name``, on one logit (``classes`` 1: binary; target (N, 1, *S)) or on
    softmax logits of ``classes`` = labels + 1 channels (target: label indicators (N, K, *S),
    :func:`one_hot`); ValueError listing the valid names otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    table, combined = (LOSSES, bce_dice) if classes == 1 else (LABEL_LOSSES, ce_dice)
    if name == "bce+dice":
        return lambda logits, target: combined(logits, target, bce_weight)
    return table[name]
