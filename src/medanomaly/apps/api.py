"""The Python API: what the CLI commands do, as functions. ``train`` runs the training
(:func:`medanomaly.train.run.train`) and then chooses the threshold and post-processing on the
validation split (:mod:`medanomaly.calibrate`), so a model directory it returns is finished; what
the options and the data listing allow is checked before the training starts. ``calibrate``
completes (or repeats) the calibration of a trained model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from medanomaly.calibrate.search import calibrate_and_save, calibrate_model
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import PostprocessParams
from medanomaly.core import distributed
from medanomaly.core.errors import MedanomalyError
from medanomaly.train.prepare import usable_and_splits
from medanomaly.train.run import TrainResult
from medanomaly.train.run import train as _train_run


def train(data: str | Path, out: str | Path, cfg: TrainConfig, splits_file: str | Path | None = None,
          resume: bool = False, device: str = "cpu", progress: bool = True) -> TrainResult:
    """Train on the image/mask pairs (or normal images) in ``data`` and write the finished model
    directory ``out``: weights, the model file with the settings chosen on val, splits, metrics.
    Everything the options and the data listing allow is checked before any image is loaded
    (:func:`medanomaly.train.run.check_run`; each setting's range by the configuration itself);
    ``model.json`` is written last, once calibrated.

    Under torchrun rank 0 calibrates (on the weights of the best epoch, read back from model.pt)
    while the other processes wait; all return once model.json is written."""
    res = _train_run(data, out, cfg, splits_file, resume=resume, device=device, progress=progress)
    if distributed.is_main():
        calibrate_and_save(res.out_dir, res.cfg, Path(data), res.in_channels, res.best_epoch, res.best_val_score,
                           device=torch.device(device), progress=progress)
    distributed.barrier()
    return res


def calibrate(model_dir: str | Path, data: str | Path, device: str = "cpu", overwrite: bool = False,
              progress: bool = True) -> PostprocessParams:
    """Calibrate the trained network of ``model_dir`` on the val split of ``data`` (the folder it was
    trained on) and write its model.json: completes a run whose calibration was interrupted or
    failed; replaces the model file of a finished one only with ``overwrite``."""
    return calibrate_model(model_dir, data, device, overwrite, progress)


def check_test_split(data: str | Path, cfg: TrainConfig, splits_file: str | Path | None = None) -> None:
    """Before training for an evaluation on the test split (``demo --data``): the split of ``data``
    (``splits_file``, else DATA/splits.json, else the seeded split training makes) must leave
    labelled test images, else the evaluation would fail after the training minutes."""
    usable, splits = usable_and_splits(Path(data), cfg, splits_file)
    test = set(splits.get("test", []))
    if not any(s.case in test and s.mask is not None for s in usable):
        raise MedanomalyError(f"the split of {data} leaves no labelled test image (test cases: {len(test)}) for the "
                              "evaluation that follows training; add cases, or a splits.json with a 'test' list")
