"""Supervised training loop: seeded, time-budgeted, validated every epoch, resumable.

A model directory holds ``model.pt`` (best weights, a plain state dict), ``model.json``
(architecture, preprocessing, post-processing chosen on validation, version), ``config.json``,
``splits.json``, ``metrics.csv`` and ``checkpoint.pt`` (the last epoch, for ``--resume``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from medanomaly import config as config_mod
from medanomaly.atomic import atomic_torch_save, atomic_write_text
from medanomaly.augment import augment_batch
from medanomaly.config import TrainConfig
from medanomaly.data import SliceSet, discover, load_slices, resolve_splits
from medanomaly.errors import MedanomalyError
from medanomaly.losses import get_loss
from medanomaly.models import UNet, build_model
from medanomaly.runtime import autocast, choose_precision, set_seed

log = logging.getLogger(__name__)
METRIC_FIELDS = ["epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds", "images_per_s"]


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_val_dice: float
    epochs_run: int
    seconds: float


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, step: int, warmup_steps: int, progress: float) -> float:
    """Linear warm-up, then cosine decay over `progress` in [0, 1] (steps or time, whichever is further)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return cfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(train: SliceSet, cfg: TrainConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of batches; a `positive_fraction` of each batch comes from slices with lesion."""
    n = len(train)
    order = torch.randperm(n, generator=gen)
    steps = max(1, n // cfg.batch_size)
    batches = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(steps)]
    positives = torch.nonzero(train.masks.flatten(1).amax(1) > 0).flatten() if train.masks is not None else None
    n_pos = int(round(cfg.positive_fraction * cfg.batch_size))
    if positives is None or len(positives) == 0 or n_pos == 0:
        return batches
    out = []
    for b in batches:
        pick = positives[torch.randint(len(positives), (n_pos,), generator=gen)]
        out.append(torch.cat([pick, b[: cfg.batch_size - n_pos]]))
    return out


@torch.no_grad()
def validate(model: UNet, val: SliceSet, loss_fn, precision: str, device: torch.device, batch: int = 32) -> tuple[float, float]:
    """(mean loss, mean per-case Dice at probability 0.5) on the validation slices."""
    model.eval()
    stats: dict[str, np.ndarray] = {}
    losses = []
    for i in range(0, len(val), batch):
        x = val.images[i:i + batch].to(device).float()
        y = val.masks[i:i + batch].to(device).float()
        with autocast(device, precision):
            logits = model(_layout(x, model))
        losses.append(float(loss_fn(logits.float(), y)) * len(x))
        pred = (logits.float() > 0).flatten(1)
        truth = y.bool().flatten(1)
        tp, fp, fn = (pred & truth).sum(1), (pred & ~truth).sum(1), (~pred & truth).sum(1)
        for j, case in enumerate(val.cases[i:i + batch]):
            stats[case] = stats.get(case, np.zeros(3)) + [int(tp[j]), int(fp[j]), int(fn[j])]
    dices = [1.0 if (s[0] + s[1] + s[2]) == 0 else 2 * s[0] / (2 * s[0] + s[1] + s[2]) for s in stats.values()]
    return sum(losses) / max(1, len(val)), float(np.mean(dices)) if dices else float("nan")


def _layout(x: torch.Tensor, model: UNet) -> torch.Tensor:
    if x.ndim == 4 and next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _append_metrics(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _save_state(path: Path, model, opt, epoch: int, step: int, best: float, best_epoch: int, elapsed: float,
                gen: torch.Generator, bad_epochs: int) -> None:
    atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step": step,
                       "best": best, "best_epoch": best_epoch, "elapsed": elapsed, "rng": gen.get_state(),
                       "bad_epochs": bad_epochs}, path)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: refuse, never unpickle code
        raise MedanomalyError(f"cannot resume from {path}: {exc}; delete it to start afresh") from exc


def prepare(data: Path, out: Path, cfg: TrainConfig, splits_file, progress: bool) -> tuple[SliceSet, SliceSet, dict]:
    """Discover, split by case, load train and val slices; write splits.json and config.json."""
    samples = discover(data)
    labelled = [s for s in samples if s.mask is not None]
    if not labelled:
        raise MedanomalyError(f"no image/mask pairs found in {data}: supervised training needs masks named like "
                              "X_mask.png beside X.png, or images/ + masks/ folders (see README, 'Data layouts')")
    splits = resolve_splits(data, labelled, splits_file, cfg.seed)
    parts = {k: [s for s in labelled if s.case in set(v)] for k, v in splits.items()}
    if not parts["train"] or not parts["val"]:
        raise MedanomalyError(f"the split leaves {len(parts['train'])} training and {len(parts['val'])} validation "
                              f"images in {data}; at least one of each is needed (add cases or fix --splits)")
    train = load_slices(parts["train"], cfg.size, cfg.normalization, progress=progress)
    val = load_slices(parts["val"], cfg.size, cfg.normalization, progress=progress)
    if int(train.masks.sum()) == 0:
        raise MedanomalyError(f"every training mask in {data} is empty; supervised training needs lesions to learn "
                              "from (use --task anomaly for normal-only data)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "splits.json", json.dumps(splits, indent=1))
    config_mod.save(cfg, out / "config.json")
    return train, val, splits


def train(data: str | Path, out: str | Path, cfg: TrainConfig, splits_file: str | Path | None = None,
          resume: bool = False, device: str = "cpu", progress: bool = True) -> TrainResult:
    """Train a U-Net on the image/mask pairs in ``data``; write the model directory ``out``.

    The best epoch (mean per-case validation Dice) is kept; afterwards the threshold and
    post-processing are chosen on the validation split (:mod:`medanomaly.calibrate`).
    """
    from tqdm import tqdm

    from medanomaly.calibrate import calibrate_and_save

    data, out, dev = Path(data), Path(out), torch.device(device)
    ckpt_path = out / "checkpoint.pt"
    if resume and not ckpt_path.exists():
        raise MedanomalyError(f"--resume: no checkpoint.pt in {out}; run without --resume to start")
    if not resume and (out / "model.json").exists():
        raise MedanomalyError(f"{out} already holds a trained model; pass --resume to continue or choose a new --out")
    train_set, val_set, _ = prepare(data, out, cfg, splits_file, progress)
    set_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    in_ch = train_set.images.shape[1]
    model = build_model(replace(cfg.model, in_channels=in_ch, out_channels=1)).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    loss_fn = get_loss(cfg.loss, cfg.bce_weight)
    precision = choose_precision(cfg.precision, dev)
    start_epoch, step, best, best_epoch, elapsed, bad = 0, 0, -1.0, -1, 0.0, 0
    if resume:
        st = load_state(ckpt_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["rng"])
        start_epoch, step, best, best_epoch = st["epoch"] + 1, st["step"], st["best"], st["best_epoch"]
        elapsed, bad = st["elapsed"], st["bad_epochs"]
        log.info("resuming after epoch %d (best val Dice %.4f at epoch %d)", st["epoch"], best, best_epoch)
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total_steps, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else float("inf")
    log.info("training on %d slices (%d val), %s, precision %s, budget %.1f min",
             len(train_set), len(val_set), device, precision, cfg.max_minutes)
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        t0, model_losses = time.perf_counter(), []
        model.train()
        bar = tqdm(batch_indices(train_set, cfg, gen), desc=f"epoch {epoch}", unit="batch", disable=not progress,
                   leave=False)
        for idx in bar:
            progress_frac = max(step / total_steps, (elapsed + time.perf_counter() - t0) / budget)
            lr = lr_at(cfg, step, warmup, progress_frac)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = augment_batch(train_set.images[idx].float(), train_set.masks[idx].float(), cfg.augment, gen)
            x, y = _layout(x.to(dev), model), y.to(dev)
            with autocast(dev, precision):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            model_losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{model_losses[-1]:.4f}")
        val_loss, val_dice = validate(model, val_set, loss_fn, precision, dev)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        improved = val_dice > best
        if improved:
            best, best_epoch, bad = val_dice, epoch, 0
            atomic_torch_save(model.state_dict(), out / "model.pt")
        else:
            bad += 1
        _append_metrics(out / "metrics.csv", {
            "epoch": epoch, "train_loss": float(np.mean(model_losses)), "val_loss": val_loss, "val_dice": val_dice,
            "lr": lr, "seconds": seconds, "images_per_s": len(model_losses) * cfg.batch_size / seconds})
        _save_state(ckpt_path, model, opt, epoch, step, best, best_epoch, elapsed, gen, bad)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val Dice %.4f%s (%.0f s)", epoch,
                 np.mean(model_losses), val_loss, val_dice, " *" if improved else "", seconds)
        if bad >= cfg.patience:
            log.info("early stop: no validation improvement for %d epochs", cfg.patience)
            break
        if elapsed + seconds > budget * 1.02:  # the next epoch would overrun the budget
            log.info("time budget of %.1f min reached", cfg.max_minutes)
            break
    calibrate_and_save(out, model, cfg, data, in_ch, best_epoch, best, device=dev, progress=progress)
    return TrainResult(out, best_epoch, best, epoch + 1, elapsed)
