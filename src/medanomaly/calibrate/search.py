"""Choose the threshold and post-processing on the validation split, never on test.

The search maximises the mean per-case Dice (the number users report) over the validation
images at their original size, by coordinate ascent: threshold x minimum component size first,
then hole filling, then boundary smoothing, each kept only if it helps.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from medanomaly.anomaly.methods import map_variants, output_channels, residual_map
from medanomaly.config import schema as config_mod
from medanomaly.config.schema import TrainConfig
from medanomaly.core.atomic import atomic_write_text
from medanomaly.core.version import __version__
from medanomaly.data.foreground import foreground_mask
from medanomaly.data.slices import Sample, discover, load_slices
from medanomaly.infer.predictor import Predictor
from medanomaly.infer.volume import val_predictions_3d
from medanomaly.io import read_image, read_mask
from medanomaly.metrics.functional import Stats, auprc, best_dice_threshold, dice, get_stats, threshold_at_fpr
from medanomaly.postprocess.ops import PostprocessParams, apply

log = logging.getLogger(__name__)

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MIN_SIZES = (0, 10, 25, 50, 100, 200, 400)  # pixels (voxels) of the original image


def mean_case_dice(preds: list[np.ndarray], truths: list[np.ndarray], cases: list[str]) -> float:
    """Mean over cases of the Dice of each case's pooled pixels (slices of a case pooled)."""
    per_case: dict[str, Stats] = {}
    for p, t, c in zip(preds, truths, cases):
        s = get_stats(p, t)
        per_case[c] = per_case[c] + s if c in per_case else s
    return float(np.mean([dice(s) for s in per_case.values()]))


def search(scores: list[np.ndarray], truths: list[np.ndarray], cases: list[str], images: list[np.ndarray]) -> tuple[PostprocessParams, float, list[dict]]:
    """Coordinate-ascent search of PostprocessParams; returns (best, its mean case Dice, trials)."""
    trials: list[dict] = []

    def score_of(params: PostprocessParams) -> float:
        preds = [apply(s, params, image=im) for s, im in zip(scores, images)]
        value = mean_case_dice(preds, truths, cases)
        trials.append({**params.to_dict(), "mean_case_dice": value})
        return value

    best, best_value = PostprocessParams(), -1.0
    for t in THRESHOLDS:
        for m in MIN_SIZES:
            cand = PostprocessParams(threshold=t, min_size=m)
            value = score_of(cand)
            if value > best_value + 1e-9:
                best, best_value = cand, value
    for change in ({"fill_holes": True}, {"smooth_radius": 1}, {"smooth_radius": 2}):
        cand = replace(best, **change)
        value = score_of(cand)
        if value > best_value + 1e-9:
            best, best_value = cand, value
    return best, best_value, trials


def model_meta(cfg: TrainConfig, in_channels: int, post: PostprocessParams, extra: dict) -> dict:
    """The content of model.json: everything predict needs, nothing that identifies a patient."""
    out_channels = output_channels(cfg.anomaly.method, in_channels) if cfg.task == "anomaly" else 1
    meta = {
        "format": "medanomaly-model",
        "medanomaly_version": __version__,
        "task": cfg.task,
        "model": {**cfg.model.to_dict(), "in_channels": in_channels, "out_channels": out_channels},
        "input": {"channels": in_channels, "size": cfg.size, "normalization": cfg.normalization, "dim": cfg.model.dim,
                  "tta": cfg.tta and cfg.task == "supervised",
                  **({"patch": list(cfg.patch or ()), "spacing": cfg.spacing and list(cfg.spacing)}
                     if cfg.model.dim == 3 else {})},  # 3D: sliding-window patch (voxels), training spacing (mm)
        "precision": cfg.precision,
        "postprocess": post.to_dict(),
        **extra,
    }
    if cfg.task == "anomaly":
        meta["anomaly"] = cfg.anomaly.to_dict()
    return meta


def val_samples(out: Path, data: Path, labelled_only: bool = True) -> list[Sample]:
    splits = json.loads((out / "splits.json").read_text())
    val = set(splits["val"])
    return [s for s in discover(data) if s.case in val and (s.mask is not None or not labelled_only)]


