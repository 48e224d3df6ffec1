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
from pathlib import Path
from typing import Callable, ContextManager

import torch

from medanomaly.config.options import DEFAULT_UNLABELLED_METHOD, UNLABELLED_METHODS
from medanomaly.core.atomic import atomic_write_text
from medanomaly.core.distributed import barrier, is_main
from medanomaly.core.errors import MedanomalyError


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




def resolve_method(method: str) -> str:
    """``auto`` -> :data:`DEFAULT_UNLABELLED_METHOD`; unknown names are an error listing the valid ones."""
    if method not in UNLABELLED_METHODS:
        raise MedanomalyError(f"unknown unlabelled method {method!r}; valid: {', '.join(UNLABELLED_METHODS)}")
    return DEFAULT_UNLABELLED_METHOD if method == "auto" else method


def pretrain_unlabelled(cfg, data: Path, out: Path, splits: dict[str, list[str]], device: str,
                        progress: bool) -> Path:
    """Self-supervised pretraining (the coarse-noise denoising of ``medanomaly pretrain``, masks
    ignored) on the labelled training images plus the unlabelled ones, for ``cfg.pretrain_share`` of
    the time budget, same architecture; writes ``out/pretrain`` (a model directory) and returns it.

    ``cfg.unlabelled`` is a folder (pretrained on alone, split by case with the run's seed) or the
    name of a list of case ids in ``splits`` (pretrained on train + that list, validated on val).
    """
    import json
    from dataclasses import replace

    from medanomaly.train.loop import train

    target = out / "pretrain"
    if (target / "model.json").exists():  # a resumed run that had finished its pretraining
        return target
    anomaly = replace(cfg.anomaly, method="denoise", normal_only=False, select_map_on_val=False)
    pre = replace(cfg, task="anomaly", anomaly=anomaly, unlabelled=None, extra=None, init=None, synthetic_lesions=0.0,
                  max_minutes=cfg.max_minutes * cfg.pretrain_share, epochs=max(1, round(cfg.epochs * cfg.pretrain_share)))
    source, splits_file = Path(cfg.unlabelled), None
    if not source.exists():  # a list of the split file: pretrain on train + that list
        source, splits_file = data, out / "pretrain-splits.json"

        if is_main():  # under torchrun, rank 0 writes it and the others wait for it
            atomic_write_text(splits_file, json.dumps({"train": splits["train"] + splits[cfg.unlabelled],
                                                       "val": splits["val"], "test": splits.get("test", [])}))
        barrier()
    train(source, target, pre, splits_file, device=device, progress=progress)
    return target
