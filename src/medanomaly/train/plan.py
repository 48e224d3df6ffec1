"""Self-configuring defaults: a training plan from the data (:func:`fingerprint`: a sample of the
images) and the machine (:func:`machine`, and its training speed measured on the data by
:mod:`medanomaly.train.probe`): :func:`make_plan` picks input size, batch size, depth, width, epochs
and normalisation for a run within a time budget, each with its reason. The rules follow nnU-Net's
experiment planner where they apply (median shape and spacing, anisotropy threshold 3,
memory-bounded batch, at most 5 % of the data per batch), adapted to a time budget: the input size
is the largest whose measured speed sees at least :data:`MIN_SAMPLES` training images in it."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.config.options import TASKS
from medanomaly.config.schema import TrainConfig
from medanomaly.core import jsonio
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.outputs import check_new_file
from medanomaly.data.volumes import plan_overrides_3d
from medanomaly.train.loop import MIN_IMAGES
from medanomaly.train.probe import (
    DataFingerprint,
    MachineInfo,
    MemoryFit,
    SpeedMeter,
    depth_for,
    fingerprint,
    largest_meeting,
    machine,
    memory_fit,
)

log = logging.getLogger(__name__)

PLAN_VERSION = 2  # 2: measured speeds (images_expected, min_images, speeds, probe_seconds)
ANISO = 3.0  # anisotropy threshold (nnU-Net): an axis with >= 3x the spacing of the others, and < 1/3 of their voxels
THIN_STACK = 16  # fewer slices than this along the coarsest axis: too thin for a 3D U-Net
MIN_SAMPLES = MIN_IMAGES  # training images a run should see (the measured LGG default runs, README "Planning")
#: a size is chosen when its measured speed sees MIN_SAMPLES x MARGIN: speeds timed over two steps vary by
#: about 10 % between plans (measured on lgg-flair: 48-65 img/s at 64 px, 15.1-16.6 at 128 px)
MARGIN = 1.1
# the measured CPU defaults are the config's; a GPU with >= 16 GiB may afford a wider network (when measured
# fast enough) and larger batches
CPU_WIDTH, GPU_WIDTH, CPU_BATCH, GPU_BATCH = TrainConfig().model.width, 64, TrainConfig.batch_size, 64
MIN_BN_BATCH, MIN_SIZE = 8, 64
#: measured training images/s of (size, width, batch) on the run's device (:class:`medanomaly.train.probe.SpeedMeter`)
SpeedFn = Callable[[int, int, int], float]
#: settings that change the training speed: set by --config or flags, the plan's measured speed is not the run's
SPEED_KEYS = ("size", "batch_size", "precision", "channels_last", "compile", "synthetic_lesions", "unlabelled")


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
    images_per_s: float  # measured training throughput at this size, width and batch
    epochs_estimate: float  # epochs that fit in max_minutes at that throughput
    images_expected: int  # training images that throughput sees in max_minutes (validation time left out)
    min_images: int  # the rule: at least this many (MIN_SAMPLES)
    speeds: tuple[dict, ...]  # every configuration measured: size, width, batch, images_per_s, images_expected
    probe_seconds: float  # time spent measuring
    why: dict[str, str]
    notes: tuple[str, ...]
    fingerprint: DataFingerprint
    machine: MachineInfo
    version: int = PLAN_VERSION

    def to_config_overrides(self) -> dict[str, Any]:
        """Keys as :func:`medanomaly.config.schema.load` takes them."""
        out = {"task": self.task, "max_minutes": self.max_minutes, "size": self.size, "batch_size": self.batch_size,
               "epochs": self.epochs, "normalization": self.normalization, "model.width": self.width,
               "model.depth": self.depth, "model.norm": self.norm, "plan_images_per_s": self.images_per_s}
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
                 f"{m.memory_gib:.1f} GiB RAM free, bf16 {'yes' if m.bf16 else 'no'}"),
                *self.speed_rows()]
        dim = {"dim": "2D" if self.recommended_dim == 2 else "3D recommended (2D used)"}
        rows += [(k, str(v), self.why.get(k, "")) for k, v in (dim | self.to_config_overrides()).items()]
        w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
        lines = [f"{'setting':<{w0}}  {'value':<{w1}}  why", f"{'-' * w0}  {'-' * w1}  {'-' * 40}"]
        lines += [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def speed_rows(self) -> list[tuple[str, str, str]]:
        """The table's rows of measured speeds: one per configuration timed, then the expectation."""
        rows = [(f"measured {s['size']} px, w{s['width']}, b{s['batch']}", f"{s['images_per_s']:.1f} img/s",
                 f"~{s['images_expected']:,} images in {self.max_minutes:g} min"
                 + (" (chosen)" if (s["size"], s["width"], s["batch"]) == (self.size, self.width, self.batch_size)
                    else "")) for s in self.speeds]
        timed = f"minimum {self.min_images:,}; {len(self.speeds)} configurations timed in {self.probe_seconds:.1f} s"
        return [*rows, ("images expected", f"{self.images_expected:,}", timed)]


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


