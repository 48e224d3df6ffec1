"""Synthetic lesions from a mask-conditioned generator (pix2pix-style GAN): ``medanomaly synthesize``.

The generator (a :class:`~medanomaly.models.unet.UNet`) fills in a lesion: its input is the image with
the lesion region erased (the mask dilated by ``margin`` pixels, set to 0), the lesion mask and
the erased-region indicator; its output is an image, of which only the erased region is kept
(elsewhere the input image is copied unchanged). A PatchGAN discriminator judges (condition,
image) pairs; the generator's loss is LSGAN + ``l1_weight`` x L1 (inside the erased region, and
``l1_outside`` times that outside it, on the raw output). It learns from the slices with lesion
of the ``train`` split only.

Synthesis paints a real training mask (of a slice at the same level, flipped, rotated and shifted
to lie inside the foreground; fallback: a random blob; chosen by :mod:`medanomaly.train.gan_masks`)
into a lesion-free training slice and writes the pair in the ``images/`` + ``masks/`` layout, with
``manifest.json`` and ``generator.pt``.

Shapes: images (N, C, S, S) float in [0, 1]; masks and erased regions (N, 1, S, S) in {0, 1}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import nn

from medanomaly.config.sections import GanConfig  # with every other default, in config
from medanomaly.core import jsonio
from medanomaly.core.atomic import atomic_path, atomic_torch_save
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.outputs import check_out_path, check_separate
from medanomaly.core.progress import track
from medanomaly.core.runtime import autocast, choose_precision, set_seed
from medanomaly.core.version import __version__
from medanomaly.data.discover import discover, resolve_splits
from medanomaly.data.slices import load_slices
from medanomaly.models.unet import UNet, UNetConfig
from medanomaly.train.gan_masks import check_targets, choose_mask, pick_targets, ranks

log = logging.getLogger(__name__)
KIND = "medanomaly-synthesize"  # manifest.json "kind": marks a folder this module may overwrite


@dataclass(frozen=True)
class GanStats:
    """What a training run did; the losses are means over its last 100 steps."""

    steps: int
    seconds: float
    train_slices: int  # training slices with lesion
    loss_d: float
    loss_adv: float
    loss_l1: float
    steps_per_s: float


class PatchDiscriminator(nn.Sequential):
    """PatchGAN (Isola et al. 2017): (N, in_ch, H, W) -> (N, 1, h, w) realness logits of patches."""

    def __init__(self, in_ch: int, width: int = 32, layers: int = 3):
        ch = [width * 2 ** min(i, 3) for i in range(layers + 1)]
        mods: list[nn.Module] = [nn.Conv2d(in_ch, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        for i in range(1, layers + 1):  # the last one keeps the resolution (stride 1), as pix2pix's
            mods += [nn.Conv2d(ch[i - 1], ch[i], 4, 2 if i < layers else 1, 1, bias=False), nn.BatchNorm2d(ch[i]),
                     nn.LeakyReLU(0.2, inplace=True)]
        super().__init__(*mods, nn.Conv2d(ch[-1], 1, 4, 1, 1))


def build_generator(cfg: GanConfig, channels: int) -> UNet:
    """U-Net (channels + 2) -> channels: (context, mask, erased) -> image logits."""
    return UNet(UNetConfig(in_channels=channels + 2, out_channels=channels, width=cfg.width, depth=cfg.depth,
                           norm="batch"))


def erased_region(masks: torch.Tensor, margin: int) -> torch.Tensor:
    """(N, 1, H, W) masks -> (N, 1, H, W) float: the masks dilated by a disk of radius ``margin`` pixels."""
    m = (masks > 0.5).float()
    if margin <= 0:
        return m
    r = torch.arange(-margin, margin + 1, dtype=torch.float32, device=m.device)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= margin**2 + 0.5).float()[None, None]
    return (F.conv2d(m, disk, padding=margin) > 0.5).float()


def condition(images: torch.Tensor, masks: torch.Tensor, margin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator input (N, C + 2, H, W) = [context, mask, erased], erased (N, 1, H, W))."""
    erased = erased_region(masks, margin)
    return torch.cat([images * (1 - erased), (masks > 0.5).float(), erased], 1), erased


