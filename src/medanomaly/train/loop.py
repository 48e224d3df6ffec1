"""The training loop of both tasks (supervised segmentation, anomaly denoising): seeded,
time-budgeted, validated every epoch, resumable.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from medanomaly.anomaly.methods import anomaly_loss, foreground, output_channels
from medanomaly.config import schema as config_mod
from medanomaly.config.schema import TrainConfig
from medanomaly.core import distributed as distributed
from medanomaly.core.atomic import atomic_torch_save, atomic_write_text
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.runtime import autocast, choose_precision, compile_model, set_seed
from medanomaly.data.augment import augment_batch
from medanomaly.data.slices import SliceSet, concat_slices, discover, load_slices, resolve_splits
from medanomaly.data.synthetic import add_synthetic_lesions
from medanomaly.metrics.functional import Stats, dice
from medanomaly.models.build import build_model
from medanomaly.models.init import load_matching, read_state_dict, set_encoder_trainable
from medanomaly.models.losses import get_loss
from medanomaly.models.unet import UNet
from medanomaly.train.fewlabels import Extras, build_extras, load_extra, pretrain_first, unlabelled_samples

log = logging.getLogger(__name__)
METRIC_FIELDS = ["epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds", "images_per_s"]


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_val_score: float  # mean per-case val Dice (supervised) or minus the val denoising loss
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
def validate_anomaly(model: UNet, val: SliceSet, cfg: TrainConfig, precision: str, device: torch.device,
                     batch: int = 32) -> tuple[float, float]:
    """(mean loss, its negative as the score to maximise) on normal validation slices: denoising,
    or segmenting pasted anomalies (method synthetic); the corruption is drawn from a fixed seed
    so epochs are compared on the same one."""
    model.eval()
    gen, total = torch.Generator().manual_seed(12345), 0.0
    for i in range(0, len(val), batch):
        x, fg = val.images[i:i + batch].float().to(device), val.masks[i:i + batch].float().to(device)
        total += float(anomaly_loss(model, x, fg, cfg.anomaly, gen, autocast(device, precision))) * len(x)
    loss = total / max(1, len(val))
    return loss, -loss


@torch.no_grad()
def validate(model: UNet, val: SliceSet, loss_fn, precision: str, device: torch.device, batch: int = 32) -> tuple[float, float]:
    """(mean loss, mean per-case Dice at probability 0.5) on the validation slices."""
    model.eval()
    stats: dict[str, Stats] = {}
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
        for j, case in enumerate(val.cases[i:i + batch]):  # counted on the tensors: no per-slice numpy copies
            stats[case] = stats.get(case, Stats(0, 0, 0, 0)) + Stats(int(tp[j]), int(fp[j]), int(fn[j]), 0)
    dices = [dice(s) for s in stats.values()]
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


@dataclass
class RunState:
    """Progress of a run, saved in checkpoint.pt after every epoch (plain numbers: weights_only-safe)."""

    epoch: int = -1  # last finished epoch
    step: int = 0
    best: float = -math.inf  # best validation score (Dice, or minus the anomaly val loss)
    best_epoch: int = -1
    elapsed: float = 0.0  # training seconds so far, across resumes
    bad_epochs: int = 0


def _save_state(path: Path, model, opt, gen: torch.Generator, state: RunState, teacher=None) -> None:
    extra = {"teacher": teacher.teacher.state_dict()} if teacher is not None else {}
    atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": gen.get_state(),
                       **asdict(state), **extra}, path)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: refuse, never unpickle code
        raise MedanomalyError(f"cannot resume from {path}: {exc}; delete it to start afresh") from exc


def _resume(path: Path, model, opt, gen: torch.Generator, metrics_csv: Path) -> RunState:
    st = load_state(path)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    gen.set_state(st["rng"])
    state = RunState(**{k: st[k] for k in asdict(RunState())})
    if metrics_csv.exists() and distributed.is_main():  # drop rows of an epoch that finished after the checkpoint
        lines = metrics_csv.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines[1:] if _complete_row(ln) and int(ln.split(",")[0]) <= state.epoch]
        if lines and lines[0].rstrip("\r\n") == ",".join(METRIC_FIELDS):
            atomic_write_text(metrics_csv, "".join([lines[0], *kept]))
        else:  # cut off while its header was being written: _append_metrics starts it again
            metrics_csv.unlink()
    log.info("resuming after epoch %d (best val score %.4f at epoch %d)", state.epoch, state.best, state.best_epoch)
    return state


def check_out_dir(out: Path, resume: bool) -> Path:
    """The checkpoint path of ``out``; refuses --resume without a checkpoint and a fresh run over a model."""
    ckpt_path = out / "checkpoint.pt"
    if resume and not ckpt_path.exists():
        raise MedanomalyError(f"--resume: no checkpoint.pt in {out}; run without --resume to start")
    if not resume and (out / "model.json").exists():
        raise MedanomalyError(f"{out} already holds a trained model; pass --resume to continue or choose a new --out")
    return ckpt_path


def _remove_stale_temp_files(out: Path) -> None:
    """Delete the ``.tmp-*`` files that a killed run left in ``out`` (an atomic write interrupted
    before its ``os.replace``: never a complete output, see :mod:`medanomaly.core.atomic`)."""
    if not out.is_dir():
        return
    for tmp in out.glob(".tmp-*"):
        if tmp.is_file() and not tmp.is_symlink():
            log.info("removing %s, left by an interrupted write", tmp.name)
            tmp.unlink(missing_ok=True)


def _complete_row(line: str) -> bool:
    """A metrics.csv row written in full (a kill during the append can leave a cut-off last line)."""
    fields = line.rstrip("\r\n").split(",")
    return line.endswith("\n") and len(fields) == len(METRIC_FIELDS) and fields[0].isdigit()


def normal_only(slices: SliceSet, data: Path, split: str) -> SliceSet:
    """Slices without lesion (no mask, or an empty one); masks replaced by foreground masks,
    which the anomaly task uses to restrict noise and loss (lesion masks are used for nothing else)."""
    normal = slices.subset(~slices.lesion)
    if len(normal) == 0:
        raise MedanomalyError(f"no normal image in the {split} split of {data}: the anomaly task learns from images "
                              "without lesions (a folder without masks, or slices whose mask is empty)")
    normal.masks = foreground(normal.images).to(torch.uint8)
    return normal


def usable_and_splits(data: Path, cfg: TrainConfig, splits_file) -> tuple[list, dict[str, list[str]]]:
    """The samples the task trains on (supervised: those with a mask) and the split by case."""
    samples = discover(data)
    usable = [s for s in samples if s.mask is not None] if cfg.task == "supervised" else samples
    if not usable:
        raise MedanomalyError(f"no image/mask pairs found in {data}: supervised training needs masks named like "
                              "X_mask.png (or .nii.gz, .nrrd...) beside X.png, or images/ + masks/ folders "
                              "(see README, 'Data layouts')")
    return usable, resolve_splits(data, usable, splits_file, cfg.seed)


def prepare(data: Path, out: Path, cfg: TrainConfig, splits_file, progress: bool) -> tuple[SliceSet, SliceSet, dict]:
    """Discover, split by case, load train and val slices (plus ``cfg.extra`` pairs, appended to
    the training slices only); write splits.json and config.json."""
    if cfg.extra and cfg.task != "supervised":
        raise MedanomalyError(f"--extra {cfg.extra} adds image/mask pairs to supervised training; the anomaly task "
                              "learns from normal images only: drop --extra")
    usable, splits = usable_and_splits(data, cfg, splits_file)
    parts = {k: [s for s in usable if s.case in set(v)] for k, v in splits.items()}
    if not parts["train"] or not parts["val"]:
        raise MedanomalyError(f"the split leaves {len(parts['train'])} training and {len(parts['val'])} validation "
                              f"images in {data}; at least one of each is needed (add cases or fix --splits)")
    with_masks = True if cfg.task == "supervised" else (None if cfg.anomaly.normal_only else False)
    train = load_slices(parts["train"], cfg.size, cfg.normalization, with_masks, progress=progress)
    val = load_slices(parts["val"], cfg.size, cfg.normalization, with_masks, progress=progress)
    if cfg.extra:  # never val/test: the extra pairs only add training slices

        train = concat_slices(train, load_extra(cfg, data, parts, train.images.shape[1], progress))
    if cfg.task == "anomaly":
        train, val = normal_only(train, data, "train"), normal_only(val, data, "val")
    elif int(train.masks.sum()) == 0:
        raise MedanomalyError(f"every training mask in {data} is empty; supervised training needs lesions to learn "
                              "from (use --task anomaly for normal-only data)")
    if distributed.is_main():  # under torchrun, rank 0 alone writes files
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "splits.json", json.dumps(splits, indent=1))
        config_mod.save(cfg, out / "config.json")
    return train, val, splits


def train(data: str | Path, out: str | Path, cfg: TrainConfig, splits_file: str | Path | None = None,
          resume: bool = False, device: str = "cpu", progress: bool = True) -> TrainResult:
    """Train a U-Net on the image/mask pairs in ``data``; write the model directory ``out``.

    The best epoch (mean per-case validation Dice) is kept; afterwards the threshold and
    post-processing are chosen on the validation split (:mod:`medanomaly.calibrate.search`).

    In a process group (``torchrun``, see :mod:`medanomaly.core.distributed`) the run is data parallel:
    ``cfg.batch_size`` is the global batch, each process computes its share of every batch, rank 0
    validates, writes every file and calibrates; the others return the same result afterwards.
    """
    from medanomaly.calibrate.search import calibrate_and_save

    if cfg.model.dim == 3:  # patches of volumes, sliding-window validation: medanomaly.train.loop3d
        from medanomaly.train.loop3d import train3d

        return train3d(data, out, cfg, splits_file, resume=resume, device=device, progress=progress)
    data, out, dev = Path(data), Path(out), torch.device(device)
    ckpt_path = check_out_dir(out, resume)
    if distributed.is_main():
        _remove_stale_temp_files(out)
    if cfg.init and not resume:
        read_state_dict(cfg.init)  # a bad --init fails before minutes of data loading
    train_set, val_set, splits = prepare(data, out, cfg, splits_file, progress)
    in_ch = train_set.images.shape[1]
    if cfg.task == "supervised" and cfg.unlabelled and not resume:
        unlabelled_samples(cfg, data, train_set, splits)  # a bad source fails before any pretraining
        cfg = pretrain_first(cfg, data, out, splits, device, progress)
    if cfg.task == "anomaly" and cfg.anomaly.method == "intensity":  # a baseline: nothing to train
        if distributed.is_main():
            calibrate_and_save(out, cfg, data, in_ch, -1, float("nan"), device=torch.device(device), progress=progress)
        distributed.barrier()
        return TrainResult(out, -1, float("nan"), 0, 0.0)
    set_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out_ch = output_channels(cfg.anomaly.method, in_ch) if cfg.task == "anomaly" else 1  # reconstruction or logits
    model = build_model(replace(cfg.model, in_channels=in_ch, out_channels=out_ch)).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.init and not resume:
        _check_init_channels(cfg.init, in_ch)
        load_matching(model, cfg.init)
    opt = make_optimizer(model, cfg)
    loss_fn = get_loss(cfg.loss, cfg.bce_weight)
    precision = choose_precision(cfg.precision, dev)
    if resume:
        state = _resume(ckpt_path, model, opt, gen, out / "metrics.csv")
    else:  # a fresh start in the folder of an interrupted run: its rows are not this run's history
        state = RunState()
        if distributed.is_main():
            (out / "metrics.csv").unlink(missing_ok=True)
    budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else float("inf")
    extras = build_extras(cfg, data, train_set, model, ckpt_path if resume else None, progress, splits)
    log.info("training on %d slices (%d val), %s, precision %s, budget %.1f min",
             len(train_set), len(val_set), device, precision, cfg.max_minutes)
    main, world, trainable, step_model = distributed.is_main(), distributed.world_size(), None, model
    if world > 1:
        if cfg.compile:
            raise MedanomalyError("--compile runs in one process; start the run without torchrun or drop --compile")
        distributed.check_batch(cfg.batch_size, len(train_set))
        log.info("data parallel: %d processes, global batch %d (%d per process)", world, cfg.batch_size,
                 cfg.batch_size // world)
    for epoch in range(state.epoch + 1, cfg.epochs):
        if state.elapsed >= budget or state.bad_epochs >= cfg.patience:  # resumed after the end
            break
        if cfg.freeze_encoder_epochs > 0:  # a pretrained encoder first adapts its decoder, then all
            set_encoder_trainable(model, epoch >= cfg.freeze_encoder_epochs)
        if trainable != [p.requires_grad for p in model.parameters()]:  # DDP registers the trainable ones once
            trainable = [p.requires_grad for p in model.parameters()]
            step_model = distributed.data_parallel(model)
            if cfg.compile:  # validation runs the eager model: one compiled graph, training mode only
                step_model = compile_model(step_model)
        t0 = time.perf_counter()
        train_loss, lr = _run_epoch(step_model, opt, train_set, cfg, gen, state, budget, dev, precision, loss_fn,
                                    progress, extras)
        if not main:  # rank 0 validates; every process takes its numbers, so stopping decisions agree
            val_loss, val_score = math.nan, math.nan
        elif cfg.task == "anomaly":
            val_loss, val_score = validate_anomaly(model, val_set, cfg, precision, dev)
        else:
            val_loss, val_score = validate(model, val_set, loss_fn, precision, dev)
        val_loss, val_score, seconds = distributed.broadcast_object((val_loss, val_score, time.perf_counter() - t0))
        val_dice = val_score if cfg.task == "supervised" else float("nan")
        state.epoch, state.elapsed = epoch, state.elapsed + seconds
        improved = val_score > state.best
        if improved:
            state.best, state.best_epoch, state.bad_epochs = val_score, epoch, 0
            if main:
                atomic_torch_save(model.state_dict(), out / "model.pt")
        else:
            state.bad_epochs += 1
        n_images = (len(train_set) // cfg.batch_size) * cfg.batch_size  # global: all processes together
        if main:
            _append_metrics(out / "metrics.csv", {
                "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_dice": val_dice,
                "lr": lr, "seconds": seconds, "images_per_s": n_images / seconds})
            _save_state(ckpt_path, model, opt, gen, state, extras.teacher)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val score %.4f%s (%.0f s)", epoch,
                 train_loss, val_loss, val_score, " *" if improved else "", seconds)
        if state.bad_epochs >= cfg.patience:
            log.info("early stop: no validation improvement for %d epochs", cfg.patience)
            break
        if state.elapsed + seconds > budget * 1.02:  # the next epoch would overrun the budget
            log.info("time budget of %.1f min reached", cfg.max_minutes)
            break
    if main:
        calibrate_and_save(out, cfg, data, in_ch, state.best_epoch, state.best, device=dev, progress=progress)
    distributed.barrier()  # the other processes return once model.json is written
    return TrainResult(out, state.best_epoch, state.best, state.epoch + 1, state.elapsed)


def _step_loss(model, images: torch.Tensor, masks: torch.Tensor, cfg: TrainConfig, gen: torch.Generator,
               dev: torch.device, precision: str, loss_fn, extras: Extras | None = None,
               step: int = 0) -> torch.Tensor:
    """Loss of one batch: segmentation loss on logits, or (anomaly) the denoising loss, where
    ``masks`` are foreground masks and intensity augmentation is off (it would redefine normal)."""
    if cfg.task == "anomaly":
        aug = replace(cfg.augment, p_gamma=0.0, p_contrast=0.0, p_noise=0.0)
        x, fg = augment_batch(images, masks, aug, gen)
        return anomaly_loss(model, x.to(dev), fg.to(dev), cfg.anomaly, gen, autocast(dev, precision))
    extras = extras or Extras()
    if cfg.synthetic_lesions > 0 and extras.lesion_stats is not None:
        images, masks = add_synthetic_lesions(images, masks, cfg.synthetic_lesions, extras.lesion_stats, gen)
    x, y = augment_batch(images, masks, cfg.augment, gen)
    x, y = _layout(x.to(dev), model), y.to(dev)
    with autocast(dev, precision):
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    if extras.teacher is not None:  # mean teacher: consistency on a batch of unlabelled images
        pick = torch.randint(len(extras.unlabelled), (len(images),), generator=gen)
        xu, _ = augment_batch(extras.unlabelled.images[pick].float(), None, cfg.augment, gen)
        loss = loss + extras.teacher.consistency(model, _layout(xu.to(dev), model), step, gen,
                                                 lambda: autocast(dev, precision))
    return loss


def _run_epoch(model, opt, train_set: SliceSet, cfg: TrainConfig, gen: torch.Generator, state: RunState,
               budget: float, dev: torch.device, precision: str, loss_fn, progress: bool,
               extras: Extras | None = None) -> tuple[float, float]:
    """One pass over the training slices; returns (mean loss, last learning rate)."""
    from tqdm import tqdm

    t0, losses, lr = time.perf_counter(), [], cfg.lr
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total_steps, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    model.train()
    bar = tqdm(batch_indices(train_set, cfg, gen), desc=f"epoch {state.epoch + 1}", unit="batch",
               disable=not progress, leave=False)
    for idx in bar:
        # the schedule follows steps or wall time, whichever is further along
        lr = lr_at(cfg, state.step, warmup, max(state.step / total_steps,
                                                 (state.elapsed + time.perf_counter() - t0) / budget))
        if math.isfinite(budget):  # a time-based schedule follows rank 0's clock on every process
            lr = distributed.broadcast_object(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = _step_loss(model, train_set.images[idx].float(), train_set.masks[idx].float(), cfg, gen, dev,
                          precision, loss_fn, extras, state.step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if extras is not None and extras.teacher is not None:
            extras.teacher.update(model, state.step)
        state.step += 1
        losses.append(loss.detach().item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return float(np.mean(losses)), lr


def _check_init_channels(init: str, in_channels: int) -> None:
    """A model directory given to --init must have been trained on images of the same channels."""
    meta_path = Path(init) / "model.json"
    if not meta_path.is_file():
        return
    theirs = json.loads(meta_path.read_text()).get("input", {}).get("channels")
    if theirs is not None and theirs != in_channels:
        raise MedanomalyError(f"--init {init} was trained on {theirs}-channel images but these have {in_channels}; "
                              "use a model of the same modality/channels")
