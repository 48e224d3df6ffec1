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


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"bce": bce, "dice": soft_dice, "bce+dice": bce_dice}


def get_loss(name: str, bce_weight: float = 0.5) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss called ``name``; ValueError listing the valid names otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    if name == "bce+dice":
        return lambda logits, target: bce_dice(logits, target, bce_weight)
    return LOSSES[name]
