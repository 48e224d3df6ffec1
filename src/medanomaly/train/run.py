"""A training run, start to end: check the model directory, prepare the data, pretrain on unlabelled
images where asked, build the network and optimizer (``--init`` weights, resume), pick the batch
source and hand all of it to the one loop (:func:`medanomaly.train.loop.fit`).

A model directory holds ``model.pt`` (best weights, a plain state dict), ``config.json``,
``splits.json``, ``metrics.csv`` and ``checkpoint.pt`` (the last epoch, for ``--resume``). The
threshold and post-processing chosen on the validation split, and ``model.json``, come after
training, from :mod:`medanomaly.calibrate` (composed in :func:`medanomaly.apps.api.train`): this
package trains only.

:func:`check_run` makes every check that the options and the data listing allow before any image
is loaded (so no error first appears after the minutes of loading or training), and
:func:`run_record` reads from a model directory's files whether its training has ended (what
``medanomaly calibrate`` needs to know before calibrating an interrupted run).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import torch

from medanomaly.anomaly.methods import output_channels
from medanomaly.config import schema as config_mod
from medanomaly.config.labels import network_classes
from medanomaly.config.schema import TrainConfig, pretrain_budget
from medanomaly.core import distributed
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.progress import run_logged
from medanomaly.core.runtime import choose_precision, set_seed
from medanomaly.data.discover import read_sample, with_labels
from medanomaly.data.volumes import check_3d_config, group_volumes
from medanomaly.models.build import build_model
from medanomaly.models.init import load_matching, read_state_dict
from medanomaly.models.losses import get_loss
from medanomaly.train.checkpoint import (
    METRIC_FIELDS,
    NEW_FIELDS,
    check_out_dir,
    check_run_dir,
    fresh_state,
    load_state,
    remove_stale_temp_files,
    resume_state,
)
from medanomaly.train.curves import check_tensorboard
from medanomaly.train.fewlabels import build_extras, check_extra, unlabelled_samples
from medanomaly.train.loop import MIN_IMAGES, fit
from medanomaly.train.prepare import Prepared, prepare, split_parts, usable_and_splits
from medanomaly.train.semisup import (
    PRETRAIN_DIR,
    mark_pretrain_finished,
    pretrain_config,
    pretrain_data,
    pretrain_finished,
    resolve_method,
)
from medanomaly.train.sources import BatchSource, PatchSource, SliceSource, precision_3d

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a run did, and what calibrating its model directory needs (``cfg``, ``in_channels``)."""

    out_dir: Path
    best_epoch: int
    best_val_score: float  # mean per-case val Dice (supervised) or minus the val anomaly loss
    epochs_run: int
    seconds: float  # training: the steps and the per-epoch validation, across resumes
    cfg: TrainConfig  # as the run resolved it (3D: patch and spacing; --unlabelled: its --init), for calibration
    in_channels: int
    images_seen: int = 0  # slices (3D: patches) the training steps drew, across resumes
    load_seconds: float = 0.0  # checks and data loading before the first step (this process, this call)
    calibrate_seconds: float | None = None  # filled by whoever calibrates (medanomaly.apps.api.train)