def _val_predictions(out: Path, data: Path, device, labelled_only: bool, progress: bool) -> dict[str, list]:
    """Score maps, truths (all False without a mask), cases and grey images of the val split."""
    from tqdm import tqdm

    predictor = Predictor(out, device)
    if predictor.dim == 3:  # whole volumes (stacked slices too), post-processed in 3D

        return val_predictions_3d(predictor, val_samples(out, data, labelled_only), progress)
    res: dict[str, list] = {"scores": [], "truths": [], "cases": [], "images": [], "labelled": []}
    for s in tqdm(val_samples(out, data, labelled_only), desc="calibrating", unit="img", disable=not progress):
        img = read_image(s.image)
        res["scores"].append(predictor.scores(img))
        res["truths"].append(read_mask(s.mask, like=img) if s.mask else np.zeros(img.spatial_shape, bool))
        res["cases"].append(s.case)
        res["images"].append(img.array.mean(axis=0))
        res["labelled"].append(s.mask is not None)
    return res


def calibrate_and_save(out: Path, cfg: TrainConfig, data: Path, in_channels: int, best_epoch: int,
                       best_val: float, device: torch.device, progress: bool = True) -> PostprocessParams:
    """Write model.json with post-processing chosen on the validation split of ``out/splits.json``
    (the network is read back from ``out/model.pt``, exactly as predict will)."""
    training = {"best_epoch": best_epoch, "best_val_score": best_val,
                "val_score": "mean per-case Dice at 0.5 (training size)" if cfg.task == "supervised"
                else f"minus the {cfg.anomaly.method} training loss on normal val slices"}

    def write_meta(cfg: TrainConfig, post: PostprocessParams, calibration: dict) -> None:
        meta = model_meta(cfg, in_channels, post, {"training": training, "calibration": calibration})
        atomic_write_text(out / "model.json", json.dumps(meta, indent=2))

    write_meta(cfg, PostprocessParams(), {"status": "pending"})  # Predictor reads it
    if cfg.task == "anomaly":
        cfg, map_choice = choose_map(out, data, cfg, device)
        write_meta(cfg, PostprocessParams(), {"status": "pending"})
        best, calibration = calibrate_anomaly(_val_predictions(out, data, device, False, progress), cfg)
        calibration["map_selection"] = map_choice
    else:
        v = _val_predictions(out, data, device, True, progress)
        best, value, trials = search(v["scores"], v["truths"], v["cases"], v["images"])
        calibration = {"split": "val", "objective": "mean per-case Dice", "n_images": len(v["scores"]),
                       "n_cases": len(set(v["cases"])), "mean_case_dice": value,
                       "mean_case_dice_at_0.5": next(t["mean_case_dice"] for t in trials
                                                     if t["threshold"] == 0.5 and t["min_size"] == 0),
                       "trials": len(trials)}
    log.info("post-processing chosen on val: %s (%s)", best.to_dict(),
             {k: v for k, v in calibration.items() if k not in ("map_selection", "trials")})
    write_meta(cfg, best, calibration)
    return best


def calibrate_anomaly(v: dict[str, list], cfg: TrainConfig) -> tuple[PostprocessParams, dict]:
    """Anomaly thresholds on val: (a) from normal images only, at the target pixel FPR inside the
    foreground; (b) where val masks with lesions exist, threshold and minimum component size
    maximising the pooled Dice over all val images. (b) is used when available."""
    normal = [i for i, t in enumerate(v["truths"]) if not t.any()]
    fg_scores = np.concatenate([v["scores"][i][foreground_mask(v["images"][i])] for i in normal] or [np.zeros(1)])
    t_fpr = threshold_at_fpr(fg_scores, cfg.anomaly.target_fpr)
    calib = {"split": "val", "target_fpr": cfg.anomaly.target_fpr, "threshold_at_target_fpr": t_fpr,
             "n_normal_images": len(normal), "achieved_fpr": float((fg_scores > t_fpr).mean()),
             "n_images": len(v["scores"])}
    if not any(t.any() for t in v["truths"]):
        calib["mode"] = "target_fpr (no lesion masks in val)"
        return PostprocessParams(threshold=t_fpr), calib
    flat_s = np.concatenate([s.ravel() for s in v["scores"]])
    flat_t = np.concatenate([t.ravel() for t in v["truths"]])
    t0, _ = best_dice_threshold(flat_s, flat_t, n_thresholds=200)
    best, best_dice = PostprocessParams(threshold=t_fpr), -1.0
    for t in np.unique([t0 * f for f in (0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25)]):
        for m in MIN_SIZES:
            params = PostprocessParams(threshold=float(t), min_size=m)
            stats = sum((get_stats(apply(s, params), tr) for s, tr in zip(v["scores"], v["truths"])), Stats(0, 0, 0, 0))
            if dice(stats) > best_dice + 1e-9:
                best, best_dice = params, dice(stats)
    calib.update({"mode": "dice_on_val", "objective": "pooled Dice over val images", "val_dice": best_dice})
    return best, calib


