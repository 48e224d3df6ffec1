"""Curves of a run you can follow: after every epoch ``progress.png`` in the model directory
(training and validation loss, validation score and learning rate vs epoch, from ``metrics.csv``),
written atomically, and with ``--tensorboard`` the same numbers as TensorBoard scalars in
``OUT/tensorboard`` (one event file per run, read live by ``tensorboard --logdir OUT``).

TensorBoard's writer (``torch.utils.tensorboard``) needs the ``tensorboard`` package, which
medanomaly does not require: :func:`check_tensorboard` refuses ``--tensorboard`` without it before
any work."""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

from medanomaly.core.atomic import atomic_path
from medanomaly.core.errors import MedanomalyError

log = logging.getLogger(__name__)

PNG = "progress.png"
TENSORBOARD_DIR = "tensorboard"
#: metrics.csv column -> TensorBoard tag
TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "val_dice": "val/dice", "lr": "lr",
        "images_per_s": "speed/images_per_s"}
_writers: dict[Path, Any] = {}  # one SummaryWriter per model directory for the life of the process


def check_tensorboard() -> None:
    """Refuse ``--tensorboard`` where the ``tensorboard`` package is not installed (before any work)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise MedanomalyError("--tensorboard needs the tensorboard package, which is not installed; install it "
                              "with 'pip install tensorboard', or drop --tensorboard (train.log and progress.png "
                              "are written anyway)")


def read_metrics(metrics_csv: Path) -> dict[str, list[float]]:
    """The columns of ``metrics.csv`` as floats (NaN where empty or not a number); {} without a file."""
    try:
        with metrics_csv.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return {}
    return {k: [_float(r.get(k)) for r in rows] for k in (rows[0].keys() if rows else ())}


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def plot_progress(metrics_csv: Path, png: Path) -> None:
    """Draw ``metrics.csv`` into ``png``: losses (left), validation score and learning rate (right),
    each vs epoch; the file is replaced atomically (a reader never sees half of it)."""
    # on use: 0.9 s to import (as in evaluate.report), paid once per run, not by every command
    from matplotlib.figure import Figure

    m = read_metrics(metrics_csv)
    if not m.get("epoch"):
        return
    epochs = m["epoch"]
    fig = Figure(figsize=(9, 3.4), dpi=90, layout="constrained")
    losses, score = fig.subplots(1, 2)
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        losses.plot(epochs, m.get(key, []), marker=".", label=label)
    losses.set(xlabel="epoch", ylabel="loss", title="losses")
    losses.legend(loc="upper right")
    if any(math.isfinite(v) for v in m.get("val_dice", [])):
        score.plot(epochs, m["val_dice"], marker=".", color="tab:green", label="val Dice")
        score.set_ylabel("val Dice")
        score.legend(loc="upper left")
    score.set(xlabel="epoch", title="validation score and learning rate")
    lr = score.twinx()
    lr.plot(epochs, m.get("lr", []), color="tab:gray", linestyle="--", marker=".", label="learning rate")
    lr.set_ylabel("learning rate")
    lr.legend(loc="upper right")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


def write_scalars(out: Path, row: dict[str, Any]) -> None:
    """The epoch's ``row`` (a metrics.csv row) as TensorBoard scalars in ``out/tensorboard``."""
    # on use: it needs the optional tensorboard package (check_tensorboard refused its absence)
    from torch.utils.tensorboard import SummaryWriter

    key = out.resolve()
    if key not in _writers:
        _writers[key] = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))
    writer = _writers[key]
    for column, tag in TAGS.items():
        value = row.get(column)
        if isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(tag, value, global_step=int(row["epoch"]))
    writer.flush()


def after_epoch(out: Path, row: dict[str, Any], tensorboard: bool = False) -> None:
    """After an epoch's row is in ``out/metrics.csv``: redraw ``out/progress.png`` and, with
    ``tensorboard``, add the row's scalars. A plot that fails is logged, never ends the run."""
    try:
        plot_progress(out / "metrics.csv", out / PNG)
    except Exception as exc:  # noqa: BLE001 - a curve is a convenience; the training goes on
        log.warning("%s not updated: %s", out / PNG, exc)
    if tensorboard:
        write_scalars(out, row)