def generate(gen_net: UNet, images: torch.Tensor, masks: torch.Tensor, margin: int,
             autocast_ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(composed images (N, C, H, W): generated inside the erased region, ``images`` outside; erased)."""
    cond, erased = condition(images, masks, margin)
    with autocast_ctx or contextlib.nullcontext():
        fake = torch.sigmoid(gen_net(cond).float())
    return erased * fake + (1 - erased) * images, erased


def _weighted_ls(pred: torch.Tensor, target: float, weight: torch.Tensor) -> torch.Tensor:
    """LSGAN loss of patch logits (N, 1, h, w), averaged over the patches that see the erased region."""
    w = F.adaptive_max_pool2d(weight, pred.shape[-2:])
    return (w * (pred.float() - target) ** 2).sum() / w.sum().clamp(min=1.0)


def load_train_split(data: Path, size: int, normalization: str, splits_file, seed: int, progress: bool):
    """(SliceSet of the ``train`` split with masks, {image path: mask path}), split as ``train`` does."""
    samples = [s for s in discover(data) if s.mask is not None]
    if not samples:
        raise MedanomalyError(f"no image/mask pairs found in {data}: the GAN learns lesions from masks named like "
                              "X_mask.png beside X.png, or images/ + masks/ folders (see README, 'Data layouts')")
    train_cases = set(resolve_splits(data, samples, splits_file, seed)["train"])
    part = [s for s in samples if s.case in train_cases]
    if not part:
        raise MedanomalyError(f"the train split of {data} is empty; fix --splits or DATA/splits.json")
    return load_slices(part, size, normalization, with_masks=True, progress=progress), {s.image: s.mask for s in part}


def _batch(images: torch.Tensor, masks: torch.Tensor, batch_size: int, gen: torch.Generator,
           dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch (images (B, C, S, S), masks (B, 1, S, S)) on ``dev``, half of it flipped left-right."""
    c = images.shape[1]
    pick = torch.randint(len(images), (batch_size,), generator=gen)
    flip = torch.rand(batch_size, generator=gen) < 0.5  # left-right: anatomy is near-symmetric
    xm = torch.cat([images[pick].float(), masks[pick].float()], 1)
    xm = torch.where(flip[:, None, None, None], xm.flip(-1), xm).to(dev)
    return xm[:, :c], xm[:, c:]


def _step(g_net: UNet, d_net: PatchDiscriminator, opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
          x: torch.Tensor, m: torch.Tensor, cfg: GanConfig, precision: str) -> tuple[float, float, float]:
    """One discriminator step, then one generator step, on images ``x`` with masks ``m``; returns
    the losses (discriminator, adversarial, L1)."""
    opt_g, opt_d = opts
    cond, erased = condition(x, m, cfg.margin)
    cond = cond.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, precision):
        raw = torch.sigmoid(g_net(cond).float())
        fake = erased * raw + (1 - erased) * x
        d_real = d_net(torch.cat([cond, x], 1))
        d_fake = d_net(torch.cat([cond, fake.detach()], 1))
    loss_d = 0.5 * (_weighted_ls(d_real, 1.0, erased) + _weighted_ls(d_fake, 0.0, erased))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    with autocast(x.device, precision):
        d_gen = d_net(torch.cat([cond, fake], 1))
    loss_adv = _weighted_ls(d_gen, 1.0, erased)
    err = (raw - x).abs().mean(1, keepdim=True)
    loss_l1 = (err * erased).sum() / erased.sum().clamp(min=1.0) \
        + cfg.l1_outside * (err * (1 - erased)).sum() / (1 - erased).sum().clamp(min=1.0)
    opt_g.zero_grad(set_to_none=True)
    (loss_adv + cfg.l1_weight * loss_l1).backward()
    opt_g.step()
    return loss_d.item(), loss_adv.item(), loss_l1.item()


