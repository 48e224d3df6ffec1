"""Training configuration: frozen dataclasses, loaded from one JSON file, overridden by CLI
flags, saved as ``config.json`` in the model directory. Every value is checked against the rule its
field declares (:mod:`medanomaly.config.rules`) wherever the configuration comes from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from medanomaly.config.labels import LABELS_PATTERN, LABELS_WHAT, parse_labels
from medanomaly.config.options import (
    LOSSES,
    NORMALIZATIONS,
    OPTIMIZERS,
    PRECISIONS,
    SECTIONS,
    TASKS,
    UNLABELLED_METHODS,
)
from medanomaly.config.rules import (
    ConfigError,
    Rule,
    check,
    problems,
    rules_of,
    setting,
)
from medanomaly.config.sections import (
    SEED,
    UNIT,
    AnomalyConfig,
    AugmentConfig,
    UNetConfig,
)
from medanomaly.core import jsonio
from medanomaly.core.errors import MedanomalyError

#: the upper bound of counts and budgets that have no natural one: far beyond any real run, below any overflow
MANY = 1_000_000
#: a path or name: not empty, no NUL (which no file system takes)
PATH = {"kind": "str", "pattern": r"[^\x00]+", "nullable": True, "what": "a non-empty path or name"}


def _section(cls: type) -> dict[str, Rule]:
    """The field metadata of a nested section: an instance of ``cls`` (a JSON object in files)."""
    name = {UNetConfig: "model", AugmentConfig: "augment", AnomalyConfig: "anomaly"}[cls]
    return {"rule": Rule("section", section=cls, what=f"an object of {name} settings")}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults: the best found for a 2-core CPU
    (see README, "Choosing the defaults"). Each field declares its rule (:mod:`medanomaly.config.rules`)."""

    task: str = setting("supervised", choices=TASKS)
    size: int = setting(128, ge=16, le=4096)  # training / inference input, pixels per side
    epochs: int = setting(100, ge=1, le=MANY)
    max_minutes: float = setting(25.0, ge=0, le=MANY)  # wall-clock budget (0: none); the LR schedule anneals within it
    # training images/s the plan measured for these settings on this machine (set by the plan; None: no plan):
    # a run that trains well below it says so once (medanomaly.train.loop)
    plan_images_per_s: float | None = setting(None, kind="float", gt=0, le=1e9, nullable=True)
    batch_size: int = setting(16, ge=1, le=4096)
    lr: float = setting(2e-3, gt=0, le=10)
    weight_decay: float = setting(1e-4, ge=0, le=1)
    optimizer: str = setting("adamw", choices=OPTIMIZERS)
    loss: str = setting("bce+dice", choices=LOSSES)
    bce_weight: float = setting(0.5, **UNIT)  # bce+dice: bce_weight x BCE + (1 - bce_weight) x Dice
    # lesion labels "1=edema,2=enhancing" (medanomaly.config.labels); two or more: softmax, label maps;
    # None (or one label): binary, any mask value > 0 is lesion. Training fills it from DATA/dataset.json
    labels: str | None = setting(None, kind="str", pattern=LABELS_PATTERN, nullable=True, what=LABELS_WHAT)
    seed: int = setting(0, **SEED)
    # epochs without validation improvement before stopping; 0 would stop before the first epoch
    patience: int = setting(15, ge=1, le=MANY, hint="to train without early stopping, make it at least epochs")
    warmup_epochs: float = setting(1.0, ge=0, le=MANY)
    positive_fraction: float = setting(0.5, **UNIT)  # share of each batch drawn from slices with lesion (0 = uniform)
    normalization: str = setting("auto", choices=NORMALIZATIONS)
    precision: str = setting("auto", choices=PRECISIONS)  # bf16 autocast where the CPU/GPU supports it
    channels_last: bool = setting(True)
    # torch.compile the training network (Inductor; 2D, one process; needs a C++ compiler)
    compile: bool = setting(False)
    tta: bool = setting(False)  # predict also on the left-right flipped image and average (2x inference time)
    tensorboard: bool = setting(False)  # also write TensorBoard event files (needs the tensorboard package)
    init: str | None = setting(None, **PATH)  # start from these weights: a model directory or a .pt state dict
    freeze_encoder_epochs: int = setting(0, ge=0, le=MANY)  # with init: train only the decoder for this many epochs
    # probability that a lesion-free training sample gets a synthetic lesion
    synthetic_lesions: float = setting(0.0, **UNIT)
    # images without masks (a folder, or a split name of splits.json): mean teacher
    unlabelled: str | None = setting(None, **PATH)
    consistency_weight: float = setting(1.0, ge=0, le=1000)  # mean teacher: weight of the consistency loss
    ema_decay: float = setting(0.99, **UNIT)  # mean teacher: teacher = EMA of the student with this decay
    # what --unlabelled does: auto (the measured best), mean-teacher, pretrain, both
    unlabelled_method: str = setting("auto", choices=UNLABELLED_METHODS)
    # --unlabelled with pretrain: share of max_minutes spent pretraining (the rest fine-tunes)
    pretrain_share: float = setting(0.3, gt=0, lt=1)
    # supervised: a folder of more image/mask pairs ('synthesize' output), added to train only
    extra: str | None = setting(None, **PATH)
    # 3D (model.dim 3, see medanomaly.train.prepare): sizes in voxels (Z, Y, X) of the resampled grid, spacing in mm
    # None: the median volume, shrunk to 64^3 voxels (CPU) / 128^3 (GPU)
    patch: tuple[int, int, int] | None = setting(None, kind="int", length=3, ge=1, le=4096, nullable=True)
    # target spacing; None: median of the training volumes
    spacing: tuple[float, float, float] | None = setting(None, kind="float", length=3, gt=0, le=1000, nullable=True)
    # share of patches centred on a lesion (anomaly: body) voxel, as nnU-Net
    foreground_fraction: float = setting(0.33, **UNIT)
    patches_per_epoch: int = setting(250, ge=1, le=MANY)  # patches drawn per 3D epoch
    patch_batch: int = setting(2, ge=1, le=4096)  # patches per 3D optimizer step (nnU-Net: 2)
    model: UNetConfig = field(default_factory=lambda: UNetConfig(width=32, depth=4, norm="batch"),
                              metadata=_section(UNetConfig))
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata=_section(AugmentConfig))
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig, metadata=_section(AnomalyConfig))  # task anomaly

    def __post_init__(self) -> None:
        check(self)
        if len(parse_labels(self.labels)) >= 2:
            _check_several_labels(self)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_several_labels(cfg: TrainConfig) -> None:
    """What several labels do not support yet: 3D, the anomaly task, synthetic lesions, --unlabelled, --extra."""
    unsupported = [what for what, on in (("--dim 3", cfg.model.dim == 3), ("--task anomaly", cfg.task == "anomaly"),
                                         ("--synthetic-lesions", cfg.synthetic_lesions > 0),
                                         ("--unlabelled", cfg.unlabelled is not None),
                                         ("--extra", cfg.extra is not None)) if on]
    if unsupported:
        raise ConfigError(f"several labels ({cfg.labels}) are not yet supported with {' or '.join(unsupported)}; "
                          "train them in 2D with --task supervised, or train one label at a time (drop --labels, or "
                          "keep one label in the masks)")


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


