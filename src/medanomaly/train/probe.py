"""Measured training speed: what the planner (:mod:`medanomaly.train.plan`) knows of the machine.

A :class:`SpeedMeter` times a few real training steps of a configuration on the device the run
will use, as the run will take them: a handful of the data's own slices (read once, resized to each
candidate size as loading would), batches drawn by the run's batch source
(:class:`medanomaly.train.sources.SliceSource`: positive sampling, synthetic-free augmentation,
the anomaly task's corruption), the run's network, optimizer, loss and precision
(:func:`medanomaly.core.runtime.choose_precision`: bf16 autocast where the CPU or GPU has it), and
the loop's own step (:func:`medanomaly.train.loop.train_step`: forward, backward, finite check,
optimizer). One warm-up step (one-time kernel set-up) is not timed; then :data:`TIMED_STEPS`.
Nothing here changes the random state of the run that follows (a forked generator).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medanomaly.anomaly.methods import foreground
from medanomaly.config import schema as config_mod
from medanomaly.config.labels import network_classes
from medanomaly.config.schema import TrainConfig
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.runtime import choose_precision, cpu_has_bf16
from medanomaly.data.discover import discover, read_sample, resolve_splits
from medanomaly.data.foreground import foreground_mask
from medanomaly.data.slices import SliceSet, load_slices, resize
from medanomaly.io import read_mask
from medanomaly.io.orient import canonical
from medanomaly.models.build import count_parameters
from medanomaly.models.losses import get_loss
from medanomaly.models.unet import UNet, UNetConfig
from medanomaly.train.loop import train_step
from medanomaly.train.run import make_optimizer, new_model
from medanomaly.train.sources import SliceSource

log = logging.getLogger(__name__)
BYTES_PER_FEATURE = 8.0  # peak training memory per conv-output value: measured 3.3 (bf16), 6.2 (fp32)
TIMED_STEPS = 2  # timed steps per configuration, after one warm-up step
PROBE_FILES, PROBE_SLICES = 8, 32  # at most this many files read, slices kept (spread over the data)
MAX_PROBE_S = 20.0  # total measuring time the planner allows itself (the search stops after it)


@dataclass(frozen=True)
class DataFingerprint:
    """What the planner knows about a data folder. Shapes (pixels) and spacing (mm) in array axis order: (H, W)
    for 2D images, (Z, Y, X) for volumes (sliced along Z); intensities in stored units (HU for CT)."""

    data: str
    n_cases: int
    n_images: int
    n_labelled: int  # images with a mask
    n_slices: int  # 2D slices: 1 per 2D image, Z per volume
    n_train_slices: int  # slices of the train split's cases (splits as train resolves them, seed 0)
    n_train_labelled: int  # labelled slices among them
    n_val_slices: int
    n_sampled: int  # images read for the statistics below
    is_3d: bool
    median_shape: tuple[int, ...]
    median_spacing: tuple[float, ...] | None  # None: unknown (PNG, JPEG, TIFF)
    channels: int
    kinds: tuple[str, ...]  # reader kinds: raster, nifti, nrrd, dicom, itk
    eight_bit: bool  # every sampled image is stored as 8-bit
    intensity: dict[str, float]  # p0.5, p50, p99.5, mean, std of the sampled pixels
    foreground_ratio: float  # share of pixels inside the body (Otsu foreground)
    class_ratio: float | None  # lesion pixels / pixels of the sampled labelled images
    lesion_slice_fraction: float | None  # share of sampled labelled slices with any lesion
    has_masks: bool


def fingerprint(data: str | Path, splits_file: str | Path | None = None, max_images: int = 100,
                labelled_only: bool = False) -> DataFingerprint:
    """Fingerprint of the images below ``data``: at most ``max_images`` (spread evenly over the
    sorted list, so over the cases) are read, with their masks; slice counts of the others are the
    median of those read. ``labelled_only``: the images with masks alone (what supervised training
    uses). Read errors are MedanomalyError."""
    samples = [s for s in discover(data) if s.mask is not None or not labelled_only]
    if not samples:
        raise MedanomalyError(f"no image/mask pairs in {data} to plan supervised training for; plan --task anomaly")
    splits = {k: set(v) for k, v in resolve_splits(Path(data), samples, splits_file, seed=0).items()}
    pick = sorted({int(i) for i in np.linspace(0, len(samples) - 1, min(len(samples), max(1, max_images))).round()})
    shapes, spacings, channels, eight, values, fg, lesion_slices = [], [], [], [], [], [], []
    kinds, z_of, lesion_px, px, rng = set(), {}, 0, 0, np.random.default_rng(0)
    for i in pick:
        s, stored = samples[i], read_sample(samples[i])
        img, turn = canonical(stored)  # shapes and spacing as training sees them (io.orient; rasters as stored)
        a, g = img.array, img.geometry
        shapes.append(img.spatial_shape)
        spacings += [g.spacing] if g.spacing_known else []
        channels.append(img.channels)
        kinds.add(g.kind)
        eight.append(g.meta.get("dtype") == "uint8" and g.kind == "raster")
        values.append(a.ravel()[rng.integers(0, a.size, min(a.size, 20_000))])
        z_of[i] = img.spatial_shape[0] if a.ndim == 4 else 1
        step = max(1, int((a[0].size / (2**16 if a.ndim == 3 else 2**21)) ** (1 / (a.ndim - 1))))  # Otsu on <= 256^2
        fg.append(float(foreground_mask(a[(np.s_[:],) + (np.s_[::step],) * (a.ndim - 1)], channel_axis=0).mean()))
        if s.mask is not None:
            m = turn.apply(read_mask(s.mask, like=stored))
            lesion_px, px = lesion_px + int(m.sum()), px + m.size
            lesion_slices += list(m.reshape(m.shape[0], -1).any(1)) if m.ndim == 3 else [bool(m.any())]
    is_3d = sum(len(sh) == 3 for sh in shapes) > len(shapes) / 2
    same = [sh for sh in shapes if len(sh) == (3 if is_3d else 2)]
    median_z = int(np.median(list(z_of.values())))
    n = [z_of.get(i, median_z) for i in range(len(samples))]  # slices per image; unread ones: the median
    v = np.concatenate(values)
    p = np.percentile(v, [0.5, 50, 99.5])
    sp3 = [sp for sp in spacings if len(sp) == len(same[0])]
    return DataFingerprint(
        data=str(data), n_cases=len({s.case for s in samples}), n_images=len(samples),
        n_labelled=sum(s.mask is not None for s in samples), n_slices=sum(n),
        n_train_slices=sum(k for k, s in zip(n, samples) if s.case in splits["train"]),
        n_train_labelled=sum(k for k, s in zip(n, samples) if s.case in splits["train"] and s.mask is not None),
        n_val_slices=sum(k for k, s in zip(n, samples) if s.case in splits["val"]), n_sampled=len(pick), is_3d=is_3d,
        median_shape=tuple(int(x) for x in np.median(same, axis=0)),
        median_spacing=tuple(round(float(x), 4) for x in np.median(sp3, axis=0)) if sp3 else None,
        channels=int(np.median(channels)), kinds=tuple(sorted(kinds)), eight_bit=all(eight),
        intensity=dict(zip(("p0.5", "p50", "p99.5", "mean", "std"), map(float, [*p, v.mean(), v.std()]))),
        foreground_ratio=float(np.mean(fg)), class_ratio=lesion_px / px if px else None,
        lesion_slice_fraction=float(np.mean(lesion_slices)) if lesion_slices else None,
        has_masks=any(s.mask is not None for s in samples))


@dataclass(frozen=True)
class MachineInfo:
    cores: int  # usable CPU cores (affinity)
    memory_gib: float  # available RAM
    bf16: bool  # native bf16 on the training device
    gpu: str | None = None
    gpu_memory_gib: float | None = None
    device: str = "cpu"  # the torch device the plan measured and the run trains on


def machine(device: str = "auto") -> MachineInfo:
    """Cores, free memory, and the GPU that ``device`` (auto, cpu, cuda, cuda:N) trains on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = 4.0  # GiB available: /proc/meminfo MemAvailable, capped by a cgroup v2 limit
    try:
        memory = next(int(ln.split()[1]) / 2**20 for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemAvailable:"))
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        memory = min(memory, int(limit) / 2**30) if limit.isdigit() else memory
    except (OSError, StopIteration):
        pass
    if device != "cpu" and torch.cuda.is_available():
        dev = "cuda" if device == "auto" else device
        props = torch.cuda.get_device_properties(torch.device(dev))
        return MachineInfo(cores, memory, torch.cuda.is_bf16_supported(), props.name, props.total_memory / 2**30, dev)
    return MachineInfo(cores, memory, cpu_has_bf16())


def depth_for(size: int) -> int:
    return max(1, min(5, int(math.log2(size / 8))))  # down-sample to a ~8 px feature map, at most 5 levels


def feature_values(size: int, width: int, depth: int, max_width: int = 320) -> float:
    """Conv-output values of one size x size image in the U-Net (kept for backward): channels x pixels times
    2 per level (encoder block), plus 1/4 + 5 above the bottom (down, up, concatenation, decoder block)."""
    return sum(min(width * 2**lv, max_width) * (size / 2**lv) ** 2 * (2 + (5.25 if lv < depth else 0))
               for lv in range(depth + 1))


@dataclass(frozen=True)
class MemoryFit:
    """What fits in memory at one input size and width: the depth for it and images per batch."""

    size: int
    depth: int
    fits: int  # images per batch that fit the free memory
    per_image: float  # training bytes per image
    data_bytes: float  # the training and validation slices held in RAM at this size
    free: float  # bytes usable for training


def memory_fit(fp: DataFingerprint, mach: MachineInfo, width: int, n_train: int, size: int) -> MemoryFit:
    """Depth (down-sample to a ~8 px feature map, at most 5) and the images per batch that fit at ``size``."""
    params = count_parameters(UNet(UNetConfig(in_channels=fp.channels, width=width, depth=4))) * 16  # + grads, Adam
    depth = depth_for(size)
    per_image = feature_values(size, width, depth) * BYTES_PER_FEATURE
    data_bytes = (n_train + fp.n_val_slices) * size**2 * (2 * fp.channels + 1)  # fp16 images, uint8 masks, in RAM
    free = (mach.gpu_memory_gib or 0) * 2**30 * 0.85 if mach.gpu else mach.memory_gib * 2**30 * 0.5 - data_bytes
    return MemoryFit(size, depth, int((free - params) // per_image), per_image, data_bytes, free)


def probe_slices(data: str | Path, task: str, size: int, normalization: str, channels: int = 1) -> SliceSet:
    """A handful of slices of ``data`` at ``size`` x ``size``: up to :data:`PROBE_FILES` files spread
    over the sorted list (labelled ones for the supervised task), at most :data:`PROBE_SLICES` slices.
    Where the data cannot be read (a fingerprint without its folder), ``channels``-channel noise images
    with a square lesion stand in: the steps cost the same; the speed is what is measured."""
    try:
        samples = [s for s in discover(data) if s.mask is not None or task != "supervised"]
        pick = sorted({int(i) for i in np.linspace(0, len(samples) - 1, min(len(samples), PROBE_FILES)).round()})
        slices = load_slices([samples[i] for i in pick], size, normalization, True if task == "supervised" else None)
    except (MedanomalyError, OSError, ValueError) as exc:
        log.info("measuring on synthetic images (%s)", exc)
        gen = torch.Generator().manual_seed(0)
        images = torch.rand((8, channels, size, size), generator=gen).half()
        masks = torch.zeros((8, 1, size, size), dtype=torch.uint8)
        masks[::2, :, size // 4:size // 2, size // 4:size // 2] = 1
        lesion = masks.flatten(1).amax(1) > 0
        slices = SliceSet(images, masks, ["probe"] * 8, [Path("probe")] * 8, lesion, torch.ones(8, dtype=torch.bool))
    keep = np.unique(np.linspace(0, len(slices) - 1, min(len(slices), PROBE_SLICES)).round().astype(int))
    return _take(slices, torch.from_numpy(keep))


def _take(s: SliceSet, idx: torch.Tensor) -> SliceSet:
    """The slices at ``idx`` (repeats allowed)."""
    return SliceSet(s.images[idx], None if s.masks is None else s.masks[idx], [s.cases[i] for i in idx.tolist()],
                    [s.sources[i] for i in idx.tolist()], s.lesion[idx], s.labelled[idx])


def at_size(slices: SliceSet, size: int, task: str, batch: int) -> SliceSet:
    """``slices`` resized to ``size`` (as loading at that size would), repeated to at least one batch;
    the anomaly task's masks are foreground masks, as its training set's are."""
    images = resize(slices.images.float(), (size, size)).half()
    masks = None if slices.masks is None else (resize(slices.masks.float(), (size, size)) > 0.5).to(torch.uint8)
    if task == "anomaly":
        masks = foreground(images).to(torch.uint8)
    s = SliceSet(images, masks, slices.cases, slices.sources, slices.lesion, slices.labelled)
    return _take(s, torch.arange(len(s)).repeat(math.ceil(batch / len(s))))


def measure(cfg: TrainConfig, slices: SliceSet, device: torch.device, steps: int = TIMED_STEPS) -> float:
    """Training images/s of ``cfg`` on ``device``: one untimed warm-up step, then ``steps`` steps of
    ``cfg.batch_size`` images (``slices`` at ``cfg.size``, drawn by the run's batch source). 0.0 where
    the device runs out of memory."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            train = at_size(slices, cfg.size, cfg.task, cfg.batch_size)
            model = new_model(cfg, int(train.images.shape[1]), device)
            opt = make_optimizer(model, cfg)
            source = SliceSource(train, train, cfg, device, choose_precision(cfg.precision, device),
                                 get_loss(cfg.loss, cfg.bce_weight, network_classes(cfg.labels)))
            gen = torch.Generator().manual_seed(cfg.seed)
            model.train()
            for step in range(steps + 1):
                if step == 1:  # after the warm-up (train_step's loss.item() waits for the device)
                    t0 = time.perf_counter()
                train_step(model, opt, source, source.batches(gen)[0], gen, step)
            return steps * cfg.batch_size / (time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            return 0.0
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


class SpeedMeter:
    """Measured training images/s of configurations (TrainConfig overrides) on ``device``, each
    measured once (cached); ``spent`` says how many seconds measuring took."""

    def __init__(self, data: str | Path, task: str, device: str, normalization: str, max_size: int,
                 channels: int = 1, base: dict[str, Any] | None = None):
        t0 = time.perf_counter()
        self.device, self.base = torch.device(device), {"task": task, "normalization": normalization, **(base or {})}
        self.slices = probe_slices(data, task, max_size, normalization, channels)
        self.precision = choose_precision(TrainConfig.precision, self.device)
        self.cache: dict[tuple, float] = {}
        self.spent = time.perf_counter() - t0

    def __call__(self, overrides: dict[str, Any]) -> float:
        key = tuple(sorted(overrides.items()))
        if key not in self.cache:
            t0 = time.perf_counter()
            cfg = config_mod.load(None, {**self.base, **overrides})
            self.cache[key] = measure(cfg, self.slices, self.device)
            self.spent += time.perf_counter() - t0
            log.info("measured %.1f training images/s (%s, %s)", self.cache[key], self.precision,
                     ", ".join(f"{k}={v}" for k, v in overrides.items()))
        return self.cache[key]

    @property
    def exhausted(self) -> bool:
        """The measuring time allowed (:data:`MAX_PROBE_S`) is spent."""
        return self.spent >= MAX_PROBE_S


def largest_meeting(sizes: list[int], meets: Callable[[int], bool], guess: Callable[[int], int],
                    stop: Callable[[], bool], guesses: int = 2) -> int:
    """Index of the largest of ``sizes`` (ascending) that ``meets`` (monotone: True up to some size), -1
    where not even the smallest does: the smallest first, then ``guesses`` times ``guess(size)`` (the size
    expected to just meet, scaled from the last size measured), then bisection, until ``stop()`` (the
    measuring time is spent; the largest known to meet is taken), the next size up first. The second
    guess, scaled from a size near the answer, is usually right, so 3-4 measurements suffice where the
    speed grows with the pixels; sizes far above the answer (the slowest to time) are rarely timed."""
    lo, hi = -1, len(sizes)  # meets(sizes[lo]) is known True, meets(sizes[hi]) False
    mid, used, confirmed = 0, 0, False
    while hi - lo > 1 and not (lo >= 0 and stop()):
        if meets(sizes[mid]):
            lo = mid
        else:
            hi = mid
        if used < guesses and lo >= 0:
            mid, used = sum(s <= guess(sizes[mid]) for s in sizes) - 1, used + 1
        elif not confirmed and lo >= 0:  # the guesses are near: the next size up, before any (costly) larger one
            mid, confirmed = lo + 1, True
        else:
            mid = (lo + hi) // 2
        mid = min(max(mid, lo + 1), hi - 1)
    return lo
