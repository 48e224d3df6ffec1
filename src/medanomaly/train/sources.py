"""Batch sources: what the one training loop (:func:`medanomaly.train.loop.fit`) draws its batches
from, and how it validates an epoch. The loop is the same for 2D and 3D; the source is what differs.

* :class:`SliceSource` (2D): an epoch is a permutation of the training slices in batches of
  ``cfg.batch_size``, a ``cfg.positive_fraction`` of each batch drawn from slices with lesion
  (supervised); validation is the mean per-case Dice at probability 0.5 on the val slices (several
  labels, ``cfg.labels``: of the most probable class, averaged over the labels), or minus the
  anomaly loss on them.
* :class:`PatchSource` (3D): an epoch is ``cfg.patches_per_epoch`` patches of ``cfg.patch`` voxels,
  ``cfg.patch_batch`` per step, a ``cfg.foreground_fraction`` (nnU-Net's 0.33) centred on a lesion
  voxel (anomaly task: a body voxel); validation is the mean per-case Dice of sliding-window
  predictions (:func:`medanomaly.infer.sliding.sliding_window`) on the val volumes at the training
  spacing, or minus the anomaly loss on a fixed set of val patches.

Both compute a step's loss with :func:`step_loss`. Every random draw comes from the loop's seeded
generator ``gen``, in a fixed order, so a seed gives the same run (and every DDP rank the same
global batch). Validation draws from a generator of its own (seed 12345): epochs are compared on
the same corruption and patches.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np
import torch

from medanomaly.anomaly.methods import anomaly_loss
from medanomaly.config.labels import network_classes
from medanomaly.config.schema import TrainConfig
from medanomaly.core import distributed
from medanomaly.core.runtime import autocast, choose_precision, match_layout
from medanomaly.data.augment import augment_batch
from medanomaly.data.slices import SliceSet
from medanomaly.data.synthetic import add_synthetic_lesions
from medanomaly.data.volumes import Volume, sample_patches
from medanomaly.infer.sliding import sliding_window
from medanomaly.metrics.functional import Stats, add_case, mean_case_dice
from medanomaly.models.losses import one_hot
from medanomaly.train.fewlabels import Extras

log = logging.getLogger(__name__)
VAL_OVERLAP = 0.5  # sliding-window overlap of the per-epoch 3D validation (inference uses the model file's)
VAL_SEED = 12345  # the corruption (and 3D patches) of the anomaly validation: the same every epoch
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BatchSource(Protocol):
    """What :func:`medanomaly.train.loop.fit` needs of a source (see the module docstring)."""

    steps: int  # optimizer steps per epoch
    batch_size: int  # the global batch: slices or patches per step, all processes together
    images_per_epoch: int  # slices or patches per epoch, for metrics.csv's images_per_s
    unit: str  # of the progress bar
    teacher: object | None  # a semisup.MeanTeacher to update after each step, or None

    def describe(self) -> str: ...
    def check_parallel(self) -> None: ...
    def batches(self, gen: torch.Generator) -> Sequence: ...
    def loss(self, model: torch.nn.Module, batch, gen: torch.Generator, step: int) -> torch.Tensor: ...
    def validate(self, model: torch.nn.Module) -> tuple[float, float]: ...
    def extra_state(self) -> dict: ...


def step_loss(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, cfg: TrainConfig,
              gen: torch.Generator, dev: torch.device, precision: str, loss_fn: LossFn,
              extras: Extras | None = None, step: int = 0) -> torch.Tensor:
    """Loss of one batch, images (N, C, H, W) or (N, C, D, H, W) float and masks (N, 1, ...) float:
    the segmentation loss on logits (after synthetic lesions, augmentation, plus the mean teacher's
    consistency term where ``extras`` hold them), or (anomaly) the anomaly loss, where ``masks`` are
    foreground masks and intensity augmentation is off (it would redefine normal)."""
    if cfg.task == "anomaly":
        aug = replace(cfg.augment, p_gamma=0.0, p_contrast=0.0, p_noise=0.0)
        x, fg = augment_batch(images, masks, aug, gen)
        return anomaly_loss(model, x.to(dev), fg.to(dev), cfg.anomaly, gen, autocast(dev, precision))
    extras = extras or Extras()
    classes = network_classes(cfg.labels)
    if classes > 1:  # several labels: one indicator channel per label, moved by augmentation as one mask each
        masks = one_hot(masks, classes)
    if cfg.synthetic_lesions > 0 and extras.lesion_stats is not None:
        images, masks = add_synthetic_lesions(images, masks, cfg.synthetic_lesions, extras.lesion_stats, gen)
    x, y = augment_batch(images, masks, cfg.augment, gen)
    x, y = match_layout(x.to(dev), model), y.to(dev)
    with autocast(dev, precision):
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    if extras.teacher is not None:  # mean teacher: consistency on a batch of unlabelled images
        pick = torch.randint(len(extras.unlabelled), (len(images),), generator=gen)
        xu, _ = augment_batch(extras.unlabelled.images[pick].float(), None, cfg.augment, gen)
        loss = loss + extras.teacher.consistency(model, match_layout(xu.to(dev), model), step, gen,
                                                 lambda: autocast(dev, precision))
    return loss


def batch_indices(train: SliceSet, cfg: TrainConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of batches; a `positive_fraction` of each batch comes from slices with lesion."""
    n = len(train)
    order = torch.randperm(n, generator=gen)
    steps = max(1, n // cfg.batch_size)
    batches = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(steps)]
    positives = torch.nonzero(train.lesion).flatten() if cfg.task == "supervised" else None
    n_pos = int(round(cfg.positive_fraction * cfg.batch_size))
    if positives is None or len(positives) == 0 or n_pos == 0:
        return batches
    out = []
    for b in batches:
        pick = positives[torch.randint(len(positives), (n_pos,), generator=gen)]
        out.append(torch.cat([pick, b[: cfg.batch_size - n_pos]]))
    return out