#: section name -> its dataclass
SECTION_CLASSES: dict[str, type] = {"model": UNetConfig, "augment": AugmentConfig, "anomaly": AnomalyConfig}
#: a config file larger than this is not one (and /dev/zero or a pipe would never end)
MAX_CONFIG_BYTES = 1 << 20


def rule_of(key: str) -> Rule:
    """The rule of a TrainConfig key; dotted keys (``model.width``) reach into the sections."""
    section, _, name = key.rpartition(".")
    return rules_of(SECTION_CLASSES[section] if section else TrainConfig)[name]


def _tuples(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}  # JSON has lists, the configs tuples


def _unknown(cls: type, data: Mapping[str, Any], where: str) -> list[str]:
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid, key=str)
    return [f"unknown {where} keys {unknown}; valid: {', '.join(sorted(valid))}"] if unknown else []


def _problems(data: Mapping[str, Any]) -> list[str]:
    """Every problem of a (possibly partial) TrainConfig dict: unknown keys, and values that break
    their rules (the sections given as objects key by key, quoted as ``model.width``)."""
    found = _unknown(TrainConfig, data, "config")
    for name, cls in SECTION_CLASSES.items():
        if isinstance(data.get(name), Mapping):
            found += _unknown(cls, data[name], name) + problems(cls, _tuples(data[name]), f"{name}.")
    flat = {k: v for k, v in _tuples(data).items() if not (k in SECTION_CLASSES and isinstance(v, Mapping))}
    return found + problems(TrainConfig, flat)


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from a (possibly partial) dict; one ConfigError lists every unknown key and
    every value that breaks its rule."""
    bad = _problems(data)
    if bad:
        raise ConfigError("; ".join(bad))
    values = _tuples(data)
    for name, cls in SECTION_CLASSES.items():
        if isinstance(values.get(name), Mapping):
            values[name] = cls(**_tuples(values[name]))
    return TrainConfig(**values)


def read_json_object(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The JSON object in the UTF-8 file at ``path`` (a byte-order mark is allowed); one clear
    MedanomalyError when it is missing, not a regular file, too large, not UTF-8, not JSON, or
    holds something else than an object."""
    path = Path(path)
    try:
        if not path.is_file():
            raise MedanomalyError(f"cannot read {what} {path}: it does not exist or is not a regular file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise MedanomalyError(f"cannot read {what} {path}: {path.stat().st_size} bytes is too large for one "
                                  f"(at most {MAX_CONFIG_BYTES}); pass the JSON file of settings")
        text = path.read_bytes().decode("utf-8-sig")
        data = json.loads(text)
    except OSError as exc:
        raise MedanomalyError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise MedanomalyError(f"cannot read {what} {path}: it is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                              f"at position {exc.start}); save it as UTF-8 JSON") from exc
    except (ValueError, RecursionError) as exc:
        raise MedanomalyError(f"cannot read {what} {path}: it is not valid JSON ({exc}); it must be a JSON "
                              "object of settings (see README, 'Configuration')") from exc
    if not isinstance(data, dict):
        raise MedanomalyError(f"{what} {path} must hold a JSON object of settings ({{\"key\": value, ...}}), "
                              f"not a JSON {type(data).__name__}")
    return data


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- the JSON file at ``path`` (if any) <- ``overrides`` (None values ignored).

    Override keys may be dotted (``model.width``) to reach nested sections. The file is checked on
    its own first, so its errors name it; then the result as a whole (ConfigError)."""
    data: dict[str, Any] = {} if path is None else read_json_object(path)
    bad = _problems(data)
    if bad:
        raise ConfigError(f"config file {path}: " + "; ".join(bad))
    base = TrainConfig().to_dict()
    for section in SECTIONS:
        base[section].update(data.pop(section, {}))
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
    jsonio.write_json(Path(path), cfg.to_dict(), indent=2)


def with_changes(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return replace(cfg, **changes)