@run_logged("out", enabled=distributed.is_main)  # OUT/train.log, from when the run writes its config.json
def train(data: str | Path, out: str | Path, cfg: TrainConfig, splits_file: str | Path | None = None,
          resume: bool = False, device: str = "cpu", progress: bool = True) -> TrainResult:
    """Train a U-Net (2D on slices, or 3D on patches of volumes: ``cfg.model.dim``) on the image/mask
    pairs (or normal images, anomaly task) in ``data``; write the model directory ``out``. The
    best epoch by the validation score is kept; the anomaly baseline ``intensity`` trains nothing.

    In a process group (``torchrun``, see :mod:`medanomaly.core.distributed`) the run is data parallel:
    the batch size is the global batch, each process computes its share of every batch, rank 0
    validates and writes every file; every process returns the same result.
    """
    data, out, dev, t_start = Path(data), Path(out), torch.device(device), time.perf_counter()
    cfg = with_labels(cfg, data)  # --labels, else DATA/dataset.json's (two or more: softmax, label maps)
    if cfg.model.dim == 3:
        check_3d_config(cfg)
        distributed.check_batch(cfg.patch_batch)  # under torchrun: the global batch of patches
    ckpt_path = check_out_dir(out, resume)
    check_run(data, cfg, splits_file, ckpt_path if resume else None)  # before minutes of data loading
    check_run_dir(out, data, cfg)  # the output policy (medanomaly.core.outputs), once the data listing is good
    if distributed.is_main():
        remove_stale_temp_files(out)
    prep = prepare(data, out, cfg, splits_file, dev, progress)
    cfg, in_ch = prep.cfg, prep.in_channels
    if cfg.task == "supervised" and cfg.unlabelled and not resume:
        cfg = pretrain_first(cfg, data, out, prep.splits, device, progress)
    if cfg.task == "anomaly" and cfg.anomaly.method == "intensity":  # a baseline: nothing to train
        return TrainResult(out, -1, math.nan, 0, 0.0, cfg, in_ch)
    if cfg.model.dim == 3 and cfg.model.norm == "batch" and cfg.patch_batch < 8:
        log.warning("batch norm with %d patches per step is noisy; --norm instance is the 3D choice (nnU-Net)",
                    cfg.patch_batch)
    set_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = new_model(cfg, in_ch, dev, init=cfg.init if not resume else None)
    opt = make_optimizer(model, cfg)
    loss_fn = get_loss(cfg.loss, cfg.bce_weight, network_classes(cfg.labels))
    precision = precision_3d(model, cfg, dev, in_ch) if cfg.model.dim == 3 else choose_precision(cfg.precision, dev)
    metrics_csv = out / "metrics.csv"
    state = resume_state(ckpt_path, model, opt, gen, metrics_csv) if resume else fresh_state(metrics_csv)
    source = batch_source(prep, cfg, data, model, dev, precision, loss_fn, ckpt_path if resume else None, progress)
    if resume and distributed.is_main() and (out / "model.json").is_file():  # its weights are about to change:
        (out / "model.json").unlink()  # unfinished (visibly so) until calibrated again
        log.info("%s: model.json removed; the run is calibrated again once trained", out)
    load_s = time.perf_counter() - t_start
    log.info("checks, data loading and set-up: %.1f s (not counted in the training budget)", load_s)
    state = fit(model, opt, source, cfg, out, gen, state, dev, precision, progress)
    log.info("training: %d epochs, %d images seen in %.1f min (plus %.1f s of loading)", state.epoch + 1,
             state.images_seen, state.elapsed / 60, load_s)
    return TrainResult(out, state.best_epoch, state.best, state.epoch + 1, state.elapsed, cfg, in_ch,
                       state.images_seen, load_s)


def check_run(data: Path, cfg: TrainConfig, splits_file: str | Path | None, resume_from: Path | None) -> None:
    """Refuse, before any image is loaded, what would fail later: an ``--extra`` source unusable or
    with the anomaly task, an ``--unlabelled`` source that is empty or holds training images, ``--init``
    weights that are unreadable, non-finite or of no matching tensor or channels, a checkpoint that
    ``--resume`` cannot load into the network and optimizer of ``cfg``, ``--compile`` under torchrun.
    The data listing (discovery and split, no image decoded; one image read for its channels where
    needed) raises the data errors that :func:`prepare` would."""
    if cfg.tensorboard:
        check_tensorboard()
    if cfg.compile and distributed.world_size() > 1:
        raise MedanomalyError("--compile runs in one process; start the run without torchrun or drop --compile")
    if cfg.extra and cfg.task != "supervised":
        raise MedanomalyError(f"--extra {cfg.extra} adds image/mask pairs to supervised training; the anomaly task "
                              "learns from normal images only: drop --extra")
    usable, splits = usable_and_splits(data, cfg, splits_file)
    volumes = cfg.model.dim == 3
    parts = split_parts(group_volumes(usable) if volumes else usable, splits, data, "volumes" if volumes else "images")
    channels = cache(lambda: read_sample(usable[0]).channels)  # read once, only where needed
    if cfg.extra:
        check_extra(cfg, data, parts, channels())
    if cfg.task == "supervised" and cfg.unlabelled and resume_from is None:
        unlabelled_samples(cfg, data, [s.image for s in parts["train"]], splits)
    if cfg.init and resume_from is None:
        _check_init(cfg, channels())
    if resume_from is not None:
        _check_resume(resume_from, cfg, channels())


def _check_init(cfg: TrainConfig, in_ch: int) -> None:
    """--init weights: readable, finite, of the data's channels and with a tensor this network takes."""
    state, file = read_state_dict(cfg.init)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise MedanomalyError(f"--init {file} holds non-finite weights (NaN or infinite values in {len(bad)} "
                              f"tensors, e.g. {bad[0]!r}); training from them gives NaN: pass the weights of a run "
                              "that did not diverge")
    _check_init_channels(cfg.init, in_ch)
    model = new_model(cfg, in_ch, torch.device("cpu"))
    own = model.state_dict()
    if not any(k in own and own[k].shape == v.shape for k, v in state.items()):
        load_matching(model, cfg.init)  # raises its error, which names the file and the fix