@torch.no_grad()
def mean_anomaly_loss(model: torch.nn.Module, x: torch.Tensor, fg: torch.Tensor, cfg: TrainConfig, precision: str,
                      dev: torch.device, batch: int, gen: torch.Generator) -> float:
    """Mean anomaly loss of images x (N, C, ...) with foreground fg (N, 1, ...), in batches, the
    corruption drawn from ``gen`` (seeded with :data:`VAL_SEED`: the same every epoch)."""
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        xb, fb = x[i:i + batch].float().to(dev), fg[i:i + batch].float().to(dev)
        total += float(anomaly_loss(model, xb, fb, cfg.anomaly, gen, autocast(dev, precision))) * len(xb)
    return total / max(1, len(x))


def _count(per_case: dict[str, Stats], pred: torch.Tensor, truth: torch.Tensor, cases: Sequence[str]) -> None:
    """Pool the counts of bool slices (n, P) into ``per_case`` by the slices' ``cases``."""
    tp, fp, fn = (pred & truth).sum(1), (pred & ~truth).sum(1), (~pred & truth).sum(1)
    for j, case in enumerate(cases):  # counted on the tensors: no per-slice numpy copies
        add_case(per_case, case, Stats(int(tp[j]), int(fp[j]), int(fn[j]), 0))


@torch.no_grad()
def validate_slices(model: torch.nn.Module, val: SliceSet, loss_fn: LossFn, precision: str, device: torch.device,
                    batch: int = 32, classes: int = 1) -> tuple[float, float]:
    """(mean loss, mean per-case Dice at probability 0.5) on the validation slices; several labels
    (``classes`` = labels + 1): the prediction is the most probable class, the score the mean over
    the labels of each label's mean per-case Dice."""
    model.eval()
    per_label: list[dict[str, Stats]] = [{} for _ in range(max(1, classes - 1))]
    losses = []
    for i in range(0, len(val), batch):
        x = val.images[i:i + batch].to(device).float()
        y = val.masks[i:i + batch].to(device).float()
        with autocast(device, precision):
            logits = model(match_layout(x, model))
        losses.append(float(loss_fn(logits.float(), y if classes == 1 else one_hot(y, classes))) * len(x))
        pred = logits.float() > 0 if classes == 1 else logits.float().argmax(1, keepdim=True)
        for k, per_case in enumerate(per_label):
            p, t = (pred, y.bool()) if classes == 1 else (pred == k + 1, y == k + 1)
            _count(per_case, p.flatten(1), t.flatten(1), val.cases[i:i + batch])
    score = mean_case_dice(per_label[0]) if classes == 1 else float(np.mean([mean_case_dice(d) for d in per_label]))
    return sum(losses) / max(1, len(val)), score


@torch.no_grad()
def validate_volumes(model: torch.nn.Module, vols: Sequence[Volume], loss_fn: LossFn, patch: Sequence[int],
                     precision: str, dev: torch.device, batch: int = 2) -> tuple[float, float]:
    """(mean loss, mean per-case Dice at probability 0.5) of sliding-window predictions on the
    val volumes, at the training spacing."""
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(dev, precision):
            return model(x.to(dev)).float().cpu()

    per_case: dict[str, Stats] = {}
    losses = []
    for v in vols:
        logits = sliding_window(v.image, patch, forward, VAL_OVERLAP, batch)
        losses.append(float(loss_fn(logits[None], v.mask.float()[None, None])))
        pred, truth = logits[0] > 0, v.mask.bool()
        add_case(per_case, v.case, Stats(int((pred & truth).sum()), int((pred & ~truth).sum()),
                                         int((~pred & truth).sum()), 0))
    return float(np.mean(losses)), mean_case_dice(per_case)