def fit(slices, cfg: GanConfig, device: str | torch.device = "cpu", progress: bool = True) -> tuple[UNet, GanStats]:
    """Train a generator on the slices with lesion of a SliceSet (images (N, C, S, S), masks)."""
    dev = torch.device(device)
    idx_pos = torch.nonzero(slices.masks.flatten(1).amax(1) > 0).flatten()
    if len(idx_pos) == 0:
        raise MedanomalyError("no training slice has a lesion at this size: the GAN learns lesions from non-empty "
                              "masks of the train split (check the masks, or use a larger --size)")
    images, masks, c = slices.images[idx_pos], slices.masks[idx_pos], slices.images.shape[1]
    set_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    g_net = build_generator(cfg, c).to(dev).to(memory_format=torch.channels_last)
    d_net = PatchDiscriminator(2 * c + 2, cfg.d_width, cfg.d_layers).to(dev).to(memory_format=torch.channels_last)
    opts = tuple(torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.betas) for net in (g_net, d_net))
    precision = choose_precision(cfg.precision, dev)
    budget = cfg.minutes * 60 if cfg.minutes > 0 else math.inf
    log.info("GAN: %d training slices with lesion, %dx%d, batch %d, precision %s, budget %.1f min or %d steps",
             len(images), cfg.size, cfg.size, cfg.batch_size, precision, cfg.minutes, cfg.max_steps)
    g_net.train(), d_net.train()
    hist, t0, step = [], time.perf_counter(), 0
    bar = track(total=cfg.max_steps, desc="GAN", unit="step", enabled=progress, leave=False)
    while step < cfg.max_steps and time.perf_counter() - t0 < budget:
        frac = max(step / cfg.max_steps, (time.perf_counter() - t0) / budget)
        for group in opts[0].param_groups + opts[1].param_groups:  # constant, then linear decay to 0
            group["lr"] = cfg.lr * min(1.0, 2.0 * (1.0 - frac))
        x, m = _batch(images, masks, cfg.batch_size, gen, dev)
        hist.append(_step(g_net, d_net, opts, x, m, cfg, precision))
        step += 1
        bar.update(1)
        bar.set_postfix(d=f"{hist[-1][0]:.3f}", adv=f"{hist[-1][1]:.3f}", l1=f"{hist[-1][2]:.4f}")
    bar.close()
    seconds = time.perf_counter() - t0
    stats = GanStats(step, seconds, len(images), *map(float, np.mean(hist[-100:], axis=0)), step / max(seconds, 1e-9))
    log.info("GAN: %d steps in %.1f min (%.2f steps/s); last 100 steps: D %.3f, adversarial %.3f, L1 %.4f",
             step, seconds / 60, stats.steps_per_s, stats.loss_d, stats.loss_adv, stats.loss_l1)
    return g_net.eval().to(memory_format=torch.contiguous_format), stats


def train_gan(data: str | Path, cfg: GanConfig = GanConfig(), splits_file: str | Path | None = None,
              device: str | torch.device = "cpu", progress: bool = True) -> tuple[UNet, GanStats]:
    """Train the generator on the slices with lesion of the ``train`` split of ``data``
    (``--splits`` file, else DATA/splits.json, else a seeded split by case); returns it in eval mode."""
    slices, _ = load_train_split(Path(data), cfg.size, cfg.normalization, splits_file, cfg.seed, progress)
    return fit(slices, cfg, device, progress)


def _check_out(out: Path, data: Path, overwrite: bool) -> bool:
    """Refuse an ``out`` inside the data folder or holding it, one that cannot be a folder
    (:func:`medanomaly.core.outputs.check_out_path`), or a non-empty one that is not an earlier
    synthesize output (that one only with ``overwrite``); True where ``out`` holds an earlier output."""
    data_r, out_r = data.resolve(), out.resolve()
    if out_r == data_r or data_r in out_r.parents:
        raise MedanomalyError(f"--out {out} is inside the data folder {data}: its synthetic pairs would be found "
                              "as real cases; choose a folder outside DATA")
    check_out_path(out, "folder")  # a file, below a file, a special or unwritable path
    check_separate(out, [data])  # DATA inside --out
    if not out.exists() or not any(out.iterdir()):
        return False
    try:
        old = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        old = {}
    if not isinstance(old, dict) or old.get("kind") != KIND:
        raise MedanomalyError(f"--out {out} is not empty and is not an earlier 'medanomaly synthesize' output; "
                              "choose a new or empty folder")
    if not overwrite:
        raise MedanomalyError(f"--out {out} holds an earlier synthesize output; pass --overwrite to replace it or "
                              "choose another folder")
    return True


def _write_png(array: np.ndarray, path: Path) -> None:
    """(C, H, W) uint8 with C in {1, 3} -> an 8-bit grey or RGB PNG, written atomically."""
    img = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    with atomic_path(path) as tmp:
        PILImage.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG")