def _check_resume(ckpt_path: Path, cfg: TrainConfig, in_ch: int) -> None:
    """The checkpoint loads into the network and optimizer of ``cfg``, as :func:`resume_state` will."""
    state = load_state(ckpt_path)
    model = new_model(cfg, in_ch, torch.device("cpu"))
    try:
        model.load_state_dict(state["model"])
        make_optimizer(model, cfg).load_state_dict(state["optimizer"])
    except Exception as exc:  # another network or optimizer: one clear error
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))[:200]
        raise MedanomalyError(f"--resume: {ckpt_path} holds a run of another network or optimizer than these "
                              f"settings ({first}); resume with the run's own settings (drop the flags that change "
                              "--width, --depth, --norm, --encoder, --optimizer...) or train into a new --out") from exc


@dataclass(frozen=True)
class RunRecord:
    """What a model directory's files say of its training: whether it ended (``--resume`` would
    train no further epoch), why, and its best epoch with that epoch's validation score."""

    ended: bool
    reason: str
    best_epoch: int = -1
    best_val_score: float = math.nan
    epochs: int | None = None  # epochs trained (the last one possibly cut short by the time budget)
    images_seen: int | None = None  # None: not known (no checkpoint, or one of an earlier release)
    seconds: float | None = None  # training time (steps and validation); None: no checkpoint


def run_record(out: Path, cfg: TrainConfig) -> RunRecord:
    """The :class:`RunRecord` of the run in ``out`` trained with ``cfg`` (its config.json), by the
    stopping rules of :func:`medanomaly.train.loop.fit` applied to its checkpoint.pt and metrics.csv."""
    if not (out / "checkpoint.pt").is_file():
        if cfg.task == "anomaly" and cfg.anomaly.method == "intensity":
            return RunRecord(True, "the intensity baseline trains nothing")
        if (out / "model.pt").is_file():  # a copied or older directory: its model.pt is what there is
            return RunRecord(True, "model.pt without checkpoint.pt is taken as final")
        return RunRecord(False, "no epoch of its training ended (no model.pt)")
    st = load_state(out / "checkpoint.pt")
    try:
        epoch, best, best_epoch = int(st["epoch"]), float(st["best"]), int(st["best_epoch"])
        bad, elapsed = int(st["bad_epochs"]), float(st["elapsed"])
        seen = int(st["images_seen"]) if "images_seen" in st else None
    except (KeyError, TypeError, ValueError) as exc:
        raise MedanomalyError(f"{out / 'checkpoint.pt'} is not a checkpoint of medanomaly train (no {exc}); "
                              "retrain") from exc
    budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    facts = {"best_epoch": best_epoch, "best_val_score": best, "epochs": epoch + 1, "images_seen": seen,
             "seconds": elapsed}
    if not (out / "model.pt").is_file():
        return RunRecord(False, "its model.pt is missing", **facts)
    if epoch + 1 >= cfg.epochs or bad >= cfg.patience:
        return RunRecord(True, f"trained {epoch + 1} epochs", **facts)
    if _budget_spent(st, elapsed, budget, out / "metrics.csv", epoch):
        return RunRecord(True, f"time budget reached after {epoch + 1} epochs", **facts)
    return RunRecord(False, f"it stopped after epoch {epoch + 1} of {cfg.epochs}", **facts)


def _budget_spent(st: dict, elapsed: float, budget: float, metrics_csv: Path, epoch: int) -> bool:
    """The loop's rule: no step starts once the training time plus the last validation's reaches the
    budget. A checkpoint of an earlier release (no ``val_seconds``: its loop stopped between epochs)
    ended when the next epoch would have overrun the budget by 2 %."""
    if all(k in st for k in NEW_FIELDS):
        return elapsed + float(st["val_seconds"]) >= budget
    return elapsed >= budget or elapsed + _epoch_seconds(metrics_csv, epoch) > budget * 1.02


def training_facts(out: Path, cfg: TrainConfig) -> dict:
    """What the model file's training record states beyond the best epoch (config.model_file's
    TrainingSummary): epochs trained, images seen, training minutes, and, for a planned run, the
    training speed the plan measured and the plan's minimum of images; None where not known."""
    record = run_record(out, cfg)
    planned = cfg.plan_images_per_s
    minutes = None if record.seconds is None else round(record.seconds / 60, 2)
    return {"epochs": record.epochs, "images_seen": record.images_seen, "train_minutes": minutes,
            "plan_images_per_s": planned, "min_images": MIN_IMAGES if planned else None}


