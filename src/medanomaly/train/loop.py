"""The one training loop: 2D or 3D, supervised or anomaly, one process or data parallel (torchrun).

What differs between slices and patches is the batch source (:mod:`medanomaly.train.sources`).
A step: learning rate (warm-up, then cosine decay over steps or wall time, whichever is further
along), the source's batch and loss, backward, one fused check that loss and gradients are finite
(else the step is skipped, with a warning), the optimizer step and the mean teacher's. After each
epoch rank 0 validates; the best epoch goes to model.pt (the first always, even with a NaN score,
so model.pt exists), a row to metrics.csv, the state to checkpoint.pt. The run stops after
``cfg.epochs``, after ``cfg.patience`` epochs without improvement, or when ``cfg.max_minutes`` is
spent: the budget is checked before every step (under torchrun on rank 0's clock, broadcast with the
learning rate, so every process stops at the same step), keeping the last validation's time free;
the partial epoch is validated and recorded as any other.

The images the steps draw are counted (:attr:`RunState.images_seen`, kept across resumes). Where the
plan measured this machine's speed (``cfg.plan_images_per_s``), a run that trains at less than
:data:`BEHIND` of it, e.g. on a busy machine, says so once, with the numbers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medanomaly.config.schema import TrainConfig
from medanomaly.core import distributed
from medanomaly.core.atomic import atomic_torch_save
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.progress import track
from medanomaly.core.runtime import compile_model
from medanomaly.models.init import set_encoder_trainable
from medanomaly.train.checkpoint import RunState, append_metrics, save_state
from medanomaly.train.curves import after_epoch
from medanomaly.train.sources import BatchSource

log = logging.getLogger(__name__)
#: images a run should see; the plan chooses the largest input size whose measured speed reaches it
#: within the budget. From the LGG runs (README "plan"): at 128 px 21 000 images gave a per-patient
#: test Dice of 0.805, 33 000-40 000 gave 0.82-0.83; at 64 px 38 000 gave only 0.773 and at 112 px
#: 60 000 gave 0.843: above ~24 000 images resolution matters more than more images, below it the run
#: is short of training. (40 000 before: on a slow 2-core machine it shrank the input to 64 px.)
MIN_IMAGES = 24_000
BEHIND = 0.75  # a run training at less than this share of the plan's measured speed is told so
clock = time.perf_counter  # the loop's clock (seconds): the budget, the epoch times (a test may replace it)


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


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, source: BatchSource, batch, gen: torch.Generator,
               step: int) -> float | None:
    """One optimizer step on ``batch``: the source's loss, backward, the finite check, the optimizer
    (and mean teacher) step. Returns the loss, or None where the step was skipped (non-finite)."""
    loss = source.loss(model, batch, gen, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if finite(loss, model):  # the gradients are all-reduced: every process decides the same
        opt.step()
        if source.teacher is not None:
            source.teacher.update(model, step)
        return loss.detach().item()
    opt.zero_grad(set_to_none=True)
    return None


def batch_images(batch, source: BatchSource) -> int:
    """Images (slices, patches) of one global batch: an index tensor's length, else the source's batch."""
    return len(batch) if isinstance(batch, torch.Tensor) else source.batch_size


@dataclass
class Pace:
    """This run's training speed (steps only, no validation) against the plan's measured one."""

    planned: float | None  # img/s the plan measured for these settings (cfg.plan_images_per_s); None: no plan
    budget: float  # seconds (inf: none)
    images: int = 0  # drawn by this process's steps since it started (a resumed run: since the resume)
    seconds: float = 0.0  # of those steps
    wall: float = 0.0  # of those epochs, validation included
    warned: bool = False

    def check(self, state: RunState, spent: float, images: int = 0, seconds: float = 0.0) -> None:
        """Warn once when the run is behind the plan: below :data:`BEHIND` of the planned speed.
        ``spent``: training seconds of the whole run so far (``state.elapsed`` plus the running epoch);
        ``images``, ``seconds``: the running epoch's steps so far (none between epochs)."""
        images, seconds, wall = self.images + images, self.seconds + seconds, self.wall + seconds
        if self.warned or not self.planned or not math.isfinite(self.budget) or seconds <= 0:
            return
        rate = images / seconds
        if rate >= BEHIND * self.planned:
            return
        self.warned = True
        share = seconds / max(wall, seconds)  # of the wall time that trains (not validation)
        expected = self.planned * share * self.budget
        on_course = state.images_seen + rate * share * max(0.0, self.budget - spent)
        log.warning("training at %.1f images/s, below the %.1f the plan measured: on course for ~%d images in the "
                    "%.1f-min budget instead of ~%d (the plan's minimum %d). The machine may be busy; a longer "
                    "--max-minutes or a plan made now ('medanomaly plan') restores it", rate, self.planned,
                    on_course, self.budget / 60, expected, MIN_IMAGES)