def _sizes(fp: DataFingerprint, mach: MachineInfo, width: int, n_train: int) -> tuple[list[int], str]:
    """The candidate sizes, ascending: MIN_SIZE to the median in-plane size rounded to 16 px, shrunk by
    16 px until two images (with the data and the weights) fit the memory (as nnU-Net shrinks its patch)."""
    side = math.sqrt(fp.median_shape[-1] * fp.median_shape[-2])
    median = max(16, int(side / 16 + 0.5) * 16)
    for size in range(median, 15, -16):
        fit = memory_fit(fp, mach, width, n_train, size)
        if fit.fits >= 2:
            break
    if fit.fits < 1:
        raise MedanomalyError(f"not enough memory for one {size}x{size} image: {fit.free / 2**30:.1f} GiB usable; "
                              "free memory, or train on fewer images (--splits)")
    why = f"median in-plane sqrt(H x W) {side:.0f} px rounded to 16" + (
        "" if size == median else f", reduced to {size} to fit memory")
    return list(range(min(MIN_SIZE, size), size + 1, 16)), why


def _batch(fit: MemoryFit, mach: MachineInfo, n_train: int) -> int:
    """Memory, device cap, at most 5 % of the training slices but >= MIN_BN_BATCH (nnU-Net), <= the slices."""
    return max(1, min(fit.fits, GPU_BATCH if mach.gpu else CPU_BATCH, max(round(0.05 * n_train), MIN_BN_BATCH),
                      n_train))


def _images(ips: float, budget_s: float, n_train: int, n_val: int) -> int:
    """Training images seen in ``budget_s`` at ``ips``: each epoch also validates (inference ~4x faster)."""
    n_train = max(n_train, 1)
    return int(ips * budget_s * n_train / (n_train + n_val / 4))


def _normalization(fp: DataFingerprint) -> tuple[str, str]:
    return (("auto", "8-bit images: /255, one scale for all slices (measured default)") if fp.eight_bit else
            ("ct", "CT-like (p0.5 < -500 HU): window -1000..1000 HU") if fp.intensity["p0.5"] < -500 else
            ("percentile", "per image: 0.5..99.5 percentiles to 0..1"))


def _epochs(fp: DataFingerprint, ips: float, n_train: int, budget_s: float,
            max_minutes: float) -> tuple[int, float, str]:
    """(epochs, epochs that fit the budget, why): 1.5x the estimate, as the time budget ends the run."""
    ips = max(ips, 1e-3)
    epoch_s = max(n_train, 1) / ips + fp.n_val_slices / (4 * ips)  # validation: inference is ~4x faster than training
    est = budget_s / epoch_s
    why = f"~{est:.1f} fit {max_minutes:g} min at the measured {ips:.1f} img/s; 1.5x headroom (the time budget " \
          "ends the run and anneals the LR)"
    return int(min(1000, max(1, math.ceil(1.5 * est)))), est, why


def _norm(batch: int) -> str:
    return "batch" if batch >= MIN_BN_BATCH else "instance"  # batch norm needs >= 8 images per batch


class _Measured:
    """A :data:`SpeedFn` that times real training steps on this machine
    (:class:`medanomaly.train.probe.SpeedMeter`), each size with the depth and norm the plan gives it."""

    def __init__(self, fp: DataFingerprint, mach: MachineInfo, task: str, normalization: str,
                 positive_fraction: float | None, max_size: int):
        base = {} if positive_fraction is None else {"positive_fraction": positive_fraction}
        self.meter = SpeedMeter(fp.data, task, mach.device, normalization, max_size, fp.channels, base)

    def __call__(self, size: int, width: int, batch: int) -> float:
        return self.meter({"size": size, "batch_size": batch, "model.width": width, "model.depth": depth_for(size),
                           "model.norm": _norm(batch)})

    @property
    def exhausted(self) -> bool:
        return self.meter.exhausted

    @property
    def spent(self) -> float:
        return self.meter.spent


