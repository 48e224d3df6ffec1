"""The one training loop: 2D or 3D, supervised or anomaly, one process or data parallel (torchrun).

What differs between slices and patches is the batch source (:mod:`medanomaly.train.sources`).
A step: learning rate (warm-up, then cosine decay over steps or wall time, whichever is further
along), the source's batch and loss, backward, one fused check that loss and gradients are finite
(else the step is skipped, with a warning), the optimizer step and the mean teacher's. After each
epoch rank 0 validates; the best epoch goes to model.pt (the first always, even with a NaN score,
so model.pt exists), a row to metrics.csv, the state to checkpoint.pt. The run stops after
``cfg.epochs``, after ``cfg.patience`` epochs without improvement, or before an epoch that would
overrun ``cfg.max_minutes``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medanomaly.config.schema import TrainConfig
from medanomaly.core import distributed
from medanomaly.core.atomic import atomic_torch_save
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.runtime import compile_model
from medanomaly.models.init import set_encoder_trainable
from medanomaly.train.checkpoint import RunState, append_metrics, save_state
from medanomaly.train.sources import BatchSource

log = logging.getLogger(__name__)


def lr_at(cfg: TrainConfig, step: int, warmup_steps: int, progress: float) -> float:
    """Linear warm-up, then cosine decay over `progress` in [0, 1] (steps or time, whichever is further)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return cfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def finite(loss: torch.Tensor, model: torch.nn.Module) -> bool:
    """Loss and every gradient finite. One fused reduction (the gradient norms, as clip_grad_norm_
    computes them) and one sync per step; only when that says no are the tensors checked one by one,
    so a finite norm overflowing float32 (|g| > 1e19) never skips a step."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if bool(torch.stack([loss.detach().float(), *torch._foreach_norm(grads)]).isfinite().all()):
        return True
    return all(bool(t.isfinite().all()) for t in (loss.detach(), *grads))


def run_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, source: BatchSource, cfg: TrainConfig,
              gen: torch.Generator, state: RunState, budget: float, progress: bool) -> tuple[float, float]:
    """One epoch of ``source.steps`` optimizer steps; returns (mean loss of the steps taken, last lr)."""
    t0, losses, lr = time.perf_counter(), [], cfg.lr
    total_steps, warmup = cfg.epochs * source.steps, int(cfg.warmup_epochs * source.steps)
    model.train()
    bar = tqdm(source.batches(gen), desc=f"epoch {state.epoch + 1}", unit=source.unit, disable=not progress,
               leave=False)
    for batch in bar:
        lr = lr_at(cfg, state.step, warmup, max(state.step / total_steps,
                                                 (state.elapsed + time.perf_counter() - t0) / budget))
        if math.isfinite(budget):  # a time-based schedule follows rank 0's clock on every process
            lr = distributed.broadcast_object(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = source.loss(model, batch, gen, state.step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if finite(loss, model):  # the gradients are all-reduced: every process decides the same
            opt.step()
            if source.teacher is not None:
                source.teacher.update(model, state.step)
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        else:
            log.warning("step %d: non-finite loss or gradients; step skipped", state.step)
            opt.zero_grad(set_to_none=True)
        state.step += 1
    return (float(np.mean(losses)) if losses else math.nan), lr


def check_parallel(source: BatchSource, cfg: TrainConfig) -> None:
    """Under torchrun: the global batch splits evenly (and --compile, one process only, is refused)."""
    world = distributed.world_size()
    if world > 1:
        if cfg.compile:
            raise MedanomalyError("--compile runs in one process; start the run without torchrun or drop --compile")
        source.check_parallel()
        log.info("data parallel: %d processes, global batch %d (%d per process)", world, source.batch_size,
                 source.batch_size // world)


def step_network(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """What the training steps run: ``model`` itself, or its data-parallel wrapper under torchrun,
    compiled with --compile (validation runs the eager model: one compiled graph, training mode only)."""
    step_model = distributed.data_parallel(model)
    return compile_model(step_model) if cfg.compile else step_model


def fit(model: torch.nn.Module, opt: torch.optim.Optimizer, source: BatchSource, cfg: TrainConfig, out: Path,
        gen: torch.Generator, state: RunState, device: torch.device, precision: str, progress: bool = True) -> RunState:
    """Train ``model`` on ``source`` from ``state`` (fresh or resumed) until a stop; write model.pt,
    metrics.csv and checkpoint.pt into ``out`` (rank 0). Returns the final state.

    Under torchrun ``source.batch_size`` is the global batch: every process draws it and computes
    its share (:func:`medanomaly.core.distributed.data_parallel`); rank 0 validates and writes."""
    budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else float("inf")
    log.info("%s, %s, precision %s, budget %.1f min", source.describe(), device, precision, cfg.max_minutes)
    check_parallel(source, cfg)
    trainable, step_model = None, model
    for epoch in range(state.epoch + 1, cfg.epochs):
        if state.elapsed >= budget or state.bad_epochs >= cfg.patience:  # resumed after the end
            break
        if cfg.freeze_encoder_epochs > 0:  # a pretrained encoder first adapts its decoder, then all
            set_encoder_trainable(model, epoch >= cfg.freeze_encoder_epochs)
        if trainable != (now := [p.requires_grad for p in model.parameters()]):  # DDP registers them once
            trainable, step_model = now, step_network(model, cfg)
        t0 = time.perf_counter()
        train_loss, lr = run_epoch(step_model, opt, source, cfg, gen, state, budget, progress)
        # rank 0 validates; every process takes its numbers, so stopping decisions agree
        val_loss, val_score = source.validate(model) if distributed.is_main() else (math.nan, math.nan)
        val_loss, val_score, seconds = distributed.broadcast_object((val_loss, val_score, time.perf_counter() - t0))
        end_epoch(model, opt, source, cfg, out, gen, state, epoch, seconds, {
            "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
            "val_dice": val_score if cfg.task == "supervised" else math.nan, "lr": lr, "seconds": seconds,
            "images_per_s": source.images_per_epoch / seconds}, val_score)
        if state.bad_epochs >= cfg.patience:
            log.info("early stop: no validation improvement for %d epochs", cfg.patience)
            break
        if state.elapsed + seconds > budget * 1.02:  # the next epoch would overrun the budget
            log.info("time budget of %.1f min reached", cfg.max_minutes)
            break
    return state


def end_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, source: BatchSource, cfg: TrainConfig, out: Path,
              gen: torch.Generator, state: RunState, epoch: int, seconds: float, row: dict, val_score: float) -> None:
    """Count the epoch in ``state``; keep the model if it improved (or is the first: a NaN score
    still gives a model.pt), append its metrics.csv row and save the checkpoint (rank 0)."""
    state.epoch, state.elapsed = epoch, state.elapsed + seconds
    best = -math.inf if math.isnan(state.best) else state.best  # a NaN best is beaten by any number
    improved = val_score > best or state.best_epoch < 0
    if improved:
        state.best, state.best_epoch, state.bad_epochs = val_score, epoch, 0
        if distributed.is_main():
            atomic_torch_save(model.state_dict(), out / "model.pt")
    else:
        state.bad_epochs += 1
    if distributed.is_main():
        append_metrics(out / "metrics.csv", row)
        save_state(out / "checkpoint.pt", model, opt, gen, state, source.extra_state())
    log.info("epoch %d: train loss %.4f, val loss %.4f, val score %.4f%s (%.0f s)", epoch, row["train_loss"],
             row["val_loss"], val_score, " *" if improved else "", seconds)