def _epoch_seconds(metrics_csv: Path, epoch: int) -> float:
    """The seconds metrics.csv records for ``epoch`` (0 where it has no such row)."""
    try:
        rows = metrics_csv.read_text().splitlines()[1:]
    except OSError:
        return 0.0
    for row in rows:
        fields = row.split(",")
        if len(fields) == len(METRIC_FIELDS) and fields[0] == str(epoch):
            try:
                return float(fields[METRIC_FIELDS.index("seconds")])
            except ValueError:
                return 0.0
    return 0.0


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or (nnU-Net's) SGD with Nesterov momentum 0.99, over every parameter (frozen ones too:
    --freeze-encoder-epochs unfreezes them later); the loop sets the learning rate of each step."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)


def new_model(cfg: TrainConfig, in_ch: int, dev: torch.device, init: str | None = None) -> torch.nn.Module:
    """The network of ``cfg`` for ``in_ch``-channel images (anomaly: the method's output channels,
    supervised: one logit, or background + each of several labels), on ``dev``, channels-last in 2D where
    configured, ``init`` weights loaded."""
    out_ch = output_channels(cfg.anomaly.method, in_ch) if cfg.task == "anomaly" else network_classes(cfg.labels)
    model = build_model(replace(cfg.model, in_channels=in_ch, out_channels=out_ch)).to(dev)
    if cfg.channels_last and cfg.model.dim == 2:  # channels-last is a 4D layout
        model = model.to(memory_format=torch.channels_last)
    if init:
        _check_init_channels(init, in_ch)
        load_matching(model, init)
    return model


def batch_source(prep: Prepared, cfg: TrainConfig, data: Path, model: torch.nn.Module, dev: torch.device,
                 precision: str, loss_fn, resume_from: Path | None, progress: bool) -> BatchSource:
    """Patches of volumes in 3D; slices in 2D, with the few-label extras (synthetic lesions, mean teacher)."""
    if cfg.model.dim == 3:
        return PatchSource(prep.train, prep.val, cfg, dev, precision, loss_fn)
    extras = build_extras(cfg, data, prep.train, model, resume_from, progress, prep.splits)
    return SliceSource(prep.train, prep.val, cfg, dev, precision, loss_fn, extras)


def pretrain_first(cfg: TrainConfig, data: Path, out: Path, splits: dict, device: str, progress: bool) -> TrainConfig:
    """--unlabelled with a pretrain method (the default): denoising pretraining on labelled +
    unlabelled images in ``out/pretrain`` for a share of the budget (skipped when a resumed run
    had finished it), then supervised training from those weights in the rest. The changed
    configuration is saved, so --resume continues the supervised part."""
    method = resolve_method(cfg.unlabelled_method)
    if "pretrain" not in method or cfg.init:
        return cfg
    log.info("--unlabelled (%s): self-supervised pretraining on labelled + unlabelled images first, %.1f min",
             method, pretrain_budget(cfg)[0])
    target = out / PRETRAIN_DIR
    if not pretrain_finished(target):
        source, splits_file = pretrain_data(cfg, data, out, splits)
        res = train(source, target, pretrain_config(cfg), splits_file, device=device, progress=progress)
        mark_pretrain_finished(target, {"best_epoch": res.best_epoch, "best_val_score": res.best_val_score,
                                        "epochs_run": res.epochs_run, "seconds": res.seconds})
    cfg = replace(cfg, init=str(target), max_minutes=pretrain_budget(cfg)[1])
    if distributed.is_main():  # under torchrun, rank 0 alone writes files
        config_mod.save(cfg, out / "config.json")
    return cfg


def _check_init_channels(init: str, in_channels: int) -> None:
    """A model directory given to --init must have been trained on images of the same channels
    (read from its model.json; a pretraining stage's directory has none and is of the same data)."""
    meta_path = Path(init) / "model.json"
    if not meta_path.is_file():
        return
    try:
        theirs = json.loads(meta_path.read_text())["input"]["channels"]
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: the weights themselves are checked
        return
    if theirs is not None and theirs != in_channels:
        raise MedanomalyError(f"--init {init} was trained on {theirs}-channel images but these have {in_channels}; "
                              "use a model of the same modality/channels")
