"""The anomaly-map settings (residual sign, foreground erosion, median filter size) chosen on the
labelled val slices by pixel AUPRC, at the model's input size: one forward pass of the network,
then cheap variants of the map (:func:`medanomaly.anomaly.methods.map_variants`). The choice is
written into the configuration (``TrainConfig.anomaly``) that the model file records."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medanomaly.anomaly.methods import map_variants, residual_map
from medanomaly.calibrate.val import val_samples
from medanomaly.config.model_file import ModelFile
from medanomaly.config.schema import TrainConfig
from medanomaly.data.slices import load_slices
from medanomaly.infer.predictor import Predictor
from medanomaly.metrics.functional import auprc

log = logging.getLogger(__name__)
BATCH = 32  # val slices per network call


def choose_map(out: Path, data: Path, cfg: TrainConfig, device: torch.device | str,
               model_file: ModelFile | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """``cfg`` with the anomaly-map settings of the best val AUPRC, and the record of the choice.
    Without lesions in val (or with ``select_map_on_val`` off, or for a 3D model) the configured
    settings are kept. The network is ``out/model.pt`` run as ``model_file`` describes it (default:
    ``out/model.json``)."""
    if cfg.model.dim == 3:
        return cfg, {"selected": False, "reason": "3D model: the configured map settings are kept"}
    samples = val_samples(out, data, labelled_only=True)
    if not cfg.anomaly.select_map_on_val or not samples:
        return cfg, {"selected": False, "reason": "disabled or no labelled val images"}
    val = load_slices(samples, cfg.size, cfg.normalization, True)
    if not bool(val.lesion.any()):
        return cfg, {"selected": False, "reason": "no lesion in the val masks"}
    predictor, x = Predictor(out, device, model_file=model_file), val.images.float()
    recon = None
    if predictor.model is not None:
        with torch.inference_mode():
            recon = torch.cat([predictor.network_output(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]).numpy()
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
