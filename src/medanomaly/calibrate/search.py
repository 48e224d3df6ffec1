"""Calibration of a model directory on its validation split, never on test: the searches of
:mod:`medanomaly.calibrate.thresholds` (threshold and post-processing) and, for the anomaly task,
:mod:`medanomaly.calibrate.maps` (anomaly-map settings) run on the val predictions of
:mod:`medanomaly.calibrate.val`, and their result is written as the model file ``model.json``
(:mod:`medanomaly.config.model_file`). Training calls :func:`calibrate_and_save` once the weights
are final; :func:`recalibrate` and :func:`fit_intensity_baseline` run it on an existing directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medanomaly.calibrate.maps import choose_map
from medanomaly.calibrate.thresholds import calibrate_anomaly, search
from medanomaly.calibrate.val import val_predictions
from medanomaly.config import schema as config_mod
from medanomaly.config.model_file import TrainingSummary, build_model_file, read_model_file, write_model_file
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import PostprocessParams
from medanomaly.core.atomic import atomic_write_text

log = logging.getLogger(__name__)


def calibrate_and_save(out: Path, cfg: TrainConfig, data: Path, in_channels: int, best_epoch: int,
                       best_val: float, device: torch.device, progress: bool = True) -> PostprocessParams:
    """Write ``out/model.json`` with the post-processing (and, for the anomaly task, the map
    settings) chosen on the validation split of ``out/splits.json``; the network is read back from
    ``out/model.pt``, exactly as predict will. ``best_epoch``/``best_val``: the training summary
    (-1/NaN when nothing was trained). Returns the chosen post-processing."""
    training = TrainingSummary(best_epoch, best_val, "mean per-case Dice at 0.5 (training size)"
                               if cfg.task == "supervised" else f"minus the {cfg.anomaly.method} training loss on "
                               "normal val slices")

    def write(cfg: TrainConfig, post: PostprocessParams, calibration: dict[str, Any]) -> None:
        write_model_file(build_model_file(cfg, in_channels, post, training, calibration), out)

    write(cfg, PostprocessParams(), {"status": "pending"})  # the Predictor of the val predictions reads it
    if cfg.task == "anomaly":
        cfg, map_choice = choose_map(out, data, cfg, device)
        write(cfg, PostprocessParams(), {"status": "pending"})
        best, calibration = calibrate_anomaly(val_predictions(out, data, device, False, progress), cfg)
        calibration["map_selection"] = map_choice
    else:
        best, calibration = _calibrate_supervised(out, data, device, progress)
    log.info("post-processing chosen on val: %s (%s)", best.to_dict(),
             {k: v for k, v in calibration.items() if k not in ("map_selection", "trials")})
    write(cfg, best, calibration)
    return best


def _calibrate_supervised(out: Path, data: Path, device: torch.device,
                          progress: bool) -> tuple[PostprocessParams, dict[str, Any]]:
    """:func:`medanomaly.calibrate.thresholds.search` on the labelled val images, and its record."""
    v = val_predictions(out, data, device, True, progress)
    best, value, trials = search(v["scores"], v["truths"], v["cases"], v["images"])
    return best, {"split": "val", "objective": "mean per-case Dice", "n_images": len(v["scores"]),
                  "n_cases": len(set(v["cases"])), "mean_case_dice": value,
                  "mean_case_dice_at_0.5": next(t["mean_case_dice"] for t in trials
                                                if t["threshold"] == 0.5 and t["min_size"] == 0),
                  "trials": len(trials)}


def recalibrate(model_dir: str | Path, data: str | Path, device: str = "cpu",
                progress: bool = True) -> PostprocessParams:
    """Choose the threshold and post-processing (and the anomaly map settings) again on the val
    split of an existing model directory, e.g. after a change of medanomaly or of --target-fpr.
    The search starts from the configuration as trained (``config.json``)."""
    model_dir = Path(model_dir)
    mf = read_model_file(model_dir)
    cfg = config_mod.load(model_dir / "config.json")
    return calibrate_and_save(model_dir, cfg, Path(data), mf.input.channels, mf.training.best_epoch,
                              mf.training.best_val_score, torch.device(device), progress)


def fit_intensity_baseline(model_dir: Path, data: Path, out: Path, device: str = "cpu", progress: bool = True) -> Path:
    """Calibrate the intensity baseline on the val split of an existing model directory (same
    splits, size and normalisation), writing a model directory of its own in ``out``."""
    cfg = config_mod.load(model_dir / "config.json", {"task": "anomaly", "anomaly.method": "intensity"})
    in_ch = read_model_file(model_dir).input.channels
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "splits.json", (model_dir / "splits.json").read_text())
    config_mod.save(cfg, out / "config.json")
    calibrate_and_save(out, cfg, data, in_ch, -1, float("nan"), device=torch.device(device), progress=progress)
    return out
