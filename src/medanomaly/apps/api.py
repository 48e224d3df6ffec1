"""The Python API: what the CLI commands do, as functions. ``train`` runs the training
(:func:`medanomaly.train.run.train`) and then chooses the threshold and post-processing on the
validation split (:mod:`medanomaly.calibrate`), so a model directory it returns is finished."""

from __future__ import annotations

from pathlib import Path

import torch

from medanomaly.calibrate.search import calibrate_and_save
from medanomaly.config.schema import TrainConfig
from medanomaly.core import distributed
from medanomaly.train.run import TrainResult
from medanomaly.train.run import train as _train_run


def train(data: str | Path, out: str | Path, cfg: TrainConfig, splits_file: str | Path | None = None,
          resume: bool = False, device: str = "cpu", progress: bool = True) -> TrainResult:
    """Train on the image/mask pairs (or normal images) in ``data`` and write the finished model
    directory ``out``: weights, the model file with the settings chosen on val, splits, metrics.

    Under torchrun rank 0 calibrates (on the weights of the best epoch, read back from model.pt)
    while the other processes wait; all return once model.json is written."""
    res = _train_run(data, out, cfg, splits_file, resume=resume, device=device, progress=progress)
    if distributed.is_main():
        calibrate_and_save(res.out_dir, res.cfg, Path(data), res.in_channels, res.best_epoch, res.best_val_score,
                           device=torch.device(device), progress=progress)
    distributed.barrier()
    return res
