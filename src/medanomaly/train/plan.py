"""Self-configuring defaults: a training plan from the data (:func:`fingerprint`: a sample of the
images) and the machine (:func:`machine`): :func:`make_plan` picks input size, batch size, depth,
width, epochs and normalisation for a run within a time budget, each with its reason. The rules
follow nnU-Net's experiment planner where they apply (median shape and spacing, anisotropy
threshold 3, memory-bounded batch, at most 5 % of the data per batch), adapted to a time budget."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medanomaly.config.options import TASKS
from medanomaly.config.schema import TrainConfig
from medanomaly.core.atomic import atomic_write_text
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.outputs import check_new_file
from medanomaly.core.runtime import cpu_has_bf16
from medanomaly.data.discover import discover, resolve_splits
from medanomaly.data.foreground import foreground_mask
from medanomaly.data.volumes import plan_overrides_3d
from medanomaly.io import read_image, read_mask
from medanomaly.models.build import count_parameters
from medanomaly.models.unet import UNet, UNetConfig

log = logging.getLogger(__name__)

PLAN_VERSION = 1
ANISO = 3.0  # anisotropy threshold (nnU-Net): an axis with >= 3x the spacing of the others, and < 1/3 of their voxels
THIN_STACK = 16  # fewer slices than this along the coarsest axis: too thin for a 3D U-Net
REF_CPU_IMG_S = 30.0  # measured training img/s: 2 cores, bf16, 128x128, width 32, depth 4 (README, Speed)
FP32_FACTOR = 8.4 / 30.3  # the same table: fp32 trains 3.6x slower
REF_GPU_IMG_S = 2000.0  # assumed for one recent GPU at 128x128, width 32 (not measured here)
MIN_SAMPLES = 40_000  # images seen by the measured LGG default run (18 epochs x ~2 250 slices in 25 min)
BYTES_PER_FEATURE = 8.0  # peak training memory per conv-output value: measured 3.3 (bf16), 6.2 (fp32)
# the measured CPU defaults are the config's; a GPU with >= 16 GiB affords a wider network and larger batches
CPU_WIDTH, GPU_WIDTH, CPU_BATCH, GPU_BATCH = TrainConfig().model.width, 64, TrainConfig.batch_size, 64
MIN_BN_BATCH, MIN_SIZE = 8, 64


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


@dataclass(frozen=True)
class MachineInfo:
    cores: int  # usable CPU cores (affinity)
    memory_gib: float  # available RAM
    bf16: bool  # native bf16 on the training device
    gpu: str | None = None
    gpu_memory_gib: float | None = None


@dataclass(frozen=True)
class Plan:
    """A run's settings (2D trainer), the estimates behind them and the reason for each."""

    task: str
    max_minutes: float
    recommended_dim: int  # 3 = a 3D U-Net is recommended; the overrides are always for 2D slices
    size: int  # input pixels per side
    batch_size: int
    width: int
    depth: int
    norm: str
    normalization: str
    positive_fraction: float | None  # None: not set (anomaly task)
    epochs: int
    images_per_s: float  # estimated training throughput at this size and width
    epochs_estimate: float  # epochs that fit in max_minutes at that throughput
    why: dict[str, str]
    notes: tuple[str, ...]
    fingerprint: DataFingerprint
    machine: MachineInfo
    version: int = PLAN_VERSION

    def to_config_overrides(self) -> dict[str, Any]:
        """Keys as :func:`medanomaly.config.schema.load` takes them."""
        out = {"task": self.task, "max_minutes": self.max_minutes, "size": self.size, "batch_size": self.batch_size,
               "epochs": self.epochs, "normalization": self.normalization, "model.width": self.width,
               "model.depth": self.depth, "model.norm": self.norm}
        return out if self.positive_fraction is None else out | {"positive_fraction": self.positive_fraction}

    def table(self) -> str:
        """Plain aligned text: setting | value | why."""
        fp, m, it = self.fingerprint, self.machine, self.fingerprint.intensity
        sp = "unknown (1 px)" if fp.median_spacing is None else " x ".join(f"{s:.3g}" for s in fp.median_spacing)
        lesion = "-" if fp.class_ratio is None else f"{fp.class_ratio:.3g}"
        rows = [("data", fp.data, f"{fp.n_sampled} of {fp.n_images} images read"),
                ("cases / images / slices", f"{fp.n_cases} / {fp.n_images} / {fp.n_slices}",
                 f"{fp.n_labelled} images with masks; train {fp.n_train_slices}, val {fp.n_val_slices} slices"),
                ("median shape (px)", " x ".join(map(str, fp.median_shape)), "3D volumes" if fp.is_3d else "2D images"),
                ("median spacing (mm)", sp, "from headers" if fp.median_spacing else "none in the files"),
                ("channels", str(fp.channels), ", ".join(fp.kinds)),
                ("intensity p0.5/p50/p99.5", f"{it['p0.5']:.4g} / {it['p50']:.4g} / {it['p99.5']:.4g}",
                 f"mean {it['mean']:.4g}, std {it['std']:.4g}" + (", 8-bit" if fp.eight_bit else "")),
                ("foreground / lesion px", f"{fp.foreground_ratio:.3f} / {lesion}", "no masks" if
                 fp.lesion_slice_fraction is None else f"lesion in {fp.lesion_slice_fraction:.0%} of labelled slices"),
                ("machine", f"{m.gpu} ({m.gpu_memory_gib:.0f} GiB)" if m.gpu else f"cpu, {m.cores} cores",
                 f"{m.memory_gib:.1f} GiB RAM free, bf16 {'yes' if m.bf16 else 'no'}")]
        dim = {"dim": "2D" if self.recommended_dim == 2 else "3D recommended (2D used)"}
        rows += [(k, str(v), self.why.get(k, "")) for k, v in (dim | self.to_config_overrides()).items()]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        lines = [f"{'setting':<{w0}}  {'value':<{w1}}  why", f"{'-' * w0}  {'-' * w1}  {'-' * 40}"]
        lines += [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


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
        s, img = samples[i], read_image(samples[i].image)
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
            m = read_mask(s.mask, like=img)
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
        props = torch.cuda.get_device_properties(torch.device("cuda" if device == "auto" else device))
        return MachineInfo(cores, memory, torch.cuda.is_bf16_supported(), props.name, props.total_memory / 2**30)
    return MachineInfo(cores, memory, cpu_has_bf16())


def images_per_second(mach: MachineInfo, size: int, width: int) -> float:
    """Estimated training images/s: the measured reference scaled by cores, precision, pixels and width^2."""
    base = REF_GPU_IMG_S if mach.gpu else REF_CPU_IMG_S * mach.cores / 2
    return base * (1.0 if mach.bf16 else FP32_FACTOR) * (128 / size) ** 2 * (32 / width) ** 2


def feature_values(size: int, width: int, depth: int, max_width: int = 320) -> float:
    """Conv-output values of one size x size image in the U-Net (kept for backward): channels x pixels times
    2 per level (encoder block), plus 1/4 + 5 above the bottom (down, up, concatenation, decoder block)."""
    return sum(min(width * 2**lv, max_width) * (size / 2**lv) ** 2 * (2 + (5.25 if lv < depth else 0))
               for lv in range(depth + 1))


def _choose_dim(fp: DataFingerprint) -> tuple[int, str]:
    if not fp.is_3d:
        return 2, "2D images"
    spacing, shape = np.array(fp.median_spacing or (1.0, 1.0, 1.0)), np.array(fp.median_shape)
    worst = int(np.argmax(spacing))
    others = [i for i in range(3) if i != worst]  # nnU-Net: determine_fullres_target_spacing
    if spacing[worst] >= ANISO * spacing[others].max() - 1e-6 and shape[worst] * ANISO < shape[others].min():
        return 2, (f"anisotropic: {spacing[worst]:.3g} mm vs {spacing[others].max():.3g} mm, {shape[worst]} slices "
                   "(nnU-Net's rule, threshold 3)")
    if shape.min() < THIN_STACK:
        return 2, f"thin stack: {shape.min()} slices (< {THIN_STACK})"
    return 3, "isotropic enough for 3D (spacing ratio < 3)"


def _task_reason(fp: DataFingerprint, task: str) -> str:
    if task not in TASKS or (task == "supervised" and not fp.has_masks):
        raise MedanomalyError(f"cannot plan task {task!r} for {fp.data}: the tasks are supervised (needs image/mask "
                              "pairs) and anomaly (images alone); choose one with --task")
    return "learn lesions from masks" if task == "supervised" else "learn normal anatomy (no masks needed)"


def _dim_notes(fp: DataFingerprint, dim: int) -> list[str]:
    if dim == 3:
        return ["3D recommended: `train --dim 3` trains a 3D U-Net on patches (these settings are for 2D slices)"]
    if fp.is_3d and fp.median_spacing and int(np.argmax(fp.median_spacing)) != 0:
        return ["the coarse axis is not array axis 0, along which slices are cut: reorient the volumes"]
    return []


@dataclass(frozen=True)
class _Fit:
    """The input size and depth chosen by :func:`_fit_size`, what fits in memory at it, and why."""

    size: int
    depth: int
    fits: int  # images per batch that fit the free memory
    per_image: float  # training bytes per image
    data_bytes: float  # the training and validation slices held in RAM at this size
    why_size: str
    why_depth: str


def _fit_size(fp: DataFingerprint, mach: MachineInfo, width: int, n_train: int, budget_s: float) -> _Fit:
    """The median in-plane size rounded to 16 px, capped so that MIN_SAMPLES images train in the budget,
    then shrunk by 16 px until two images (with the data and the weights) fit the memory."""
    side = math.sqrt(fp.median_shape[-1] * fp.median_shape[-2])
    cap = 16 * int(math.sqrt(images_per_second(mach, 128, width) * 128**2 * budget_s / MIN_SAMPLES) // 16)
    plan_size = min(max(16, int(side / 16 + 0.5) * 16), max(cap, MIN_SIZE))
    why = (f"median in-plane sqrt(H x W) {side:.0f} px rounded to 16, at most {max(cap, MIN_SIZE)}: "
           f"{MIN_SAMPLES} training images must fit the budget (>= {MIN_SIZE})")
    params = count_parameters(UNet(UNetConfig(in_channels=fp.channels, width=width, depth=4))) * 16  # + grads, Adam
    ram = mach.memory_gib * 2**30 * 0.5
    for size in range(plan_size, 15, -16):  # nnU-Net shrinks the patch until two fit; here the whole input
        depth = max(1, min(5, int(math.log2(size / 8))))
        per_image = feature_values(size, width, depth) * BYTES_PER_FEATURE
        data_bytes = (n_train + fp.n_val_slices) * size**2 * (2 * fp.channels + 1)  # fp16 images, uint8 masks, in RAM
        free = (mach.gpu_memory_gib or 0) * 2**30 * 0.85 if mach.gpu else ram - data_bytes
        fits = int((free - params) // per_image)
        if fits >= 2:
            break
    if fits < 1:
        raise MedanomalyError(f"not enough memory for one {size}x{size} image: {free / 2**30:.1f} GiB usable; "
                              "free memory, or train on fewer images (--splits)")
    return _Fit(size, depth, fits, per_image, data_bytes,
                why + ("" if size == plan_size else f"; reduced to {size} to fit memory"),
                f"down-sample until the feature map is ~8 px ({size} -> {size // 2**depth}), at most 5")


def _normalization(fp: DataFingerprint) -> tuple[str, str]:
    return (("auto", "8-bit images: /255, one scale for all slices (measured default)") if fp.eight_bit else
            ("ct", "CT-like (p0.5 < -500 HU): window -1000..1000 HU") if fp.intensity["p0.5"] < -500 else
            ("percentile", "per image: 0.5..99.5 percentiles to 0..1"))


def _epochs(fp: DataFingerprint, ips: float, n_train: int, budget_s: float,
            max_minutes: float) -> tuple[int, float, str]:
    """(epochs, epochs that fit the budget, why): 1.5x the estimate, as the time budget ends the run."""
    epoch_s = max(n_train, 1) / ips + fp.n_val_slices / (4 * ips)  # validation: inference is ~4x faster than training
    est = budget_s / epoch_s
    why = f"~{est:.1f} fit {max_minutes:g} min at ~{ips:.0f} img/s; 1.5x headroom (the time budget ends the run " \
          "and anneals the LR)"
    return int(min(1000, max(1, math.ceil(1.5 * est)))), est, why


def make_plan(fp: DataFingerprint, mach: MachineInfo, max_minutes: float = TrainConfig.max_minutes,
              task: str = TrainConfig.task) -> Plan:
    """The plan for ``task`` on this data and machine within ``max_minutes`` of training (<= 0: no
    budget; sized as for the default budget)."""
    why = {"max_minutes": "training time budget", "task": _task_reason(fp, task)}
    dim, why["dim"] = _choose_dim(fp)
    notes = _dim_notes(fp, dim)
    lesion = fp.lesion_slice_fraction or 0.0
    n_train = fp.n_train_labelled if task == "supervised" else round(fp.n_train_slices - lesion * fp.n_train_labelled)
    budget_s = (max_minutes if max_minutes > 0 else TrainConfig.max_minutes) * 60
    wide = bool(mach.gpu) and (mach.gpu_memory_gib or 0) >= 16
    width = GPU_WIDTH if wide else CPU_WIDTH
    why["model.width"] = "GPU: a wider network is affordable" if wide else "measured CPU default"
    fit = _fit_size(fp, mach, width, n_train, budget_s)
    why["size"], why["model.depth"] = fit.why_size, fit.why_depth
    cap = GPU_BATCH if mach.gpu else CPU_BATCH
    batch = max(1, min(fit.fits, cap, max(round(0.05 * n_train), MIN_BN_BATCH), n_train))
    why["batch_size"] = (f"min of memory (fits {fit.fits} x {fit.per_image / 2**20:.0f} MiB), device cap ({cap}), "
                         f"5% of {n_train} train slices (>= {MIN_BN_BATCH})")
    norm = "batch" if batch >= MIN_BN_BATCH else "instance"
    why["model.norm"] = "batch norm needs >= 8 images per batch" if norm == "batch" else "small batch: as nnU-Net"
    if mach.memory_gib * 2**30 * 0.5 < fit.data_bytes:
        notes.append(f"the training slices need {fit.data_bytes / 2**30:.1f} GiB of RAM at {fit.size} px: "
                     "use fewer cases")
    normalization, why["normalization"] = _normalization(fp)
    pos = None if task == "anomaly" else (0.5 if lesion < 0.5 else 0.0)
    why["positive_fraction"] = f"lesion in {lesion:.0%} of slices: " + (
        "half of each batch from lesion slices" if pos else "uniform sampling suffices")
    ips = images_per_second(mach, fit.size, width)
    epochs, est, why["epochs"] = _epochs(fp, ips, n_train, budget_s, max_minutes)
    return Plan(task, float(max_minutes), dim, fit.size, int(batch), width, fit.depth, norm, normalization, pos, epochs,
                round(ips, 2), round(est, 2), why, tuple(notes), fp, mach)


def save_plan(plan: Plan, path: str | Path, overwrite: bool = True) -> Path:
    check_new_file(path, overwrite)  # 'medanomaly plan' checks it before planning too (commands.cmd_plan)
    atomic_write_text(Path(path), json.dumps(asdict(plan), indent=1))
    return Path(path)


def load_plan(path: str | Path) -> Plan:
    """A plan saved by :func:`save_plan` (``medanomaly plan``)."""
    try:
        d = json.loads(Path(path).read_text())
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"version {d.get('version')!r}, expected {PLAN_VERSION}")
        fp = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("fingerprint").items()}
        d.update(fingerprint=DataFingerprint(**fp), machine=MachineInfo(**d.pop("machine")), notes=tuple(d["notes"]))
        return Plan(**{f.name: d[f.name] for f in fields(Plan)})
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise MedanomalyError(f"cannot read plan file {path}: {exc}; re-create it with 'medanomaly plan DATA'") from exc


def _config_file_keys(path: str | Path | None) -> dict[str, Any]:
    """The dotted keys a --config file sets (an unreadable file: none; config.load reports it)."""
    try:
        data = dict(json.loads(Path(path).read_text())) if path is not None else {}
    except (OSError, ValueError, TypeError):
        return {}
    nested = {f"{k}.{s}": x for k, v in data.items() if isinstance(v, dict) for s, x in v.items()}
    return {k: v for k, v in data.items() if not isinstance(v, dict)} | nested


def for_run(data: Path, splits_file: Path | None, plan_file: Path | None, config_file: Path | None,
            flags: dict[str, Any], device: str = "auto") -> tuple[Plan | None, dict[str, Any]]:
    """(plan, overrides for config.load) of a ``train`` run: defaults < plan < config file < flags. The
    plan is ``plan_file``, else one made now for the run's task and budget, or None (the run reports
    its own error) when the data cannot be planned. Its epochs scale with the run's budget; with
    --init the architecture is the initial model's."""
    fixed = _config_file_keys(config_file) | {k: v for k, v in flags.items() if v is not None}
    if plan_file is not None:
        plan = load_plan(plan_file)
        if Path(plan.fingerprint.data).resolve() != Path(data).resolve():
            log.warning("plan %s was made for %s, not %s", plan_file, plan.fingerprint.data, data)
    else:
        try:
            task = fixed.get("task", TrainConfig.task)
            plan = make_plan(fingerprint(data, splits_file, labelled_only=task == "supervised"), machine(device),
                             fixed.get("max_minutes", TrainConfig.max_minutes), task)
        except (MedanomalyError, OSError, ValueError) as exc:
            log.info("no plan (%s); training with the defaults", exc)
            return None, flags
    merged = {k: v for k, v in plan.to_config_overrides().items() if k not in fixed}
    if fixed.get("model.dim") == 3:  # the plan's size, batch, epochs and network are for 2D slices
        merged = {k: v for k, v in (merged | plan_overrides_3d(bool(plan.machine.gpu))).items() if k not in fixed
                  and (k in ("task", "normalization", "max_minutes") or k.startswith("model."))}
    minutes = fixed.get("max_minutes", plan.max_minutes)
    if "epochs" in merged and minutes != plan.max_minutes and plan.max_minutes > 0 and minutes > 0:
        merged["epochs"] = max(1, math.ceil(plan.epochs * minutes / plan.max_minutes))
    for key in ("model.width", "model.depth", "model.norm") if fixed.get("init") else ():
        merged.pop(key, None)
    log.info("plan: %s; set by --config or flags: %s", ", ".join(f"{k}={v}" for k, v in merged.items()) or "-",
             ", ".join(sorted(set(plan.to_config_overrides()) & set(fixed))) or "-")
    return plan, merged | {k: v for k, v in flags.items() if v is not None}
