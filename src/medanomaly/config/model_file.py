"""``model.json``, the model file: one frozen schema for everything ``predict`` rebuilds a model from.

Schema version 2 (this module writes it) holds, besides the ``format`` tag, its ``schema_version``
and the ``medanomaly_version`` that wrote it:

- ``config``: the final, complete :class:`~medanomaly.config.schema.TrainConfig`: the one trained,
  with the network's real channels and the anomaly-map settings chosen on val written into it;
- the sections ``predict`` runs, derived from ``config`` by :func:`build_model_file`: ``task``,
  ``model`` (the network, :class:`UNetConfig`), ``input`` (:class:`InputSpec`), ``precision``,
  ``anomaly`` (anomaly task only, :class:`AnomalyConfig`) and ``postprocess`` (chosen on val,
  :class:`PostprocessParams`). A hand edit of a section is what ``predict`` follows;
- the records ``training`` (best epoch and its validation score) and ``calibration`` (how the
  threshold and post-processing were chosen on val);
- ``weights`` (models with a network): ``{"file": "model.pt", "sha256": ...}``, the SHA-256 of the
  weights file the calibration ran on, which the predictor checks before using it.
- ``geometry``: the training data's orientation and spacing (:data:`GEOMETRY_KEYS`); ``predict``
  reorients volumes when it names an orientation and warns about inputs far from it.
- ``labels`` (several labels only): ``{"value", "name", "postprocess"}`` per label, its post-processing
  chosen on val (:mod:`medanomaly.config.labels`); the network has ``len(labels) + 1`` softmax outputs.

The file is written last, atomically, once calibration has succeeded: a directory without it (or
with the ``calibration: {"status": "pending"}`` placeholder of earlier releases) is unfinished, and
:func:`read_model_file` refuses it with the command that completes it.

Version 1 (releases up to b9f2d7b: no ``schema_version``, no ``config``) is upgraded in memory
by :func:`read_model_file`: the configuration comes from the directory's ``config.json`` (the
training defaults without a readable one) with the sections of ``model.json`` written into it. Sizes are
pixels per side (2D), voxels (3D ``patch``, Z Y X) and millimetres (``spacing``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from medanomaly.config import schema
from medanomaly.config.labels import Label, labels_record, parse_labels, read_labels_record, several
from medanomaly.config.options import NORMALIZATIONS, PRECISIONS, TASKS
from medanomaly.config.schema import TrainConfig
from medanomaly.config.sections import AnomalyConfig, PostprocessParams, UNetConfig
from medanomaly.core import jsonio
from medanomaly.core.errors import MedanomalyError
from medanomaly.core.version import __version__

log = logging.getLogger(__name__)
FORMAT = "medanomaly-model"
SCHEMA_VERSION = 2
FILE_NAME = "model.json"
WEIGHTS_FILE = "model.pt"
#: the ``geometry`` record of the training data: ``orientation`` (the axis codes volumes were brought
#: to, e.g. ["L", "P", "S"]; absent in older files: volumes are used as stored), ``median_spacing``
#: (mm, Z Y X after reorientation; null for 2D rasters), ``slice_plane`` (the acquisition plane of
#: most training volumes: axial, coronal, sagittal; null if none)
GEOMETRY_KEYS = ("orientation", "median_spacing", "slice_plane")
ORIENTATION = ("L", "P", "S")  # medanomaly.io.orient.CANONICAL (config sits below io, so it is repeated here)


@dataclass(frozen=True)
class InputSpec:
    """What the network is fed: ``channels`` of the image, ``normalization`` (a key of
    NORMALIZATIONS); 2D: slices resized to ``size`` x ``size`` pixels; 3D (``dim`` 3): patches of
    ``patch`` voxels (Z, Y, X) of the volume resampled to ``spacing`` mm. ``tta``: averaged with the
    left-right flipped prediction (supervised only). ``channel_names``: the name of each channel
    (e.g. FLAIR, T1; from dataset.json or the files' modality tokens), () where the training data
    named none (and in files written before names were recorded)."""

    channels: int
    size: int
    normalization: str
    dim: int = 2
    tta: bool = False
    patch: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    channel_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"input.normalization {self.normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.dim not in (2, 3):
            raise ValueError(f"input.dim is {self.dim!r}; 2 or 3")
        if self.dim == 3 and not self.patch:
            raise ValueError("input.patch is missing; a 3D model needs its sliding-window patch")
        if self.channel_names and (len(self.channel_names) != self.channels
                                   or not all(isinstance(n, str) for n in self.channel_names)):
            raise ValueError(f"input.channel_names {list(self.channel_names)!r} is not one name per channel "
                             f"({self.channels})")

    def check_input(self, channels: int, names: tuple[str, ...] = (), what: str = "the input") -> None:
        """Refuse an input of another number of channels, or of other channel names where both the
        model and the input name theirs (names compared case-insensitively), naming both sides:
        "model expects FLAIR, T1 (2 channels); INPUT has FLAIR (1)"."""
        same_names = not (names and self.channel_names) or \
            [n.lower() for n in names] == [n.lower() for n in self.channel_names]
        if channels == self.channels and same_names:
            return
        expects = f"{', '.join(self.channel_names)} ({self.channels} channel{'s' * (self.channels != 1)})" \
            if self.channel_names else f"{self.channels}-channel images"
        has = f"{', '.join(names)} ({channels})" if names else f"{channels} channel{'s' * (channels != 1)}"
        raise MedanomalyError(f"model expects {expects}; {what} has {has}: give the image with the channels the "
                              "model was trained on, in that order (nnU-Net: one file per channel, case_0000, "
                              "case_0001...; see README, 'Data layouts'), or use a model trained on these channels")

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``patch`` and ``spacing`` only for a 3D model (as the version 1 files)."""
        d: dict[str, Any] = {"channels": self.channels, "size": self.size, "normalization": self.normalization,
                             "dim": self.dim, "tta": self.tta}
        if self.dim == 3:
            d.update(patch=list(self.patch or ()), spacing=self.spacing and list(self.spacing))
        if self.channel_names:  # only where known: a one-channel model's file stays as it was
            d["channel_names"] = list(self.channel_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """From :meth:`to_dict`'s form; TypeError on unknown keys."""
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


@dataclass(frozen=True)
class TrainingSummary:
    """The training run behind the weights: its best epoch (-1: nothing trained, the 'intensity'
    baseline) and that epoch's validation score, ``val_score`` saying what the score measures; the
    epochs trained and the images (slices, 3D patches) the steps drew, the training minutes, and for
    a planned run the speed the plan measured (img/s) and its minimum of images. None: not recorded
    (model files of earlier releases)."""

    best_epoch: int = -1
    best_val_score: float = float("nan")
    val_score: str = ""
    epochs: int | None = None
    images_seen: int | None = None
    train_minutes: float | None = None
    plan_images_per_s: float | None = None
    min_images: int | None = None


@dataclass(frozen=True)
class ModelFile:
    """The content of ``model.json`` (see the module docstring); nothing that identifies a patient."""

    task: str
    input: InputSpec
    model: UNetConfig  # the network, with its in_channels and out_channels
    postprocess: PostprocessParams
    config: TrainConfig
    anomaly: AnomalyConfig | None = None  # anomaly task: the map settings (chosen on val)
    precision: str = "auto"
    training: TrainingSummary = field(default_factory=TrainingSummary)
    calibration: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None  # of model.pt (None: not recorded, as in version 1 files)
    geometry: dict[str, Any] = field(default_factory=dict)  # the training data's (see GEOMETRY_KEYS); {}: older files
    labels: tuple[Label, ...] = ()  # several labels (two or more), in value order; (): binary
    label_posts: tuple[PostprocessParams, ...] = ()  # each label's post-processing, chosen on val
    medanomaly_version: str = __version__
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if (self.anomaly is None) != (self.task == "supervised"):
            raise ValueError(f"a {self.task} model has {'no' if self.task == 'supervised' else 'an'} anomaly section")
        if self.weights_sha256 is not None and not _is_sha256(self.weights_sha256):
            raise ValueError(f"weights.sha256 {self.weights_sha256!r} is not a SHA-256 (64 hexadecimal digits)")

    @property
    def has_network(self) -> bool:
        """False for the 'intensity' anomaly method (its score is the normalised intensity itself)."""
        return self.anomaly is None or self.anomaly.method != "intensity"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of model.json, keys in the order of the version 1 files (then ``config``)."""
        d: dict[str, Any] = {"format": self.format, "schema_version": self.schema_version,
                             "medanomaly_version": self.medanomaly_version, "task": self.task,
                             "model": self.model.to_dict(), "input": self.input.to_dict(),
                             "precision": self.precision, "postprocess": self.postprocess.to_dict(),
                             "training": {k: v for k, v in asdict(self.training).items() if v is not None},
                             "calibration": dict(self.calibration)}  # training: what is recorded (None: not)
        if self.anomaly is not None:
            d["anomaly"] = self.anomaly.to_dict()
        d["config"] = self.config.to_dict()
        if self.weights_sha256 is not None:
            d["weights"] = {"file": WEIGHTS_FILE, "sha256": self.weights_sha256}
        if self.geometry:
            d["geometry"] = dict(self.geometry)
        if self.labels:
            d["labels"] = labels_record(self.labels, list(self.label_posts))
        return d


def network_out_channels(task: str, method: str, in_channels: int, labels: int = 0) -> int:
    """Channels the network returns: 1 logit map (supervised, anomaly method 'synthetic'), background
    + each label (supervised, ``labels`` >= 2) or a reconstruction of the ``in_channels`` input channels."""
    if task == "supervised":
        return labels + 1 if labels >= 2 else 1
    return 1 if method == "synthetic" else in_channels


def build_model_file(cfg: TrainConfig, in_channels: int, post: PostprocessParams, training: TrainingSummary,
                     calibration: dict[str, Any], weights_sha256: str | None = None,
                     geometry: dict[str, Any] | None = None, channel_names: tuple[str, ...] = (),
                     label_posts: tuple[PostprocessParams, ...] = ()) -> ModelFile:
    """The model file of a run trained with ``cfg`` (its ``anomaly`` section holding the map settings
    chosen on val) on ``in_channels``-channel images, with the post-processing ``post`` chosen on val
    and ``weights_sha256`` the SHA-256 of its model.pt (None for the 'intensity' method: no weights);
    ``geometry``: the training data's orientation and spacing record (see :data:`GEOMETRY_KEYS`);
    ``channel_names``: the training images' channel names (() where unnamed); ``label_posts``: with
    several ``cfg.labels``, each label's post-processing (default: ``post``)."""
    labels = parse_labels(cfg.labels) if several(cfg.labels) else ()
    net = replace(cfg.model, in_channels=in_channels,
                  out_channels=network_out_channels(cfg.task, cfg.anomaly.method, in_channels, len(labels)))
    dim3 = cfg.model.dim == 3  # 3D: sliding-window patch (voxels), training spacing (mm)
    spec = InputSpec(in_channels, cfg.size, cfg.normalization, cfg.model.dim, cfg.tta and cfg.task == "supervised",
                     cfg.patch if dim3 else None, cfg.spacing if dim3 else None,
                     tuple(channel_names) if len(channel_names) == in_channels else ())
    return ModelFile(cfg.task, spec, net, post, replace(cfg, model=net),
                     cfg.anomaly if cfg.task == "anomaly" else None, cfg.precision, training, dict(calibration),
                     weights_sha256, _checked_geometry(dict(geometry or {})), labels,
                     tuple(label_posts) or (post,) * len(labels))


def write_model_file(model_file: ModelFile, model_dir: str | Path) -> Path:
    """Write ``model_dir/model.json`` atomically; return its path."""
    path = Path(model_dir) / FILE_NAME
    jsonio.write_json(path, model_file.to_dict(), indent=2)
    return path


def read_model_file(model_dir: str | Path, finished: bool = True) -> ModelFile:
    """``model_dir/model.json``, checked (version 1 upgraded in memory): a clear
    :class:`MedanomalyError` naming the file for anything that is not a sound model file, and for an
    unfinished model directory (no model.json, or a pending calibration) the command that completes
    it. ``finished`` False accepts a pending calibration (what ``calibrate`` completes)."""
    model_dir = Path(model_dir)
    data = _read_json(model_dir)
    version = data.get("schema_version", 1)  # version 1 files have no such key
    if version not in (1, SCHEMA_VERSION):
        raise MedanomalyError(f"{model_dir / FILE_NAME} has schema_version {version!r}; this medanomaly "
                              f"({__version__}) reads versions 1 and {SCHEMA_VERSION}: upgrade medanomaly")
    if finished and is_pending(data):
        raise MedanomalyError(f"{model_dir} is unfinished: its calibration was interrupted ({model_dir / FILE_NAME} "
                              "says calibration 'pending' and holds a placeholder threshold, as earlier releases "
                              f"wrote it before calibrating). Complete it with 'medanomaly calibrate {model_dir} "
                              "--data DATA' (DATA: the data folder it was trained on)")
    base = _v1_base_config(model_dir) if version == 1 else None
    try:  # a damaged or hand-edited model.json: one clear error, not a KeyError or TypeError
        return _check(from_dict(upgrade_v1(data, base) if base is not None else data))
    except (KeyError, TypeError, ValueError, AttributeError, MedanomalyError) as exc:
        what = f"missing entry {exc}" if isinstance(exc, KeyError) else str(exc)
        raise MedanomalyError(f"{model_dir / FILE_NAME} is damaged or was edited ({what}); restore it "
                              "from the training run or retrain") from exc


def is_pending(data: dict[str, Any]) -> bool:
    """A model.json object written before calibration by earlier releases (a placeholder threshold)."""
    calibration = data.get("calibration")
    return isinstance(calibration, dict) and calibration.get("status") == "pending"


def _is_sha256(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def unfinished(model_dir: Path) -> str | None:
    """Why ``model_dir`` (without model.json) is an unfinished training run, with the command that
    completes it; None where it holds no trace of one (not a model directory at all)."""
    has = {name: (model_dir / name).is_file() for name in (WEIGHTS_FILE, "checkpoint.pt", "config.json")}
    resume = f"'medanomaly train DATA --out {model_dir} --resume'"
    calibrate = f"'medanomaly calibrate {model_dir} --data DATA'"
    where = "(DATA: the data folder it was trained on)"
    if has[WEIGHTS_FILE]:
        return (f"{model_dir} is unfinished: its training or its calibration was interrupted (model.pt but no "
                f"model.json), so it has no threshold chosen on val. Complete it with {calibrate} if the training "
                f"had ended, else with {resume}, which trains on and then calibrates {where}")
    if has["checkpoint.pt"]:
        return f"{model_dir} is unfinished: its training was interrupted (no model.pt). Complete it with {resume} {where}"
    if has["config.json"] and _method(model_dir / "config.json") == "intensity":
        return (f"{model_dir} is unfinished: the calibration of this intensity baseline was interrupted. Complete "
                f"it with {calibrate} {where}")
    if has["config.json"] or (model_dir / "splits.json").is_file():
        return (f"{model_dir} is unfinished: its training was interrupted before its first epoch ended (nothing "
                f"to resume). Train it again: 'medanomaly train DATA --out {model_dir}' {where}")
    return None


def _method(config_path: Path) -> str | None:
    """The anomaly method of a config.json, read leniently (only to word an error message)."""
    try:
        data = json.loads(config_path.read_text())
        return data["anomaly"]["method"] if data.get("task") == "anomaly" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _read_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / FILE_NAME
    if not path.is_file():
        raise MedanomalyError(unfinished(model_dir) or f"{model_dir} is not a medanomaly model directory (no "
                              "model.json); pass the --out folder of 'medanomaly train'")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise MedanomalyError(f"{path} is not valid JSON ({exc}); the model directory is damaged: retrain") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise MedanomalyError(f"{path} is not a medanomaly model file (format {found!r}, expected "
                              f"'{FORMAT}'); pass the --out folder of 'medanomaly train'")
    return data


def from_dict(data: dict[str, Any]) -> ModelFile:
    """A ModelFile from the JSON object of a version 2 file; KeyError, TypeError or ValueError
    (MedanomalyError from the config sections) for a missing, unknown or invalid entry."""
    task = data["task"]
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not 'supervised' or 'anomaly'")
    labels, label_posts = read_labels_record(data["labels"]) if "labels" in data else ((), ())
    return ModelFile(
        task=task, input=InputSpec.from_dict(data["input"]), model=UNetConfig(**data["model"]),
        postprocess=PostprocessParams.from_dict(data["postprocess"]), config=schema.from_dict(data["config"]),
        anomaly=AnomalyConfig(**data["anomaly"]) if task == "anomaly" else None, precision=data["precision"],
        training=_training(data["training"]), calibration=dict(data["calibration"]),
        weights_sha256=_weights_sha256(data.get("weights")),
        geometry=_checked_geometry(data.get("geometry", {})), medanomaly_version=data["medanomaly_version"],
        schema_version=data["schema_version"], format=data["format"], labels=labels, label_posts=label_posts)


def _training(record: dict[str, Any]) -> TrainingSummary:
    """The ``training`` record; a best val score written as null (strict JSON has no NaN) is NaN again."""
    return TrainingSummary(**{**record, "best_val_score": jsonio.number(record.get("best_val_score"))})


def _checked_geometry(geometry: Any) -> dict[str, Any]:
    """The ``geometry`` record, checked: a dict of :data:`GEOMETRY_KEYS` only; ValueError otherwise."""
    if not isinstance(geometry, dict) or not set(geometry) <= set(GEOMETRY_KEYS):
        raise ValueError(f"geometry is {geometry!r}; expected an object with keys among {', '.join(GEOMETRY_KEYS)}")
    if geometry.get("orientation") not in (None, list(ORIENTATION)):  # the one orientation io.orient brings volumes to
        raise ValueError(f"geometry.orientation is {geometry['orientation']!r}; this medanomaly trains and predicts "
                         f"in {list(ORIENTATION)} only")
    return dict(geometry)


def _weights_sha256(weights: Any) -> str | None:
    """The SHA-256 of the ``weights`` entry (absent: None); ValueError for one that is not ours."""
    if weights is None:
        return None
    if not isinstance(weights, dict) or weights.get("file") != WEIGHTS_FILE or set(weights) != {"file", "sha256"}:
        raise ValueError(f"weights is {weights!r}; expected {{'file': '{WEIGHTS_FILE}', 'sha256': ...}}")
    return weights["sha256"]


def _check(mf: ModelFile) -> ModelFile:
    """The file must agree with itself: the input channels are those of the network and its output
    channels those of the task (an edited or mixed-up file would otherwise fail later, image by
    image, with a misleading message). The 'intensity' method has no network to check."""
    if not mf.has_network:
        return mf
    if mf.input.channels != mf.model.in_channels:
        raise ValueError(f"input.channels is {mf.input.channels} but model.in_channels is {mf.model.in_channels}")
    expected = network_out_channels(mf.task, mf.anomaly.method if mf.anomaly else "", mf.model.in_channels,
                                    len(mf.labels))
    if mf.model.out_channels != expected:
        raise ValueError(f"model.out_channels is {mf.model.out_channels}; a {mf.task} model has {expected}")
    return mf


def _v1_base_config(model_dir: Path) -> TrainConfig:
    """The configuration a version 1 model was trained with: its ``config.json``, or the defaults
    where it is absent or unreadable (a warning): ``predict`` of version 1 never read it, so a
    model that predicted then predicts now, from the sections of its model.json."""
    path = model_dir / "config.json"
    if not path.is_file():
        return TrainConfig()
    try:
        return schema.load(path)
    except MedanomalyError as exc:
        log.warning("%s: %s; the model file's configuration record uses the defaults there", path, exc)
        return TrainConfig()


def upgrade_v1(data: dict[str, Any], base: TrainConfig) -> dict[str, Any]:
    """A version 1 model.json as version 2: the entries older files may lack get the values the
    version 1 reader assumed, and ``config`` is ``base`` with the sections written into it."""
    task, inp = data.get("task", "supervised"), {"dim": 2, "tta": False, **data["input"]}
    facts: dict[str, Any] = {"task": task, "size": inp["size"], "normalization": inp["normalization"],
                             "precision": data.get("precision", "auto"), "model": data["model"]}
    if task == "anomaly":
        facts["anomaly"] = data["anomaly"]
    if task == "supervised":  # version 1 wrote input.tta = config tta for supervised models only
        facts["tta"] = inp["tta"]
    if inp["dim"] == 3:
        facts.update(patch=inp.get("patch"), spacing=inp.get("spacing"))
    config = schema.from_dict({**base.to_dict(), **facts})
    return {"training": {}, "calibration": {}, **data, "task": task, "input": inp, "precision": facts["precision"],
            "config": config.to_dict(), "schema_version": SCHEMA_VERSION}
