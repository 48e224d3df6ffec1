"""The Python API: what the CLI commands do, as functions. ``train`` runs the training loop
(:mod:`medanomaly.train`) and then chooses the threshold and post-processing on the validation split
(:mod:`medanomaly.calibrate`), so a model directory it returns is finished."""

from __future__ import annotations

from pathlib import Path

from medanomaly.config.schema import TrainConfig
from medanomaly.train.loop import TrainResult
from medanomaly.train.loop import train as _train_loop


def train(data: str | Path, out: str | Path, cfg: TrainConfig, splits_file: str | Path | None = None,
          resume: bool = False, device: str = "cpu", progress: bool = True) -> TrainResult:
    """Train on the image/mask pairs (or normal images) in ``data`` and write the finished model
    directory ``out``: weights, the model file with the settings chosen on val, splits, metrics."""
    return _train_loop(data, out, cfg, splits_file, resume=resume, device=device, progress=progress)
