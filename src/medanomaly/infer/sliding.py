"""Sliding-window inference over a volume with overlapping, Gaussian-weighted patches.

The windows and weights are those of nnU-Net and of MONAI's ``sliding_window_inference``
(``mode="gaussian"``, ``sigma_scale=0.125``, ``padding_mode="constant"``): windows step by
``int(patch * (1 - overlap))`` voxels, the last one of each axis is moved back to end at the
border, an input smaller than the patch is zero-padded symmetrically, and each voxel's output
is the importance-weighted mean of the windows that cover it. MONAI is not a dependency of
medanomaly (it is a bench extra); ``tests/infer/test_sliding.py`` checks that this function gives
MONAI's output where MONAI is installed, and ``bench/speed.py`` times both.

Shapes: ``volume`` (C, *S) with S = (Z, Y, X) (any number of spatial axes works); ``forward``
maps a batch (N, C, *patch) to (N, out_ch, *patch); the result is (out_ch, *S), float32. All
sizes are voxels.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from medanomaly.core.progress import track

Forward = Callable[[torch.Tensor], torch.Tensor]
OVERLAP = 0.5  # share of a window shared with its neighbour at inference (nnU-Net and MONAI's usual 0.5)


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 0.125,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Separable Gaussian weight map of shape ``patch`` (float32), 1 at the centre, sigma =
    ``sigma_scale`` x patch size per axis, clamped below at max(its minimum, 1e-3) so every
    voxel of a window has a positive weight (as MONAI's ``compute_importance_map``)."""
    weight = torch.ones((), dtype=torch.float32, device=device)
    for i, p in enumerate(patch):
        x = torch.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=torch.float32, device=device)[:p]
        g = torch.exp(x**2 / (-2 * (sigma_scale * p) ** 2))
        weight = weight.unsqueeze(-1) * g if i > 0 else g
    return weight.clamp_min(max(float(weight.min()), 1e-3))


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start voxels of the windows along one axis of ``size`` voxels (``size >= patch``): every
    ``int(patch * (1 - overlap))`` voxels (at least 1), the last moved back to end at ``size``."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = next(k for k in range(math.ceil(size / step) + 1) if k * step + patch >= size) + 1
    return [min(k * step, size - patch) for k in range(n)]


def sliding_window(volume: torch.Tensor, patch: Sequence[int], forward: Forward, overlap: float = 0.5,
                   batch: int = 4, sigma_scale: float = 0.125, progress: bool = False) -> torch.Tensor:
    """Run ``forward`` over overlapping windows of ``volume`` and blend them.

    volume (C, *S) float tensor (not modified); patch: window size in voxels per spatial axis;
    overlap in [0, 1): share of a window shared with its neighbour; batch: windows per forward
    call. Returns (out_ch, *S) float32 on the volume's device. Memory: the output and weight
    buffers of the (padded) volume plus one batch of windows.
    """
    if volume.ndim != len(patch) + 1:
        raise ValueError(f"volume must be (C, *S) with {len(patch)} spatial axes for patch {tuple(patch)}, "
                         f"got shape {tuple(volume.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    size = tuple(int(s) for s in volume.shape[1:])
    patch = tuple(int(p) for p in patch)
    pads, crop = [], []
    for s, p in zip(size, patch):  # symmetric zero padding up to the patch size (MONAI's default)
        lo, hi = max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2
        pads, crop = [lo, hi] + pads, crop + [slice(lo, lo + s)]
    x = F.pad(volume.float(), pads) if any(pads) else volume.float()
    padded = tuple(int(s) for s in x.shape[1:])
    grids = [window_starts(s, p, overlap) for s, p in zip(padded, patch)]
    starts = [tuple(int(v) for v in idx) for idx in torch.cartesian_prod(
        *[torch.tensor(g) for g in grids]).reshape(-1, len(patch)).tolist()]
    weight = gaussian_importance(patch, sigma_scale, x.device)
    out: torch.Tensor | None = None
    norm = torch.zeros(padded, dtype=torch.float32, device=x.device)
    for i in track(range(0, len(starts), batch), desc="windows", unit="batch", enabled=progress, leave=False):
        chunk = starts[i:i + batch]
        boxes = [tuple(slice(a, a + p) for a, p in zip(st, patch)) for st in chunk]
        pred = forward(torch.stack([x[(slice(None),) + b] for b in boxes])).float()
        if out is None:
            out = torch.zeros((pred.shape[1],) + padded, dtype=torch.float32, device=x.device)
        for k, b in enumerate(boxes):
            out[(slice(None),) + b] += pred[k].to(x.device) * weight
            norm[b] += weight
    assert out is not None
    return (out / norm)[(slice(None),) + tuple(crop)]