def run_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, source: BatchSource, cfg: TrainConfig,
              gen: torch.Generator, state: RunState, budget: float, progress: bool,
              pace: Pace | None = None) -> tuple[float, float, int, bool]:
    """One epoch of ``source.steps`` optimizer steps, or fewer when the time budget ends it: before
    every step but the first, the run stops once its training time plus the last validation's
    reaches ``budget``. Returns (mean loss of the steps taken, last lr, images drawn, budget hit)."""
    t0, losses, lr, images, stop = clock(), [], cfg.lr, 0, False
    total_steps, warmup = cfg.epochs * source.steps, int(cfg.warmup_epochs * source.steps)
    model.train()
    bar = track(source.batches(gen), desc=f"epoch {state.epoch + 1}", unit=source.unit, total=source.steps,
                enabled=progress, leave=False)
    for i, batch in enumerate(bar):
        spent = state.elapsed + clock() - t0
        lr = lr_at(cfg, state.step, warmup, max(state.step / total_steps, spent / budget))
        stop = i > 0 and spent + state.val_seconds >= budget
        if math.isfinite(budget):  # a time-based schedule and the stop follow rank 0's clock on every process
            lr, stop = distributed.broadcast_object((lr, stop))
        if stop:
            log.info("time budget of %.1f min reached after %d of %d steps of epoch %d", cfg.max_minutes, i,
                     source.steps, state.epoch + 2)
            break
        if pace is not None and spent >= budget / 2:  # half the budget spent: on course?
            pace.check(state, spent, images, clock() - t0)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = train_step(model, opt, source, batch, gen, state.step)
        if loss is None:
            log.warning("step %d: non-finite loss or gradients; step skipped", state.step)
        else:
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
        state.step += 1
        state.images_seen += batch_images(batch, source)
        images += batch_images(batch, source)
    if pace is not None:  # the epoch's validation time is added by fit
        seconds = clock() - t0
        pace.images, pace.seconds, pace.wall = pace.images + images, pace.seconds + seconds, pace.wall + seconds
    return (float(np.mean(losses)) if losses else math.nan), lr, images, stop


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
    trainable, step_model, pace = None, model, Pace(cfg.plan_images_per_s, budget)
    for epoch in range(state.epoch + 1, cfg.epochs):
        if state.elapsed + state.val_seconds >= budget or state.bad_epochs >= cfg.patience:  # resumed after the end
            break
        if cfg.freeze_encoder_epochs > 0:  # a pretrained encoder first adapts its decoder, then all
            set_encoder_trainable(model, epoch >= cfg.freeze_encoder_epochs)
        if trainable != (now := [p.requires_grad for p in model.parameters()]):  # DDP registers them once
            trainable, step_model = now, step_network(model, cfg)
        t0 = clock()
        train_loss, lr, images, out_of_time = run_epoch(step_model, opt, source, cfg, gen, state, budget, progress,
                                                        pace)
        t_val = clock()
        # rank 0 validates; every process takes its numbers (and clock), so stopping decisions agree
        val_loss, val_score = source.validate(model) if distributed.is_main() else (math.nan, math.nan)
        val_loss, val_score, seconds, state.val_seconds = distributed.broadcast_object(
            (val_loss, val_score, clock() - t0, clock() - t_val))
        pace.wall += state.val_seconds
        end_epoch(model, opt, source, cfg, out, gen, state, epoch, seconds, {
            "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
            "val_dice": val_score if cfg.task == "supervised" else math.nan, "lr": lr, "seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else math.nan}, val_score)
        pace.check(state, state.elapsed)  # after the first epoch (and each later one, until it has warned)
        if state.bad_epochs >= cfg.patience:
            log.info("early stop: no validation improvement for %d epochs", cfg.patience)
            break
        if out_of_time:
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
        after_epoch(out, row, cfg.tensorboard)  # progress.png (and TensorBoard scalars) from the row
    log.info("epoch %d: train loss %.4f, val loss %.4f, val score %.4f%s (%.0f s)", epoch, row["train_loss"],
             row["val_loss"], val_score, " *" if improved else "", seconds)