def precision_3d(model: torch.nn.Module, cfg: TrainConfig, dev: torch.device, in_ch: int) -> str:
    """cfg.precision resolved for 3D training: bf16 where chosen (runtime.choose_precision) unless
    one bf16 training step on random patches gives non-finite weight gradients, then fp32. PyTorch
    2.13's oneDNN bf16 Conv3d weight gradient returns NaN for some shapes on the CPU (e.g. 128 -> 64
    channels on 4 x 32 x 32 voxels, the third decoder level of a width-16 U-Net on 16 x 128 x 128
    patches); the check costs one step. Under torchrun rank 0 decides for every process."""
    precision = choose_precision(cfg.precision, dev)
    if precision != "bf16" or dev.type != "cpu":
        return precision
    probe = copy.deepcopy(model).train()
    x = torch.rand((cfg.patch_batch, in_ch) + tuple(cfg.patch), generator=torch.Generator().manual_seed(0))
    with autocast(dev, precision):
        out = probe(x)
    out.float().square().mean().backward()
    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in probe.parameters())
    if distributed.broadcast_object(finite):
        return precision
    log.warning("bf16 3D convolutions give non-finite gradients for this patch and network on this CPU "
                "(a oneDNN bug in PyTorch %s); training in fp32 (slower)", torch.__version__)
    return "fp32"


class SliceSource:
    """2D: batches of training slices (see the module docstring); ``extras`` add synthetic lesions
    and the mean teacher (:mod:`medanomaly.train.fewlabels`)."""

    unit = "batch"

    def __init__(self, train: SliceSet, val: SliceSet, cfg: TrainConfig, dev: torch.device, precision: str,
                 loss_fn: LossFn, extras: Extras | None = None):
        self.train, self.val, self.cfg, self.dev = train, val, cfg, dev
        self.precision, self.loss_fn = precision, loss_fn
        self.extras = extras or Extras()
        self.teacher = self.extras.teacher
        self.batch_size = cfg.batch_size
        self.steps = max(1, len(train) // cfg.batch_size)
        self.images_per_epoch = (len(train) // cfg.batch_size) * cfg.batch_size  # global: all processes together

    def describe(self) -> str:
        return f"training on {len(self.train)} slices ({len(self.val)} val)"

    def check_parallel(self) -> None:
        distributed.check_batch(self.cfg.batch_size, len(self.train))

    def batches(self, gen: torch.Generator) -> list[torch.Tensor]:
        return batch_indices(self.train, self.cfg, gen)

    def loss(self, model: torch.nn.Module, idx: torch.Tensor, gen: torch.Generator, step: int) -> torch.Tensor:
        return step_loss(model, self.train.images[idx].float(), self.train.masks[idx].float(), self.cfg, gen,
                         self.dev, self.precision, self.loss_fn, self.extras, step)

    def validate(self, model: torch.nn.Module) -> tuple[float, float]:
        if self.cfg.task == "anomaly":  # normal val slices; the score to maximise is minus the loss
            gen = torch.Generator().manual_seed(VAL_SEED)
            loss = mean_anomaly_loss(model, self.val.images, self.val.masks, self.cfg, self.precision, self.dev, 32,
                                     gen)
            return loss, -loss
        return validate_slices(model, self.val, self.loss_fn, self.precision, self.dev,
                               classes=network_classes(self.cfg.labels))

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.teacher.state_dict()} if self.teacher is not None else {}


class PatchSource:
    """3D: batches of patches of the training volumes (see the module docstring)."""

    unit = "step"
    teacher = None

    def __init__(self, train: Sequence[Volume], val: Sequence[Volume], cfg: TrainConfig, dev: torch.device,
                 precision: str, loss_fn: LossFn):
        self.train, self.val, self.cfg, self.dev = train, val, cfg, dev
        self.precision, self.loss_fn = precision, loss_fn
        self.batch_size = cfg.patch_batch
        self.steps = max(1, cfg.patches_per_epoch // cfg.patch_batch)
        self.images_per_epoch = self.steps * cfg.patch_batch

    def describe(self) -> str:
        return (f"3D training on {len(self.train)} volumes ({len(self.val)} val), patch {self.cfg.patch}, "
                f"{self.cfg.patches_per_epoch} patches per epoch")

    def check_parallel(self) -> None:
        distributed.check_batch(self.cfg.patch_batch)  # every rank draws the same global batch of patches

    def batches(self, gen: torch.Generator) -> range:
        return range(self.steps)  # the patches are drawn step by step, in loss()

    def loss(self, model: torch.nn.Module, batch: int, gen: torch.Generator, step: int) -> torch.Tensor:
        cfg = self.cfg
        x, y, _ = sample_patches(self.train, cfg.patch_batch, cfg.patch, cfg.foreground_fraction, gen)
        return step_loss(model, x, y, cfg, gen, self.dev, self.precision, self.loss_fn)

    def validate(self, model: torch.nn.Module) -> tuple[float, float]:
        cfg = self.cfg
        if cfg.task == "anomaly":  # 4 patches per val volume (at least 8), the same every epoch
            gen = torch.Generator().manual_seed(VAL_SEED)
            x, fg, _ = sample_patches(self.val, max(8, 4 * len(self.val)), cfg.patch, cfg.foreground_fraction, gen)
            loss = mean_anomaly_loss(model, x, fg, cfg, self.precision, self.dev, cfg.patch_batch, gen)
            return loss, -loss
        return validate_volumes(model, self.val, self.loss_fn, cfg.patch, self.precision, self.dev, cfg.patch_batch)

    def extra_state(self) -> dict:
        return {}
