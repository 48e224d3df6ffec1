"""Calibration of a model directory on its validation split, never on test: the searches of
:mod:`medanomaly.calibrate.thresholds` (threshold and post-processing) and, for the anomaly task,
:mod:`medanomaly.calibrate.maps` (anomaly-map settings) run on the val predictions of
:mod:`medanomaly.calibrate.val`, and their result is written as the model file ``model.json``
(:mod:`medanomaly.config.model_file`), last and atomically: a directory without it is visibly
unfinished, and an interrupted or failed calibration leaves none.

Training calls :func:`calibrate_and_save` once the weights are final; :func:`recalibrate` runs it
again on a finished or interrupted run (``medanomaly calibrate``: :func:`calibrate_model`), and
:func:`fit_intensity_baseline` for the intensity baseline.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from medanomaly.calibrate.maps import choose_map
from medanomaly.calibrate.thresholds import calibrate_anomaly, calibrate_labels, search
from medanomaly.calibrate.val import val_predictions, val_samples
from medanomaly.config import schema as config_mod
from medanomaly.config.labels import parse_labels, several
from medanomaly.config.model_file import (
    FILE_NAME,
    WEIGHTS_FILE,
    ModelFile,
    TrainingSummary,
    build_model_file,
    is_pending,
    read_model_file,
    write_model_file,
)
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import PostprocessParams
from medanomaly.core.atomic import atomic_write_text, file_sha256
from medanomaly.core.errors import MedanomalyError
from medanomaly.data.discover import channel_names_of, discover, read_sample
from medanomaly.data.volumes import training_geometry
from medanomaly.train.checkpoint import remove_stale_temp_files
from medanomaly.train.run import RunRecord, run_record, training_facts

log = logging.getLogger(__name__)


def calibrate_and_save(out: Path, cfg: TrainConfig, data: Path, in_channels: int, best_epoch: int,
                       best_val: float, device: torch.device, progress: bool = True) -> PostprocessParams:
    """Write ``out/model.json`` with the post-processing (and, for the anomaly task, the map
    settings) chosen on the validation split of ``out/splits.json``. The val predictions run the
    network of ``out/model.pt`` (its SHA-256 recorded in the model file) exactly as predict will,
    from the model file in memory; model.json is written last. ``best_epoch``/``best_val``: the
    training summary (-1/NaN when nothing was trained). Returns the chosen post-processing."""
    training = TrainingSummary(best_epoch, best_val, _val_score(cfg), **training_facts(out, cfg))
    digest = _weights_digest(out, build_model_file(cfg, in_channels, PostprocessParams(), training, {}))
    train_cases = set(json.loads((out / "splits.json").read_text())["train"])
    train_samples = [s for s in discover(data) if s.case in train_cases]
    geometry = training_geometry(train_samples)  # orientation, spacing
    names = channel_names_of(train_samples)  # e.g. FLAIR, T1: predict refuses other channels by name

    def model_file(cfg: TrainConfig, post: PostprocessParams | None = None, calibration: dict[str, Any] | None = None,
                   label_posts: tuple[PostprocessParams, ...] = ()) -> ModelFile:
        return build_model_file(cfg, in_channels, post or PostprocessParams(), training, calibration or {}, digest,
                                geometry, names, label_posts)

    if cfg.task == "anomaly":
        cfg, map_choice = choose_map(out, data, cfg, device, model_file(cfg))
        best, calibration = calibrate_anomaly(val_predictions(out, data, device, False, progress, model_file(cfg)), cfg)
        calibration["map_selection"] = map_choice
    elif several(cfg.labels):
        label_posts, calibration = calibrate_labels(val_predictions(out, data, device, True, progress, model_file(cfg)),
                                                    parse_labels(cfg.labels))
        write_model_file(model_file(cfg, None, calibration, label_posts), out)  # last: the directory is finished
        return PostprocessParams()
    else:
        best, calibration = _calibrate_supervised(out, data, device, progress, model_file(cfg))
    log.info("post-processing chosen on val: %s (%s)", best.to_dict(),
             {k: v for k, v in calibration.items() if k not in ("map_selection", "trials")})
    write_model_file(model_file(cfg, best, calibration), out)  # last: the directory is now finished
    return best


def _val_score(cfg: TrainConfig) -> str:
    """What the training record's best validation score measures."""
    if cfg.task == "anomaly":
        return f"minus the {cfg.anomaly.method} training loss on normal val slices"
    if several(cfg.labels):
        return "mean over the labels of the mean per-case Dice of the most probable class (training size)"
    return "mean per-case Dice at 0.5 (training size)"


def _weights_digest(out: Path, model_file: ModelFile) -> str | None:
    """The SHA-256 of ``out/model.pt`` (None without a network: the 'intensity' method)."""
    if not model_file.has_network:
        return None
    try:
        return file_sha256(out / WEIGHTS_FILE)
    except FileNotFoundError:
        raise MedanomalyError(f"{out / WEIGHTS_FILE} is missing: no epoch of the training ended, so there is "
                              f"nothing to calibrate; train again ('medanomaly train DATA --out {out}')") from None


