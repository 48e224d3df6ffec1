"""Semi-supervised training with unlabelled images: mean teacher.

The teacher is an exponential moving average of the student's weights (Tarvainen & Valpola, "Mean
teachers are better role models", NeurIPS 2017; for segmentation: Perone & Cohen-Adad, "Deep
semi-supervised segmentation with weight-averaged consistency targets", DLMIA 2018). On unlabelled
images the student, given a noisy copy of the input, must predict what the teacher predicts on the
clean input (squared difference of probabilities); the weight of this consistency term ramps up as
``exp(-5 (1 - t)^2)`` over the first ``rampup_steps`` steps.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, ContextManager

import torch


class MeanTeacher:
    """A teacher network kept as the EMA of a student; ``consistency`` gives the unlabelled loss."""

    def __init__(self, student: torch.nn.Module, decay: float = 0.99, weight: float = 1.0,
                 rampup_steps: int = 1000, noise_std: float = 0.05):
        self.teacher = copy.deepcopy(student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.decay, self.weight, self.rampup_steps, self.noise_std = decay, weight, rampup_steps, noise_std

    def ramp(self, step: int) -> float:
        t = min(1.0, step / max(1, self.rampup_steps))
        return self.weight * math.exp(-5.0 * (1.0 - t) ** 2)

    @torch.no_grad()
    def update(self, student: torch.nn.Module, step: int) -> None:
        """teacher <- a * teacher + (1 - a) * student, with a = min(decay, 1 - 1/(step + 1))."""
        a = min(self.decay, 1.0 - 1.0 / (step + 1))
        for t, s in zip(self.teacher.parameters(), student.parameters()):
            t.mul_(a).add_(s.detach(), alpha=1.0 - a)
        for t, s in zip(self.teacher.buffers(), student.buffers()):  # batch-norm statistics
            t.copy_(s)

    def consistency(self, student: torch.nn.Module, x: torch.Tensor, step: int, gen: torch.Generator,
                    autocast: Callable[[], ContextManager]) -> torch.Tensor:
        """Weighted mean squared difference of student(x + noise) and teacher(x) probabilities.
        x (N, C, H, W) unlabelled images (already augmented); ``autocast()`` gives a fresh context."""
        noise = torch.randn(x.shape, generator=gen).to(x.device) * self.noise_std
        with torch.no_grad(), autocast():
            target = torch.sigmoid(self.teacher(x).float())
        with autocast():
            pred = torch.sigmoid(student(x + noise).float())
        return self.ramp(step) * ((pred - target) ** 2).mean()