def _inpaint(g_net: UNet, image: torch.Tensor, mask: torch.Tensor, margin: int, dev: torch.device,
             precision: str) -> np.ndarray:
    """``image`` (C, H, W) in [0, 1] with a lesion generated in ``mask`` (H, W) -> (C, H, W) uint8."""
    x, m = image[None].float().to(dev), mask[None, None].float().to(dev)
    with torch.no_grad():
        composed, erased = generate(g_net, x, m, margin, autocast(dev, precision))
    mixed = torch.where(erased[0].cpu() > 0.5, composed[0].cpu(), image.float())  # else: the source
    return np.rint(mixed.numpy() * 255).clip(0, 255).astype(np.uint8)


def _write_pairs(g_net: UNet, slices, mask_of: dict, pairs: list, gen: torch.Generator, cfg: GanConfig,
                 dev: torch.device, precision: str, out: Path, progress: bool) -> list[dict]:
    """Paint and write one synthetic pair per (target slice, mask slices, foreground) of ``pairs``
    (:func:`~medanomaly.train.gan_masks.pick_targets`); returns their manifest entries."""
    files, slice_index = [], ranks(slices.sources)
    for k, (i, sources, fg) in enumerate(track(pairs, desc="synthesizing", unit="img", enabled=progress), 1):
        mask, j, transform = choose_mask(slices, sources, fg, gen)
        if j is not None:
            entry = {"mask_origin": "real", "source_mask": str(Path(mask_of[slices.sources[j]]).resolve()),
                     "source_mask_slice": slice_index[j], "transform": transform}
        else:
            entry = {"mask_origin": "random_shape", "source_mask": None}
        name = f"synthetic_{k:05d}.png"
        _write_png(_inpaint(g_net, slices.images[i], mask, cfg.margin, dev, precision), out / "images" / name)
        _write_png(mask.numpy().astype(np.uint8)[None] * 255, out / "masks" / name)
        files.append({"image": f"images/{name}", "mask": f"masks/{name}", "synthetic": True,
                      "source_image": str(slices.sources[i].resolve()), "source_slice": slice_index[i], **entry,
                      "lesion_pixels": int(mask.sum())})
    return files


def synthesize(data: str | Path, out: str | Path, n: int, cfg: GanConfig = GanConfig(),
               splits_file: str | Path | None = None, device: str | torch.device = "cpu", progress: bool = True,
               overwrite: bool = False) -> Path:
    """Train a generator on the train split of ``data``, then write ``n`` synthetic pairs to ``out``:
    ``images/synthetic_00001.png`` + ``masks/synthetic_00001.png`` (size x size, 8-bit, the channels
    of the training images), ``generator.pt`` and ``manifest.json``. Returns ``out``."""
    data, out, dev = Path(data), Path(out), torch.device(device)
    if n < 1:
        raise MedanomalyError(f"--n must be at least 1 (got {n})")
    earlier = _check_out(out, data, overwrite)
    slices, mask_of = load_train_split(data, cfg.size, cfg.normalization, splits_file, cfg.seed, progress)
    if (c := slices.images.shape[1]) not in (1, 3):
        raise MedanomalyError(f"the images of {data} have {c} channels; synthesize writes grey or RGB PNG only "
                              "(train on 1- or 3-channel images)")
    check_targets(slices)  # what synthesis paints into: before the minutes of GAN training
    g_net, stats = fit(slices, cfg, dev, progress)
    if earlier:  # --overwrite: only now that the new generator is trained
        for name in ("images", "masks"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("generator.pt", "manifest.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(g_net.state_dict(), out / "generator.pt")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    pairs = pick_targets(slices, n, gen, erode=cfg.margin + max(2, cfg.size // 32))
    precision = choose_precision(cfg.precision, dev)
    files = _write_pairs(g_net, slices, mask_of, pairs, gen, cfg, dev, precision, out, progress)
    manifest = {"kind": KIND, "version": __version__, "synthetic": True, "data": str(data.resolve()),
                "splits_file": str(splits_file) if splits_file else None, "n": n, "config": cfg.to_dict(),
                "training": {**asdict(stats), "device": str(dev), "precision": precision},
                "generator": {"path": "generator.pt", "unet": g_net.config.to_dict()}, "files": files}
    jsonio.write_json(out / "manifest.json", manifest, indent=1)
    log.info("wrote %d synthetic pairs to %s", n, out)
    return out