def choose_map(out: Path, data: Path, cfg: TrainConfig, device) -> tuple[TrainConfig, dict]:
    """The anomaly-map settings (residual sign, foreground erosion, median size) with the best pixel
    AUPRC on the labelled val slices, at the model's input size (one forward pass, then cheap
    variants). Without lesions in val, the configured settings are kept."""
    if cfg.model.dim == 3:
        return cfg, {"selected": False, "reason": "3D model: the configured map settings are kept"}
    samples = val_samples(out, data, labelled_only=True)
    if not cfg.anomaly.select_map_on_val or not samples:
        return cfg, {"selected": False, "reason": "disabled or no labelled val images"}
    val = load_slices(samples, cfg.size, cfg.normalization, True)
    if not bool(val.lesion.any()):
        return cfg, {"selected": False, "reason": "no lesion in the val masks"}
    predictor, x = Predictor(out, device), val.images.float()
    recon = None
    if predictor.model is not None:
        with torch.inference_mode():
            recon = torch.cat([predictor.network_output(x[i:i + 32]) for i in range(0, len(x), 32)]).numpy()
    xs, truth = x.numpy(), val.masks.numpy()[:, 0].astype(bool)
    trials = []
    for v in map_variants(cfg.anomaly):
        maps = np.stack([residual_map(xs[i], None if recon is None else recon[i], v) for i in range(len(xs))])
        trials.append({"residual": v.residual, "erode": v.erode, "median_size": v.median_size,
                       "val_auprc": auprc(maps, truth), "config": v})
    best = max(trials, key=lambda t: t["val_auprc"])
    log.info("anomaly map chosen on val: residual %s, erode %d, median %d (AUPRC %.3f)", best["residual"],
             best["erode"], best["median_size"], best["val_auprc"])
    return replace(cfg, anomaly=best["config"]), {
        "selected": True, "objective": "pixel AUPRC on val slices at the model input size",
        "trials": [{k: v for k, v in t.items() if k != "config"} for t in trials]}


def recalibrate(model_dir: str | Path, data: str | Path, device: str = "cpu", progress: bool = True) -> PostprocessParams:
    """Choose the threshold and post-processing (and the anomaly map settings) again on the val
    split of an existing model directory, e.g. after a change of medanomaly or of --target-fpr."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    cfg = config_mod.load(model_dir / "config.json")
    training = meta.get("training", {})
    return calibrate_and_save(model_dir, cfg, Path(data), meta["input"]["channels"], training.get("best_epoch", -1),
                              training.get("best_val_score", float("nan")), torch.device(device), progress)


def fit_intensity_baseline(model_dir: Path, data: Path, out: Path, device: str = "cpu", progress: bool = True) -> Path:
    """Calibrate the intensity baseline on the val split of an existing model directory (same
    splits, size and normalisation), writing a model directory of its own in ``out``."""
    cfg = config_mod.load(model_dir / "config.json", {"task": "anomaly", "anomaly.method": "intensity"})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "splits.json", (model_dir / "splits.json").read_text())
    config_mod.save(cfg, out / "config.json")
    in_ch = json.loads((model_dir / "model.json").read_text())["input"]["channels"]
    calibrate_and_save(out, cfg, data, in_ch, -1, float("nan"), device=torch.device(device), progress=progress)
    return out
