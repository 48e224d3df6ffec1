"""Checkpoint and resume of a training run: the files of a model directory that the loop keeps.

``checkpoint.pt`` holds the last finished epoch (weights, optimizer, the batch generator's state,
the :class:`RunState` numbers and, with a mean teacher, the teacher's weights) so ``--resume``
continues exactly where the run stopped; ``metrics.csv`` has one row per epoch
(:data:`METRIC_FIELDS`). Every write is atomic (:mod:`medanomaly.core.atomic`): a killed run
leaves the previous complete file, or a ``.tmp-*`` file that the next run deletes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from medanomaly.config.schema import TrainConfig
from medanomaly.core import distributed
from medanomaly.core.atomic import atomic_torch_save, atomic_write_text
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.outputs import check_out_path, check_separate
from medanomaly.data.listing import data_root

log = logging.getLogger(__name__)
# images_per_s: slices per second in 2D, patches per second in 3D
#: what a training run writes into its model directory (model.json last, once calibrated; pretrain*: --unlabelled)
RUN_FILES = ("model.pt", "checkpoint.pt", "config.json", "splits.json", "metrics.csv", "plan.json", "pretrain",
             "pretrain-splits.json", "train.log", "progress.png", "tensorboard")
#: RunState fields added after the first release: optional in a checkpoint
NEW_FIELDS = ("images_seen", "val_seconds")
METRIC_FIELDS = ["epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds", "images_per_s"]


@dataclass
class RunState:
    """Progress of a run, saved in checkpoint.pt after every epoch (plain numbers: weights_only-safe)."""

    epoch: int = -1  # last finished epoch
    step: int = 0
    best: float = -math.inf  # best validation score (Dice, or minus the anomaly val loss)
    best_epoch: int = -1
    elapsed: float = 0.0  # training seconds so far (steps and validation), across resumes
    bad_epochs: int = 0
    images_seen: int = 0  # slices (3D: patches) drawn by the training steps so far, across resumes
    val_seconds: float = 0.0  # the last validation's seconds: what the loop keeps free of the budget for it


def save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
               state: RunState, extra: dict | None = None) -> None:
    """Write checkpoint.pt: weights, optimizer, generator state, ``state``'s fields and ``extra``
    (the batch source's own state, e.g. ``{"teacher": state dict}``)."""
    extra = extra or {}
    atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": gen.get_state(),
                       **asdict(state), **extra}, path)


def load_state(path: Path) -> dict:
    """The checkpoint at ``path``, read without running code (``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: refuse, never unpickle code
        raise MedanomalyError(f"cannot resume from {path}: {exc}; delete it to start afresh") from exc


def state_of(saved: dict) -> RunState:
    """The :class:`RunState` of a loaded checkpoint; a field it lacks (a checkpoint of an earlier
    release: no ``images_seen``, ``val_seconds``) takes its default. KeyError where an original field
    is missing (not a checkpoint of medanomaly train)."""
    defaults = asdict(RunState())
    return RunState(**{k: saved[k] if k in saved or k not in NEW_FIELDS else v for k, v in defaults.items()})


def resume_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                 metrics_csv: Path) -> RunState:
    """Load the checkpoint into ``model``, ``opt`` and ``gen``; drop the metrics.csv rows it does not cover."""
    st = load_state(path)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    gen.set_state(st["rng"])
    state = state_of(st)
    if metrics_csv.exists() and distributed.is_main():  # drop rows of an epoch that finished after the checkpoint
        lines = metrics_csv.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines[1:] if _complete_row(ln) and int(ln.split(",")[0]) <= state.epoch]
        if lines and lines[0].rstrip("\r\n") == ",".join(METRIC_FIELDS):
            atomic_write_text(metrics_csv, "".join([lines[0], *kept]))
        else:  # cut off while its header was being written: append_metrics starts it again
            metrics_csv.unlink()
    log.info("resuming after epoch %d (best val score %.4f at epoch %d)", state.epoch, state.best, state.best_epoch)
    return state


def fresh_state(metrics_csv: Path) -> RunState:
    """A new run's state; a fresh start in the folder of an interrupted run drops its metrics.csv
    (those rows are not this run's history)."""
    if distributed.is_main():
        metrics_csv.unlink(missing_ok=True)
    return RunState()


def append_metrics(path: Path, row: dict) -> None:
    """Append one epoch's row (floats to 6 significant digits); the header comes with the first row."""
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _complete_row(line: str) -> bool:
    """A metrics.csv row written in full (a kill during the append can leave a cut-off last line)."""
    fields = line.rstrip("\r\n").split(",")
    return line.endswith("\n") and len(fields) == len(METRIC_FIELDS) and fields[0].isdigit()


def check_out_dir(out: Path, resume: bool) -> Path:
    """The checkpoint path of ``out``; refuses an ``out`` that cannot be a folder
    (:func:`medanomaly.core.outputs.check_out_path`), --resume without a checkpoint and a fresh run
    over a finished model."""
    check_out_path(out, "folder")
    ckpt_path = out / "checkpoint.pt"
    if resume and not ckpt_path.exists():
        raise MedanomalyError(f"--resume: no checkpoint.pt in {out}; run without --resume to start")
    if not resume and (out / "model.json").exists():
        raise MedanomalyError(f"{out} already holds a trained model; pass --resume to continue or choose a new --out")
    return ckpt_path


def check_run_dir(out: Path, data: Path, cfg: TrainConfig | None = None) -> None:
    """Before the data is loaded: refuse a model directory ``out`` inside the ``data`` folder (or the
    ``cfg.extra``/``cfg.unlabelled`` folders) or holding one of them, and one that holds files a
    run writes (:data:`RUN_FILES`) without being an earlier run's folder (an interrupted run,
    which a fresh run restarts and --resume continues)."""
    sources = (cfg.extra, cfg.unlabelled) if cfg is not None else ()
    check_separate(out, [data_root(data), *(Path(p) for p in sources if p and Path(p).is_dir())])  # CSV: its images
    found = [name for name in RUN_FILES if (out / name).exists()] if not _earlier_run(out) else []
    if found:
        raise MedanomalyError(f"{out} holds {', '.join(found)}, which training writes, and is not the folder of an "
                              "earlier run (no checkpoint.pt or saved config.json); move them or choose a new --out")


def _earlier_run(out: Path) -> bool:
    """``out`` is the folder of an interrupted run: a checkpoint, or the config.json a run saved
    (every TrainConfig key; a hand-written --config file has some)."""
    if (out / "checkpoint.pt").is_file():
        return True
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and set(TrainConfig().to_dict()) <= set(saved)


def remove_stale_temp_files(out: Path) -> None:
    """Delete the ``.tmp-*`` files that a killed run left in ``out`` (an atomic write interrupted
    before its ``os.replace``: never a complete output, see :mod:`medanomaly.core.atomic`)."""
    if not out.is_dir():
        return
    for tmp in out.glob(".tmp-*"):
        if tmp.is_file() and not tmp.is_symlink():
            log.info("removing %s, left by an interrupted write", tmp.name)
            tmp.unlink(missing_ok=True)
