"""Semi-supervised training with unlabelled images: the mean teacher, and the configuration,
data and finished marker of the denoising pretraining stage (run by :func:`medanomaly.train.run.train`).

The teacher is an exponential moving average of the student's weights (Tarvainen & Valpola, "Mean
teachers are better role models", NeurIPS 2017; for segmentation: Perone & Cohen-Adad, "Deep
semi-supervised segmentation with weight-averaged consistency targets", DLMIA 2018). On unlabelled
images the student, given a noisy copy of the input, must predict what the teacher predicts on the
clean input (squared difference of probabilities); the weight of this consistency term ramps up as
``exp(-5 (1 - t)^2)`` over the first ``rampup_steps`` steps.

The pretraining stage trains a denoising model in ``MODEL/pretrain`` (no calibration: it is only
the ``--init`` of the supervised run) and marks it finished with ``MODEL/pretrain/finished.json``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, ContextManager

import torch

from medanomaly.config.options import DEFAULT_UNLABELLED_METHOD, UNLABELLED_METHODS
from medanomaly.config.schema import TrainConfig, pretrain_budget
from medanomaly.core import jsonio
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


PRETRAIN_DIR = "pretrain"  # the pretraining stage's own model directory, inside the run's
PRETRAIN_DONE = "finished.json"  # written there once that stage has trained to its end


def pretrain_config(cfg: TrainConfig) -> TrainConfig:
    """The self-supervised stage of ``--unlabelled`` with a pretrain method: the coarse-noise
    denoising of ``medanomaly pretrain`` (masks ignored), same architecture, for
    ``cfg.pretrain_share`` of the time budget and of the epochs."""
    anomaly = replace(cfg.anomaly, method="denoise", normal_only=False, select_map_on_val=False)
    minutes, _, epochs = pretrain_budget(cfg)
    return replace(cfg, task="anomaly", anomaly=anomaly, unlabelled=None, extra=None, init=None,
                   synthetic_lesions=0.0, max_minutes=minutes, epochs=epochs)


def pretrain_data(cfg: TrainConfig, data: Path, out: Path, splits: dict[str, list[str]]) -> tuple[Path, Path | None]:
    """(data folder, split file) of the pretraining stage. ``cfg.unlabelled`` is a folder
    (pretrained on alone, split by case with the run's seed) or the name of a list of case ids in
    ``splits``: then train + that list, validated on val, written to ``out/pretrain-splits.json``."""
    source = Path(cfg.unlabelled)
    if source.exists():
        return source, None
    splits_file = out / "pretrain-splits.json"
    if is_main():  # under torchrun, rank 0 writes it and the others wait for it
        atomic_write_text(splits_file, jsonio.dumps({"train": splits["train"] + splits[cfg.unlabelled],
                                                   "val": splits["val"], "test": splits.get("test", [])}))
    barrier()
    return data, splits_file


def pretrain_finished(target: Path) -> bool:
    """The pretraining stage in ``target`` trained to its end (a resumed run skips it). A model.json
    there is the marker of runs made before the stage wrote its own."""
    return (target / PRETRAIN_DONE).is_file() or (target / "model.json").is_file()


def mark_pretrain_finished(target: Path, summary: dict) -> None:
    """Write the finished marker (rank 0; every process waits, then reads the weights from ``target``)."""
    if is_main():
        jsonio.write_json(target / PRETRAIN_DONE, summary, indent=1)
    barrier()