@dataclass(frozen=True)
class _Choice:
    """The measured choice of size and width, and every measurement behind it."""

    fit: MemoryFit
    width: int
    batch: int
    images_per_s: float
    speeds: tuple[dict, ...]
    meets: bool  # its measured speed sees >= MIN_SAMPLES images in the budget


def _choose(fp: DataFingerprint, mach: MachineInfo, n_train: int, budget_s: float, sizes: list[int],
            speed: SpeedFn) -> _Choice:
    """The largest of ``sizes`` whose measured speed sees MIN_SAMPLES training images in ``budget_s``
    (none: the smallest); on a GPU with >= 16 GiB, GPU_WIDTH where it too is measured fast enough at that size."""
    measured: dict[tuple[int, int, int], float] = {}

    def ips(size: int, width: int = CPU_WIDTH) -> float:
        key = (size, width, _batch(memory_fit(fp, mach, width, n_train, size), mach, n_train))
        if key not in measured:
            measured[key] = max(0.0, float(speed(*key)))
        return measured[key]

    def meets(size: int, width: int = CPU_WIDTH) -> bool:
        return _images(ips(size, width), budget_s, n_train, fp.n_val_slices) >= MIN_SAMPLES * MARGIN

    def guess(measured_size: int) -> int:  # from that size's measured speed, as if time grew with the pixels
        images = _images(ips(measured_size), budget_s, n_train, fp.n_val_slices)
        return int(measured_size * math.sqrt(images / (MIN_SAMPLES * MARGIN)))

    def stop() -> bool:
        return bool(getattr(speed, "exhausted", False))

    i = largest_meeting(sizes, meets, guess, stop)
    size, width = sizes[max(i, 0)], CPU_WIDTH
    if (mach.gpu and (mach.gpu_memory_gib or 0) >= 16 and not stop()
            and memory_fit(fp, mach, GPU_WIDTH, n_train, size).fits >= 2 and meets(size, GPU_WIDTH)):
        width = GPU_WIDTH
    fit = memory_fit(fp, mach, width, n_train, size)
    batch = _batch(fit, mach, n_train)
    rows = tuple({"size": k[0], "width": k[1], "batch": k[2], "images_per_s": round(v, 2),
                  "images_expected": _images(v, budget_s, n_train, fp.n_val_slices)} for k, v in sorted(measured.items()))
    return _Choice(fit, width, batch, ips(size, width), rows, i >= 0)


def _size_reasons(choice: _Choice, sizes: list[int], why_sizes: str, budget_s: float, mach: MachineInfo,
                  images: int) -> tuple[dict[str, str], list[str]]:
    """The reasons for size, depth, width and batch, and a note where the budget is too short."""
    fit, minutes = choice.fit, budget_s / 60
    span = f"{sizes[0]}-{sizes[-1]} px" if len(sizes) > 1 else f"{sizes[0]} px"
    rule = (f"the largest of {span} whose measured speed sees >= {MIN_SAMPLES:,} training images in {minutes:g} min "
            f"(+{MARGIN - 1:.0%} for the measurement's noise)"
            if choice.meets else f"the smallest of {span}: none sees {MIN_SAMPLES:,} images in {minutes:g} min")
    why = {"size": f"{why_sizes}; {rule}",
           "model.depth": f"down-sample to a ~8 px feature map ({fit.size} -> {fit.size // 2**fit.depth}), at most 5",
           "model.width": "measured CPU default" if not mach.gpu else (
               f"GPU: width {GPU_WIDTH} measured fast enough at this size" if choice.width == GPU_WIDTH else
               f"GPU: width {GPU_WIDTH} not measured fast enough (or too large) at this size"),
           "batch_size": f"min of memory (fits {fit.fits} x {fit.per_image / 2**20:.0f} MiB), device cap "
                         f"({GPU_BATCH if mach.gpu else CPU_BATCH}), 5% of the train slices (>= {MIN_BN_BATCH})",
           "model.norm": "batch norm needs >= 8 images per batch" if _norm(choice.batch) == "batch" else
                         "small batch: as nnU-Net",
           "plan_images_per_s": "measured here: a run that trains well below it says so"}
    enough = math.ceil(minutes * MIN_SAMPLES / max(images, 1))
    short = (f"at the measured {choice.images_per_s:.1f} img/s, {minutes:g} min see ~{images:,} training images, "
             f"fewer than the {MIN_SAMPLES:,} the plan asks for: --max-minutes {enough} would reach it")
    notes = [] if choice.meets else [short]
    return why, notes


