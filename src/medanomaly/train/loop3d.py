"""3D training (``train --dim 3``): a 3D U-Net on patches of volumes, for both tasks.

Each volume case (:mod:`medanomaly.data.volumes`: a 3D file, a DICOM series, or a folder of ordered
2D slices) is normalised, resampled to one target spacing (default: the median spacing of the
training volumes) and kept in memory. An epoch draws ``cfg.patches_per_epoch`` patches of
``cfg.patch`` voxels, ``cfg.patch_batch`` per step; a share ``cfg.foreground_fraction`` (nnU-Net's
0.33) is centred on a lesion voxel (anomaly task: a body voxel). Augmentation: left-right flips
and the intensity transforms (:func:`medanomaly.data.augment.augment_batch`, 3D path). Validation:
the mean per-case Dice of sliding-window predictions (:func:`medanomaly.infer.sliding.sliding_window`)
on the val volumes at the training spacing, or for the anomaly task minus the denoising loss on
a fixed set of val patches. The rest is :mod:`medanomaly.train.loop`'s: seeded, time-budgeted,
resumable, the best epoch kept, threshold and post-processing chosen on val
(:mod:`medanomaly.calibrate.search`, on the original grids). The model directory's ``model.json`` says
``input.dim`` 3 with the patch and spacing, which :class:`medanomaly.infer.predictor.Predictor` follows.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medanomaly.anomaly.methods import anomaly_loss, output_channels
from medanomaly.config import schema as config_mod
from medanomaly.config.schema import TrainConfig
from medanomaly.core import distributed as distributed
from medanomaly.core.atomic import atomic_torch_save, atomic_write_text
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.runtime import autocast, choose_precision, set_seed
from medanomaly.data.augment import augment_batch
from medanomaly.data.volumes import (
    PATCH_VOXELS,
    Volume,
    check_3d_config,
    default_patch,
    group_volumes,
    load_volumes,
    median_spacing,
    sample_patches,
    volume_spacing,
    with_resolved,
)
from medanomaly.infer.sliding import sliding_window
from medanomaly.metrics.functional import Stats, dice
from medanomaly.models.build import build_model
from medanomaly.models.init import load_matching, read_state_dict
from medanomaly.models.losses import get_loss

log = logging.getLogger(__name__)
VAL_OVERLAP = 0.5  # sliding-window overlap of the per-epoch validation (inference uses model.json's)


def prepare3d(data: Path, out: Path, cfg: TrainConfig, splits_file, device: torch.device,
              progress: bool) -> tuple[list[Volume], list[Volume], TrainConfig]:
    """Discover, split by case, load the train and val volumes at the target spacing; resolve
    the patch and spacing into the config; write splits.json and config.json."""
    from medanomaly.train.loop import usable_and_splits

    usable, splits = usable_and_splits(data, cfg, splits_file)
    cases = group_volumes(usable)
    parts = {k: [vc for vc in cases if vc.case in set(v)] for k, v in splits.items()}
    if not parts["train"] or not parts["val"]:
        raise MedanomalyError(f"the split leaves {len(parts['train'])} training and {len(parts['val'])} validation "
                              f"volumes in {data}; at least one of each is needed (add cases or fix --splits)")
    source = "given" if cfg.spacing else "median of the training volumes"
    spacing = cfg.spacing or median_spacing([volume_spacing(vc) for vc in parts["train"]])
    train = load_volumes(parts["train"], spacing, cfg.normalization, cfg.task, progress)
    val = load_volumes(parts["val"], spacing, cfg.normalization, cfg.task, progress)
    if cfg.task == "anomaly" and cfg.anomaly.normal_only:
        train, val = _normal(train, data, "train"), _normal(val, data, "val")
    elif cfg.task == "supervised" and not any(v.lesion for v in train):
        raise MedanomalyError(f"every training mask in {data} is empty; supervised training needs lesions to learn "
                              "from (use --task anomaly for normal-only data)")
    shapes = np.median([v.image.shape[1:] for v in train], axis=0)
    patch = cfg.patch or default_patch(shapes, spacing, cfg.model.depth, PATCH_VOXELS.get(device.type, 2**18))
    cfg = with_resolved(cfg, patch, spacing)
    log.info("3D: %d train / %d val volumes at spacing %s (%s), median shape %s voxels, patch %s voxels",
             len(train), len(val), cfg.spacing, source,
             tuple(int(s) for s in shapes), cfg.patch)
    if distributed.is_main():  # under torchrun, rank 0 alone writes files
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "splits.json", json.dumps(splits, indent=1))
        config_mod.save(cfg, out / "config.json")
    return train, val, cfg


def _normal(vols: list[Volume], data: Path, split: str) -> list[Volume]:
    normal = [v for v in vols if not v.lesion]
    if not normal:
        raise MedanomalyError(f"no volume without lesion in the {split} split of {data}: the 3D anomaly task learns "
                              "from normal volumes (no mask, or an empty one)")
    return normal


def precision_3d(model: torch.nn.Module, cfg: TrainConfig, dev: torch.device, in_ch: int) -> str:
    """cfg.precision resolved for 3D training: bf16 where chosen (runtime.choose_precision) unless
    one bf16 training step on random patches gives non-finite weight gradients, then fp32. PyTorch
    2.13's oneDNN bf16 Conv3d weight gradient returns NaN for some shapes on the CPU (e.g. 128 -> 64
    channels on 4 x 32 x 32 voxels, the third decoder level of a width-16 U-Net on 16 x 128 x 128
    patches); the check costs one step. Under torchrun rank 0 decides for every process."""
    import copy

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


def _forward_fn(model: torch.nn.Module, dev: torch.device, precision: str):
    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(dev, precision):
            return model(x.to(dev)).float().cpu()
    return forward


@torch.no_grad()
def validate3d(model: torch.nn.Module, vols: Sequence[Volume], loss_fn, patch: Sequence[int], precision: str,
               dev: torch.device, batch: int = 2) -> tuple[float, float]:
    """(mean loss, mean per-case Dice at probability 0.5) of sliding-window predictions on the
    val volumes, at the training spacing."""
    model.eval()
    stats: dict[str, Stats] = {}
    losses = []
    for v in vols:
        logits = sliding_window(v.image, patch, _forward_fn(model, dev, precision), VAL_OVERLAP, batch)
        y = v.mask.float()[None, None]
        losses.append(float(loss_fn(logits[None], y)))
        pred, truth = logits[0] > 0, v.mask.bool()
        s = Stats(int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum()), 0)
        stats[v.case] = stats[v.case] + s if v.case in stats else s
    return float(np.mean(losses)), float(np.mean([dice(s) for s in stats.values()]))


@torch.no_grad()
def validate_anomaly3d(model: torch.nn.Module, vols: Sequence[Volume], cfg: TrainConfig, precision: str,
                       dev: torch.device) -> tuple[float, float]:
    """(mean loss, its negative) of the anomaly objective on a fixed, seeded set of val patches
    (4 per volume, at least 8), so epochs are compared on the same patches and noise."""
    model.eval()
    gen = torch.Generator().manual_seed(12345)
    x, fg, _ = sample_patches(vols, max(8, 4 * len(vols)), cfg.patch, cfg.foreground_fraction, gen)
    total = 0.0
    for i in range(0, len(x), cfg.patch_batch):
        xb, fb = x[i:i + cfg.patch_batch].to(dev), fg[i:i + cfg.patch_batch].to(dev)
        total += float(anomaly_loss(model, xb, fb, cfg.anomaly, gen, autocast(dev, precision))) * len(xb)
    loss = total / len(x)
    return loss, -loss


def step_loss3d(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, gen: torch.Generator,
                dev: torch.device, precision: str, loss_fn) -> torch.Tensor:
    """Loss of one batch of patches x (N, C, D, H, W), y (N, 1, D, H, W): segmentation loss, or
    (anomaly) the denoising loss with y the body foreground and no intensity augmentation."""
    if cfg.task == "anomaly":
        aug = replace(cfg.augment, p_gamma=0.0, p_contrast=0.0, p_noise=0.0)
        xa, fg = augment_batch(x, y, aug, gen)
        return anomaly_loss(model, xa.to(dev), fg.to(dev), cfg.anomaly, gen, autocast(dev, precision))
    xa, ya = augment_batch(x, y, cfg.augment, gen)
    with autocast(dev, precision):
        logits = model(xa.to(dev))
    return loss_fn(logits.float(), ya.to(dev))


def run_epoch3d(model, opt, vols: Sequence[Volume], cfg: TrainConfig, gen: torch.Generator, state, budget: float,
                dev: torch.device, precision: str, loss_fn, progress: bool) -> tuple[float, float, int]:
    """One epoch of ``patches_per_epoch // patch_batch`` steps; (mean loss, last lr, patches seen)."""
    from tqdm import tqdm

    from medanomaly.train.loop import lr_at

    t0, losses, lr = time.perf_counter(), [], cfg.lr
    steps = max(1, cfg.patches_per_epoch // cfg.patch_batch)
    total_steps, warmup = cfg.epochs * steps, int(cfg.warmup_epochs * steps)
    model.train()
    bar = tqdm(range(steps), desc=f"epoch {state.epoch + 1}", unit="step", disable=not progress, leave=False)
    for _ in bar:
        lr = lr_at(cfg, state.step, warmup, max(state.step / total_steps,
                                                 (state.elapsed + time.perf_counter() - t0) / budget))
        if math.isfinite(budget):  # a time-based schedule follows rank 0's clock on every process
            lr = distributed.broadcast_object(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y, _ = sample_patches(vols, cfg.patch_batch, cfg.patch, cfg.foreground_fraction, gen)
        loss = step_loss3d(model, x, y, cfg, gen, dev, precision, loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not bool(torch.isfinite(torch.stack([g.float().abs().sum() for g in grads])).all()):
            log.warning("step %d: non-finite loss or gradients; step skipped", state.step)
            opt.zero_grad(set_to_none=True)
            state.step += 1
            continue
        opt.step()
        state.step += 1
        losses.append(loss.detach().item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return float(np.mean(losses)), lr, steps * cfg.patch_batch


def train3d(data: str | Path, out: str | Path, cfg: TrainConfig, splits_file: str | Path | None = None,
            resume: bool = False, device: str = "cpu", progress: bool = True):
    """Train a 3D U-Net on patches of the volumes in ``data``; write the model directory ``out``
    (the same files as :func:`medanomaly.train.loop.train`). Returns a :class:`~medanomaly.train.loop.TrainResult`."""
    from medanomaly.calibrate.search import calibrate_and_save
    from medanomaly.train.loop import (
        METRIC_FIELDS,
        RunState,
        TrainResult,
        _append_metrics,
        _check_init_channels,
        _remove_stale_temp_files,
        _resume,
        _save_state,
        check_out_dir,
        make_optimizer,
    )

    assert "images_per_s" in METRIC_FIELDS  # metrics.csv: patches per second in that column
    check_3d_config(cfg)
    distributed.check_batch(cfg.patch_batch)  # under torchrun: the global batch of patches
    data, out, dev = Path(data), Path(out), torch.device(device)
    ckpt_path = check_out_dir(out, resume)
    if distributed.is_main():
        _remove_stale_temp_files(out)
    if cfg.init and not resume:
        read_state_dict(cfg.init)
    train_vols, val_vols, cfg = prepare3d(data, out, cfg, splits_file, dev, progress)
    in_ch = int(train_vols[0].image.shape[0])
    main = distributed.is_main()
    if cfg.task == "anomaly" and cfg.anomaly.method == "intensity":  # a baseline: nothing to train
        if main:
            calibrate_and_save(out, cfg, data, in_ch, -1, float("nan"), device=dev, progress=progress)
        distributed.barrier()
        return TrainResult(out, -1, float("nan"), 0, 0.0)
    if cfg.model.norm == "batch" and cfg.patch_batch < 8:
        log.warning("batch norm with %d patches per step is noisy; --norm instance is the 3D choice (nnU-Net)",
                    cfg.patch_batch)
    set_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out_ch = output_channels(cfg.anomaly.method, in_ch) if cfg.task == "anomaly" else 1
    model = build_model(replace(cfg.model, in_channels=in_ch, out_channels=out_ch)).to(dev)
    if cfg.init and not resume:
        _check_init_channels(cfg.init, in_ch)
        load_matching(model, cfg.init)
    opt = make_optimizer(model, cfg)
    loss_fn = get_loss(cfg.loss, cfg.bce_weight)
    precision = precision_3d(model, cfg, dev, in_ch)
    if resume:
        state = _resume(ckpt_path, model, opt, gen, out / "metrics.csv")
    else:
        state = RunState()
        if main:
            (out / "metrics.csv").unlink(missing_ok=True)
    step_model = distributed.data_parallel(model)  # every rank draws the same global batch of patches
    budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else float("inf")
    log.info("3D training on %d volumes (%d val), patch %s, %d patches per epoch, %s, precision %s, budget %.1f min",
             len(train_vols), len(val_vols), cfg.patch, cfg.patches_per_epoch, device, precision, cfg.max_minutes)
    for epoch in range(state.epoch + 1, cfg.epochs):
        if state.elapsed >= budget or state.bad_epochs >= cfg.patience:
            break
        t0 = time.perf_counter()
        train_loss, lr, n_patches = run_epoch3d(step_model, opt, train_vols, cfg, gen, state, budget, dev, precision,
                                                loss_fn, progress)
        if not main:  # rank 0 validates; every process takes its numbers, so stopping decisions agree
            val_loss, val_score = math.nan, math.nan
        elif cfg.task == "anomaly":
            val_loss, val_score = validate_anomaly3d(model, val_vols, cfg, precision, dev)
        else:
            val_loss, val_score = validate3d(model, val_vols, loss_fn, cfg.patch, precision, dev, cfg.patch_batch)
        val_loss, val_score, seconds = distributed.broadcast_object((val_loss, val_score, time.perf_counter() - t0))
        state.epoch, state.elapsed = epoch, state.elapsed + seconds
        improved = val_score > state.best or state.best_epoch < 0  # a NaN score still keeps the first epoch
        if improved:
            state.best, state.best_epoch, state.bad_epochs = val_score, epoch, 0
            if main:
                atomic_torch_save(model.state_dict(), out / "model.pt")
        else:
            state.bad_epochs += 1
        if main:
            _append_metrics(out / "metrics.csv", {
                "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                "val_dice": val_score if cfg.task == "supervised" else math.nan, "lr": lr, "seconds": seconds,
                "images_per_s": n_patches / seconds})
            _save_state(ckpt_path, model, opt, gen, state)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val score %.4f%s (%.0f s)", epoch, train_loss, val_loss,
                 val_score, " *" if improved else "", seconds)
        if state.bad_epochs >= cfg.patience:
            log.info("early stop: no validation improvement for %d epochs", cfg.patience)
            break
        if state.elapsed + seconds > budget * 1.02:
            log.info("time budget of %.1f min reached", cfg.max_minutes)
            break
    if main:
        calibrate_and_save(out, cfg, data, in_ch, state.best_epoch, state.best, device=dev, progress=progress)
    distributed.barrier()  # the other processes return once model.json is written
    return TrainResult(out, state.best_epoch, state.best, state.epoch + 1, state.elapsed)
