"""Unsupervised anomaly detection from normal images: reconstruction residuals.

A U-Net with skip connections trained to reproduce its input learns the identity and copies
lesions too. Trained as a *denoiser* of coarse, low-frequency noise instead (Kascenas et al.,
"Denoising autoencoders for unsupervised anomaly detection in brain MRI", MIDL 2022), it must
replace corrupted regions with plausible normal anatomy; on a new image the regions it cannot
reproduce (large ``|x - x_hat|``) are flagged as abnormal.

Methods (``AnomalyConfig.method``, a registry whose errors list the keys):

* ``denoise``: coarse-noise denoising U-Net (the default);
* ``identity``: the same U-Net trained without noise, the ablation that shows why;
* ``intensity``: no network; the normalised intensity itself is the score (the classic strong
  baseline for FLAIR hyperintensities);
* ``synthetic``: a self-supervised segmenter, as FPI (Tan et al., "Detecting outliers with foreign
  patch interpolation", MELBA 2022) and DRAEM (Zavrtanik et al., ICCV 2021): normal images get
  synthetic anomalies pasted in (:func:`medanomaly.data.synthetic.paste_anomaly`) and the U-Net learns
  to segment them; its probability is the anomaly map. It returns logits, not a reconstruction.

Shapes: images (N, C, H, W) in about [0, 1]; foreground masks (N, 1, H, W) in {0, 1}.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from medanomaly.config.options import RESIDUALS
from medanomaly.config.sections import AnomalyConfig
from medanomaly.core.runtime import match_layout
from medanomaly.data.foreground import foreground_mask
from medanomaly.data.synthetic import add_synthetic_anomalies
from medanomaly.models.losses import get_loss
from medanomaly.postprocess.ops import median_filter_scores


def coarse_noise(shape: tuple[int, ...], res: int, std: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn at (res, res) and upsampled bilinearly to shape (N, C, H, W).

    Its power sits below about res/2 cycles per image side: blobs the size of lesions, which
    the network can only remove by knowing what normal tissue looks like there.
    3D patches (N, C, D, H, W): ``res`` cells along the longest axis and cells of the same size
    (voxels) along the others (at least 2 per axis), upsampled trilinearly.
    """
    if len(shape) == 5:
        n, c, *size = shape
        grid = [max(2, round(s * res / max(size))) for s in size]
        coarse = torch.randn(n, c, *grid, generator=gen) * std
        return F.interpolate(coarse, size=tuple(size), mode="trilinear", align_corners=False)
    n, c, h, w = shape
    coarse = torch.randn(n, c, res, res, generator=gen) * std
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def foreground(images: torch.Tensor, erode: int = 0) -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W) float foreground (Otsu, largest components, holes filled)."""
    out = [foreground_mask(img.float().mean(0).numpy(), erode=erode) for img in images]
    return torch.from_numpy(np.stack(out)[:, None].astype(np.float32))


def denoise_loss(model: torch.nn.Module, x: torch.Tensor, fg: torch.Tensor, cfg: AnomalyConfig,
                 gen: torch.Generator, autocast_ctx) -> torch.Tensor:
    """Mean squared error of the reconstruction of x from x + fg * noise, inside the foreground."""
    noisy = x
    if cfg.method == "denoise":
        noisy = x + fg * coarse_noise(tuple(x.shape), cfg.noise_res, cfg.noise_std, gen).to(x.device)
    with autocast_ctx:
        recon = model(match_layout(noisy, model))
    err = (recon.float() - x) ** 2 * fg
    return err.sum() / (fg.sum() * x.shape[1]).clamp_min(1.0)


def output_channels(method: str, in_channels: int) -> int:
    """Channels the network of ``method`` returns: a reconstruction, or one logit map (synthetic)."""
    return 1 if method == "synthetic" else in_channels


def anomaly_loss(model: torch.nn.Module, x: torch.Tensor, fg: torch.Tensor, cfg: AnomalyConfig,
                 gen: torch.Generator, autocast_ctx) -> torch.Tensor:
    """The training loss of ``cfg.method``: :func:`denoise_loss`, or (synthetic) BCE + Dice of
    segmenting anomalies pasted into the normal images x (N, C, H, W) inside their foreground fg."""
    if cfg.method != "synthetic":
        return denoise_loss(model, x, fg, cfg, gen, autocast_ctx)
    xa, target = add_synthetic_anomalies(x.cpu(), fg.cpu(), cfg.synthetic_p, gen)
    with autocast_ctx:
        logits = model(match_layout(xa.to(x.device), model))
    return get_loss("bce+dice", 0.5)(logits.float(), target.to(x.device))


def residual_map(x: np.ndarray, recon: np.ndarray | None, cfg: AnomalyConfig) -> np.ndarray:
    """Anomaly map of one image at model size: x, recon (C, H, W) -> (H, W) float32.

    The residual ``x - recon`` (absolute, or only its positive or negative part, per
    ``cfg.residual``) averaged over channels (for ``intensity``: x itself; for ``synthetic``,
    recon is the network's anomaly probability (1, H, W)), zero outside the eroded foreground,
    median filtered.
    """
    fg = foreground_mask(x.mean(0), erode=cfg.erode)
    if recon is None:
        raw = x.mean(0)
    elif cfg.method == "synthetic":
        raw = recon.mean(0)
    else:
        raw = _signed(x - recon, cfg.residual).mean(0)
    score = median_filter_scores(raw * fg, cfg.median_size) if cfg.median_size > 1 else raw * fg
    return (score * fg).astype(np.float32)


def image_score(score: np.ndarray, cfg: AnomalyConfig) -> float:
    """Image-level anomaly score: a high quantile of the map (robust to a few hot pixels)."""
    return float(np.quantile(score, cfg.image_quantile)) if score.size else 0.0


def _signed(diff: np.ndarray, residual: str) -> np.ndarray:
    if residual == "positive":
        return np.clip(diff, 0, None)
    if residual == "negative":
        return np.clip(-diff, 0, None)
    return np.abs(diff)


def map_variants(cfg: AnomalyConfig) -> list[AnomalyConfig]:
    """Anomaly-map settings tried on the validation split (residual sign x erosion x median)."""
    residuals = RESIDUALS if cfg.method not in ("intensity", "synthetic") else ("abs",)  # no residual there
    return [replace(cfg, residual=r, erode=e, median_size=m) for r in residuals for e in (3, 6) for m in (5, 7)]