def make_plan(fp: DataFingerprint, mach: MachineInfo, max_minutes: float = TrainConfig.max_minutes,
              task: str = TrainConfig.task, speed: SpeedFn | None = None) -> Plan:
    """The plan for ``task`` on this data and machine within ``max_minutes`` of training (<= 0: no
    budget; sized as for the default budget). ``speed``: training images/s of (size, width, batch);
    None: measured now, on a few slices of ``fp.data`` on ``mach.device`` (at most ~20 s)."""
    why = {"max_minutes": "training time budget", "task": _task_reason(fp, task)}
    dim, why["dim"] = _choose_dim(fp)
    notes = _dim_notes(fp, dim)
    lesion = fp.lesion_slice_fraction or 0.0
    n_train = fp.n_train_labelled if task == "supervised" else round(fp.n_train_slices - lesion * fp.n_train_labelled)
    budget_s = (max_minutes if max_minutes > 0 else TrainConfig.max_minutes) * 60
    normalization, why["normalization"] = _normalization(fp)
    pos = None if task == "anomaly" else (0.5 if lesion < 0.5 else 0.0)
    why["positive_fraction"] = f"lesion in {lesion:.0%} of slices: " + (
        "half of each batch from lesion slices" if pos else "uniform sampling suffices")
    sizes, why_sizes = _sizes(fp, mach, CPU_WIDTH, n_train)
    speed = speed or _Measured(fp, mach, task, normalization, pos, sizes[-1])
    choice = _choose(fp, mach, n_train, budget_s, sizes, speed)
    fit, ips = choice.fit, choice.images_per_s
    images = _images(ips, budget_s, n_train, fp.n_val_slices)
    reasons, short = _size_reasons(choice, sizes, why_sizes, budget_s, mach, images)
    why |= reasons
    notes += short
    if mach.memory_gib * 2**30 * 0.5 < fit.data_bytes:
        notes.append(f"the training slices need {fit.data_bytes / 2**30:.1f} GiB of RAM at {fit.size} px: "
                     "use fewer cases")
    epochs, est, why["epochs"] = _epochs(fp, ips, n_train, budget_s, max_minutes)
    return Plan(task=task, max_minutes=float(max_minutes), recommended_dim=dim, size=fit.size,
                batch_size=int(choice.batch), width=choice.width, depth=fit.depth, norm=_norm(choice.batch),
                normalization=normalization, positive_fraction=pos, epochs=epochs, images_per_s=round(ips, 2),
                epochs_estimate=round(est, 2), images_expected=images, min_images=MIN_SAMPLES, speeds=choice.speeds,
                probe_seconds=round(float(getattr(speed, "spent", 0.0)), 1), why=why, notes=tuple(notes),
                fingerprint=fp, machine=mach)


def save_plan(plan: Plan, path: str | Path, overwrite: bool = True) -> Path:
    check_new_file(path, overwrite)  # 'medanomaly plan' checks it before planning too (commands.cmd_plan)
    jsonio.write_json(Path(path), asdict(plan), indent=1)
    return Path(path)


def load_plan(path: str | Path) -> Plan:
    """A plan saved by :func:`save_plan` (``medanomaly plan``)."""
    try:
        d = json.loads(Path(path).read_text())
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"version {d.get('version')!r}, expected {PLAN_VERSION}")
        fp = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("fingerprint").items()}
        d.update(fingerprint=DataFingerprint(**fp), machine=MachineInfo(**d.pop("machine")), notes=tuple(d["notes"]),
                 speeds=tuple(dict(s) for s in d["speeds"]))
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
    if any(k in SPEED_KEYS or k.startswith("model.") for k in fixed) or fixed.get("init"):
        merged.pop("plan_images_per_s", None)  # measured for the plan's settings, not these
    log.info("plan: %s; set by --config or flags: %s", ", ".join(f"{k}={v}" for k, v in merged.items()) or "-",
             ", ".join(sorted(set(plan.to_config_overrides()) & set(fixed))) or "-")
    return plan, merged | {k: v for k, v in flags.items() if v is not None}