def _calibrate_supervised(out: Path, data: Path, device: torch.device, progress: bool,
                          model_file: ModelFile) -> tuple[PostprocessParams, dict[str, Any]]:
    """:func:`medanomaly.calibrate.thresholds.search` on the labelled val images, and its record."""
    v = val_predictions(out, data, device, True, progress, model_file)
    best, value, trials = search(v["scores"], v["truths"], v["cases"], v["images"])
    return best, {"split": "val", "objective": "mean per-case Dice", "n_images": len(v["scores"]),
                  "n_cases": len(set(v["cases"])), "mean_case_dice": value,
                  "mean_case_dice_at_0.5": next(t["mean_case_dice"] for t in trials
                                                if t["threshold"] == 0.5 and t["min_size"] == 0),
                  "trials": len(trials)}


def recalibrate(model_dir: str | Path, data: str | Path, device: str = "cpu",
                progress: bool = True) -> PostprocessParams:
    """Choose the threshold and post-processing (and the anomaly map settings) again on the val
    split of a model directory: a finished one (e.g. after a change of medanomaly or of
    --target-fpr), or one whose calibration was interrupted or failed (no model.json, or a pending
    one). The search starts from the configuration as trained (``config.json``); refused while the
    training itself has not ended (``--resume`` completes that)."""
    model_dir, data = Path(model_dir), Path(data)
    cfg = _trained_config(model_dir)
    record = run_record(model_dir, cfg)
    if not record.ended:
        raise MedanomalyError(f"{model_dir}: its training has not ended ({record.reason}), so there is nothing to "
                              f"calibrate yet; complete it with 'medanomaly train DATA --out {model_dir} --resume'")
    in_ch, best_epoch, best_val = _summary(model_dir, data, record)
    remove_stale_temp_files(model_dir)  # e.g. the model.json of a write that a kill cut off
    return calibrate_and_save(model_dir, cfg, data, in_ch, best_epoch, best_val, torch.device(device), progress)


def calibrate_model(model_dir: str | Path, data: str | Path, device: str = "cpu", overwrite: bool = False,
                    progress: bool = True) -> PostprocessParams:
    """``medanomaly calibrate``: :func:`recalibrate`, refusing to replace the model.json of a finished
    directory without ``overwrite`` (an unfinished one has none, or a pending one, to complete)."""
    model_dir = Path(model_dir)
    if (model_dir / FILE_NAME).is_file() and not overwrite and not _pending(model_dir / FILE_NAME):
        raise MedanomalyError(f"{model_dir} already holds a model file ({model_dir / FILE_NAME}); pass --overwrite "
                              "to choose its threshold and post-processing again")
    if not Path(data).is_dir():
        raise MedanomalyError(f"--data {data} is not a folder; pass the data folder {model_dir} was trained on")
    return recalibrate(model_dir, data, device, progress)


def _pending(path: Path) -> bool:
    """``path`` is the model.json of an interrupted calibration of an earlier release."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and is_pending(data)


def _trained_config(model_dir: Path) -> TrainConfig:
    """The run's config.json; refused where ``model_dir`` is no training run."""
    if not (model_dir / "config.json").is_file() or not (model_dir / "splits.json").is_file():
        raise MedanomalyError(f"{model_dir} is not the folder of a training run (no config.json or splits.json); "
                              "pass the --out folder of 'medanomaly train'")
    return config_mod.load(model_dir / "config.json")


def _summary(model_dir: Path, data: Path, record: RunRecord) -> tuple[int, int, float]:
    """(input channels, best epoch, its val score): the checkpoint's numbers (as training handed
    them over), else those of an existing model.json; channels from model.json, else the data."""
    samples = val_samples(model_dir, data, labelled_only=False)
    if not samples:
        raise MedanomalyError(f"none of the val cases of {model_dir / 'splits.json'} has an image in {data}; pass "
                              "the data folder the model was trained on")
    previous = read_model_file(model_dir, finished=False) if (model_dir / FILE_NAME).is_file() else None
    in_ch = previous.input.channels if previous is not None else read_sample(samples[0]).channels
    if (model_dir / "checkpoint.pt").is_file() or previous is None:
        return in_ch, record.best_epoch, record.best_val_score
    return in_ch, previous.training.best_epoch, previous.training.best_val_score


def fit_intensity_baseline(model_dir: Path, data: Path, out: Path, device: str = "cpu", progress: bool = True) -> Path:
    """Calibrate the intensity baseline on the val split of an existing model directory (same
    splits, size and normalisation), writing a model directory of its own in ``out``."""
    cfg = config_mod.load(model_dir / "config.json", {"task": "anomaly", "anomaly.method": "intensity"})
    in_ch = read_model_file(model_dir).input.channels
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "splits.json", (model_dir / "splits.json").read_text())
    config_mod.save(cfg, out / "config.json")
    calibrate_and_save(out, cfg, data, in_ch, -1, math.nan, device=torch.device(device), progress=progress)
    return out
