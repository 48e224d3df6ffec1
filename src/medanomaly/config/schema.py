"""Training configuration: frozen dataclasses, loaded from one JSON file, overridden by CLI
flags, saved as ``config.json`` in the model directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from medanomaly.config.options import (
    LOSSES,
    NORMS,
    OPTIMIZERS,
    PRECISIONS,
    SECTIONS,
    TASKS,
    UNLABELLED_METHODS,
)
from medanomaly.config.sections import AnomalyConfig, AugmentConfig, UNetConfig
from medanomaly.core.atomic import atomic_write_text
from medanomaly.core.errors import MedanomalyError


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults: the best found for a 2-core CPU
    (see README, "Choosing the defaults")."""

    task: str = "supervised"
    size: int = 128  # training / inference input, pixels per side
    epochs: int = 100
    max_minutes: float = 25.0  # wall-clock budget; the LR schedule anneals within it
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    loss: str = "bce+dice"
    bce_weight: float = 0.5
    seed: int = 0
    patience: int = 15  # epochs without validation improvement before stopping
    warmup_epochs: float = 1.0
    positive_fraction: float = 0.5  # share of each batch drawn from slices with lesion (0 = uniform)
    normalization: str = "auto"
    precision: str = "auto"  # bf16 autocast where the CPU/GPU supports it
    channels_last: bool = True
    compile: bool = False  # torch.compile the training network (Inductor; 2D, one process; needs a C++ compiler)
    tta: bool = False  # predict also on the left-right flipped image and average (2x inference time)
    init: str | None = None  # start from these weights: a model directory or a .pt state dict
    freeze_encoder_epochs: int = 0  # with init: train only the decoder for this many epochs
    synthetic_lesions: float = 0.0  # probability that a lesion-free training sample gets a synthetic lesion
    unlabelled: str | None = None  # images without masks (a folder, or a split name of splits.json): mean teacher
    consistency_weight: float = 1.0  # mean teacher: weight of the consistency loss after its ramp-up
    ema_decay: float = 0.99  # mean teacher: teacher = EMA of the student with this decay
    unlabelled_method: str = "auto"  # what --unlabelled does: auto (the measured best), mean-teacher, pretrain, both
    pretrain_share: float = 0.3  # --unlabelled with pretrain: share of max_minutes spent pretraining
    extra: str | None = None  # supervised: a folder of more image/mask pairs ('synthesize' output), added to train only
    # 3D (model.dim 3, see medanomaly.train.prepare): sizes in voxels (Z, Y, X) of the resampled grid, spacing in mm
    patch: tuple[int, int, int] | None = None  # None: the median volume, shrunk to 64^3 voxels (CPU) / 128^3 (GPU)
    spacing: tuple[float, float, float] | None = None  # target spacing; None: median of the training volumes
    foreground_fraction: float = 0.33  # share of patches centred on a lesion (anomaly: body) voxel, as nnU-Net
    patches_per_epoch: int = 250  # patches drawn per 3D epoch
    patch_batch: int = 2  # patches per 3D optimizer step (nnU-Net: 2)
    model: UNetConfig = field(default_factory=lambda: UNetConfig(width=32, depth=4, norm="batch"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)  # used by task "anomaly" only

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("task", self.task, TASKS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("unlabelled_method", self.unlabelled_method, UNLABELLED_METHODS)
        _check_choice("norm", self.model.norm, NORMS)
        if self.size < 16 or self.batch_size < 1 or self.epochs < 1:
            raise MedanomalyError(f"size >= 16, batch size >= 1 and epochs >= 1 are needed (got {self.size}, "
                                  f"{self.batch_size}, {self.epochs})")

    def to_dict(self) -> dict:
        return asdict(self)


#: training budget of ``medanomaly demo`` on its synthetic phantoms, minutes (with --data: TrainConfig's)
DEMO_MAX_MINUTES = 1.5


def default(key: str) -> Any:
    """The built-in default of a TrainConfig key; dotted keys (``model.width``) reach into the sections."""
    value: Any = TrainConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def pretrain_budget(cfg: TrainConfig) -> tuple[float, float, int]:
    """``--unlabelled`` with pretraining splits the run: (pretraining minutes, fine-tuning minutes,
    pretraining epochs), ``pretrain_share`` of the time budget and of the epochs going to pretraining."""
    share = cfg.pretrain_share
    return cfg.max_minutes * share, cfg.max_minutes * (1 - share), max(1, round(cfg.epochs * share))


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise MedanomalyError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a (possibly partial) dict; unknown keys are an error listing valid ones."""
    data = dict(data)
    nested = {"model": UNetConfig, "augment": AugmentConfig, "anomaly": AnomalyConfig}
    for key, cls in nested.items():
        if key in data and isinstance(data[key], dict):
            data[key] = _build(cls, data[key], key)
    cfg = _build(TrainConfig, data, "config")
    return cfg


def _build(cls: type, data: dict, where: str):
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise MedanomalyError(f"unknown {where} keys {unknown}; valid: {', '.join(sorted(valid))}")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**data)


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- the JSON file at ``path`` (if any) <- ``overrides`` (None values ignored).

    Override keys may be dotted (``model.width``) to reach nested sections.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise MedanomalyError(f"cannot read config file {path}: {exc}; it must be a JSON object") from exc
        if not isinstance(data, dict) or not all(isinstance(data.get(s) or {}, dict) for s in SECTIONS):
            raise MedanomalyError(f"config file {path} must hold a JSON object whose 'model' and 'augment' "
                                  "entries are objects too (see README, 'Configuration')")
    base = TrainConfig().to_dict()
    for section in SECTIONS:
        base[section].update(data.pop(section, {}) or {})
    base.update(data)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in SECTIONS:
                raise MedanomalyError(f"unknown config section {section!r} in {key!r}; valid: {', '.join(SECTIONS)}")
            base[section][sub] = value
        else:
            base[key] = value
    return from_dict(base)


def save(cfg: TrainConfig, path: str | Path) -> None:
    atomic_write_text(Path(path), json.dumps(cfg.to_dict(), indent=2))


def with_changes(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return replace(cfg, **changes)
